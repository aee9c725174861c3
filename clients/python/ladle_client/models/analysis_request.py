from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.model_ref_object import ModelRefObject
    from ..models.notify_spec import NotifySpec


T = TypeVar("T", bound="AnalysisRequest")


@_attrs_define
class AnalysisRequest:
    """The body of `POST /v1/analyses`.

    Example:
        {'base_model': 'file:///data/base/', 'models': ['file:///data/ft-a/', {'uri': 'file:///data/ft-b/'}]}

    Attributes:
        models (list[ModelRefObject | str]): `"uri"` or `{"uri": "…"}` each (2 to 128).
        base_model (ModelRefObject | None | str | Unset):
        idempotency_key (None | str | Unset):
        max_attempts (int | None | Unset):
        notify (None | NotifySpec | Unset):
        priority (int | None | Unset):
    """

    models: list[ModelRefObject | str]
    base_model: ModelRefObject | None | str | Unset = UNSET
    idempotency_key: None | str | Unset = UNSET
    max_attempts: int | None | Unset = UNSET
    notify: None | NotifySpec | Unset = UNSET
    priority: int | None | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        from ..models.model_ref_object import ModelRefObject
        from ..models.notify_spec import NotifySpec

        models = []
        for models_item_data in self.models:
            models_item: dict[str, Any] | str
            if isinstance(models_item_data, ModelRefObject):
                models_item = models_item_data.to_dict()
            else:
                models_item = models_item_data
            models.append(models_item)

        base_model: dict[str, Any] | None | str | Unset
        if isinstance(self.base_model, Unset):
            base_model = UNSET
        elif isinstance(self.base_model, ModelRefObject):
            base_model = self.base_model.to_dict()
        else:
            base_model = self.base_model

        idempotency_key: None | str | Unset
        if isinstance(self.idempotency_key, Unset):
            idempotency_key = UNSET
        else:
            idempotency_key = self.idempotency_key

        max_attempts: int | None | Unset
        if isinstance(self.max_attempts, Unset):
            max_attempts = UNSET
        else:
            max_attempts = self.max_attempts

        notify: dict[str, Any] | None | Unset
        if isinstance(self.notify, Unset):
            notify = UNSET
        elif isinstance(self.notify, NotifySpec):
            notify = self.notify.to_dict()
        else:
            notify = self.notify

        priority: int | None | Unset
        if isinstance(self.priority, Unset):
            priority = UNSET
        else:
            priority = self.priority

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "models": models,
            }
        )
        if base_model is not UNSET:
            field_dict["base_model"] = base_model
        if idempotency_key is not UNSET:
            field_dict["idempotency_key"] = idempotency_key
        if max_attempts is not UNSET:
            field_dict["max_attempts"] = max_attempts
        if notify is not UNSET:
            field_dict["notify"] = notify
        if priority is not UNSET:
            field_dict["priority"] = priority

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.model_ref_object import ModelRefObject
        from ..models.notify_spec import NotifySpec

        d = dict(src_dict)
        models = []
        _models = d.pop("models")
        for models_item_data in _models:

            def _parse_models_item(data: object) -> ModelRefObject | str:
                try:
                    if not isinstance(data, dict):
                        raise TypeError()
                    componentsschemas_model_ref_type_1 = ModelRefObject.from_dict(data)

                    return componentsschemas_model_ref_type_1
                except (TypeError, ValueError, AttributeError, KeyError):
                    pass
                return cast(ModelRefObject | str, data)

            models_item = _parse_models_item(models_item_data)

            models.append(models_item)

        def _parse_base_model(data: object) -> ModelRefObject | None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                componentsschemas_model_ref_type_1 = ModelRefObject.from_dict(data)

                return componentsschemas_model_ref_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(ModelRefObject | None | str | Unset, data)

        base_model = _parse_base_model(d.pop("base_model", UNSET))

        def _parse_idempotency_key(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        idempotency_key = _parse_idempotency_key(d.pop("idempotency_key", UNSET))

        def _parse_max_attempts(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        max_attempts = _parse_max_attempts(d.pop("max_attempts", UNSET))

        def _parse_notify(data: object) -> None | NotifySpec | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                notify_type_1 = NotifySpec.from_dict(data)

                return notify_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | NotifySpec | Unset, data)

        notify = _parse_notify(d.pop("notify", UNSET))

        def _parse_priority(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        priority = _parse_priority(d.pop("priority", UNSET))

        analysis_request = cls(
            models=models,
            base_model=base_model,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            notify=notify,
            priority=priority,
        )

        return analysis_request
