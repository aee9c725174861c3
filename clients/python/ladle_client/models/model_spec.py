from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.model_spec_parameters import ModelSpecParameters


T = TypeVar("T", bound="ModelSpec")


@_attrs_define
class ModelSpec:
    """
    Attributes:
        uri (str):
        lora (None | str | Unset): A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) to
            fold into this model: the ingredient is `W + s·B·A` (mergekit's `model+lora`).
        parameters (ModelSpecParameters | Unset): Per-model parameters (`density`, `gamma`, `epsilon`, `weight` as a
            gradient or filters).
        score (float | None | Unset): A known score of this model alone (method `greedy_soup`; evaluated when absent).
        weight (float | None | Unset):
    """

    uri: str
    lora: None | str | Unset = UNSET
    parameters: ModelSpecParameters | Unset = UNSET
    score: float | None | Unset = UNSET
    weight: float | None | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        uri = self.uri

        lora: None | str | Unset
        if isinstance(self.lora, Unset):
            lora = UNSET
        else:
            lora = self.lora

        parameters: dict[str, Any] | Unset = UNSET
        if not isinstance(self.parameters, Unset):
            parameters = self.parameters.to_dict()

        score: float | None | Unset
        if isinstance(self.score, Unset):
            score = UNSET
        else:
            score = self.score

        weight: float | None | Unset
        if isinstance(self.weight, Unset):
            weight = UNSET
        else:
            weight = self.weight

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "uri": uri,
            }
        )
        if lora is not UNSET:
            field_dict["lora"] = lora
        if parameters is not UNSET:
            field_dict["parameters"] = parameters
        if score is not UNSET:
            field_dict["score"] = score
        if weight is not UNSET:
            field_dict["weight"] = weight

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.model_spec_parameters import ModelSpecParameters

        d = dict(src_dict)
        uri = d.pop("uri")

        def _parse_lora(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        lora = _parse_lora(d.pop("lora", UNSET))

        _parameters = d.pop("parameters", UNSET)
        parameters: ModelSpecParameters | Unset
        if isinstance(_parameters, Unset):
            parameters = UNSET
        else:
            parameters = ModelSpecParameters.from_dict(_parameters)

        def _parse_score(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        score = _parse_score(d.pop("score", UNSET))

        def _parse_weight(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        weight = _parse_weight(d.pop("weight", UNSET))

        model_spec = cls(
            uri=uri,
            lora=lora,
            parameters=parameters,
            score=score,
            weight=weight,
        )

        return model_spec
