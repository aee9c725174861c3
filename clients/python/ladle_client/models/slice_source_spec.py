from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.slice_source_spec_parameters import SliceSourceSpecParameters


T = TypeVar("T", bound="SliceSourceSpec")


@_attrs_define
class SliceSourceSpec:
    """
    Attributes:
        layer_range (list[int]): `[first, end)` layer indices of the source model.
        uri (str):
        parameters (SliceSourceSpecParameters | Unset):
    """

    layer_range: list[int]
    uri: str
    parameters: SliceSourceSpecParameters | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        layer_range = self.layer_range

        uri = self.uri

        parameters: dict[str, Any] | Unset = UNSET
        if not isinstance(self.parameters, Unset):
            parameters = self.parameters.to_dict()

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "layer_range": layer_range,
                "uri": uri,
            }
        )
        if parameters is not UNSET:
            field_dict["parameters"] = parameters

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.slice_source_spec_parameters import SliceSourceSpecParameters

        d = dict(src_dict)
        layer_range = cast(list[int], d.pop("layer_range"))

        uri = d.pop("uri")

        _parameters = d.pop("parameters", UNSET)
        parameters: SliceSourceSpecParameters | Unset
        if isinstance(_parameters, Unset):
            parameters = UNSET
        else:
            parameters = SliceSourceSpecParameters.from_dict(_parameters)

        slice_source_spec = cls(
            layer_range=layer_range,
            uri=uri,
            parameters=parameters,
        )

        return slice_source_spec
