from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

from attrs import define as _attrs_define

if TYPE_CHECKING:
    from ..models.slice_source_spec import SliceSourceSpec


T = TypeVar("T", bound="SliceSpec")


@_attrs_define
class SliceSpec:
    """One output slice: the layers `layer_range` of its source, in order.

    Attributes:
        sources (list[SliceSourceSpec]):
    """

    sources: list[SliceSourceSpec]

    def to_dict(self) -> dict[str, Any]:
        sources = []
        for sources_item_data in self.sources:
            sources_item = sources_item_data.to_dict()
            sources.append(sources_item)

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "sources": sources,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.slice_source_spec import SliceSourceSpec

        d = dict(src_dict)
        sources = []
        _sources = d.pop("sources")
        for sources_item_data in _sources:
            sources_item = SliceSourceSpec.from_dict(sources_item_data)

            sources.append(sources_item)

        slice_spec = cls(
            sources=sources,
        )

        return slice_spec
