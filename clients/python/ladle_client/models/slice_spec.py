from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.model_ref_object import ModelRefObject
    from ..models.slice_source_spec import SliceSourceSpec
    from ..models.slice_spec_parameters import SliceSpecParameters


T = TypeVar("T", bound="SliceSpec")


@_attrs_define
class SliceSpec:
    """One output slice: layers `layer_range` of its sources (passthrough: one source, copied;
    any other method: the sources merged layer by layer, all with the same number of layers).

        Attributes:
            sources (list[SliceSourceSpec]):
            base_model (ModelRefObject | None | str | Unset):
            parameters (SliceSpecParameters | Unset): Parameters for this slice, before the recipe's (a source's own come
                first).
    """

    sources: list[SliceSourceSpec]
    base_model: ModelRefObject | None | str | Unset = UNSET
    parameters: SliceSpecParameters | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        from ..models.model_ref_object import ModelRefObject

        sources = []
        for sources_item_data in self.sources:
            sources_item = sources_item_data.to_dict()
            sources.append(sources_item)

        base_model: dict[str, Any] | None | str | Unset
        if isinstance(self.base_model, Unset):
            base_model = UNSET
        elif isinstance(self.base_model, ModelRefObject):
            base_model = self.base_model.to_dict()
        else:
            base_model = self.base_model

        parameters: dict[str, Any] | Unset = UNSET
        if not isinstance(self.parameters, Unset):
            parameters = self.parameters.to_dict()

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "sources": sources,
            }
        )
        if base_model is not UNSET:
            field_dict["base_model"] = base_model
        if parameters is not UNSET:
            field_dict["parameters"] = parameters

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.model_ref_object import ModelRefObject
        from ..models.slice_source_spec import SliceSourceSpec
        from ..models.slice_spec_parameters import SliceSpecParameters

        d = dict(src_dict)
        sources = []
        _sources = d.pop("sources")
        for sources_item_data in _sources:
            sources_item = SliceSourceSpec.from_dict(sources_item_data)

            sources.append(sources_item)

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

        _parameters = d.pop("parameters", UNSET)
        parameters: SliceSpecParameters | Unset
        if isinstance(_parameters, Unset):
            parameters = UNSET
        else:
            parameters = SliceSpecParameters.from_dict(_parameters)

        slice_spec = cls(
            sources=sources,
            base_model=base_model,
            parameters=parameters,
        )

        return slice_spec
