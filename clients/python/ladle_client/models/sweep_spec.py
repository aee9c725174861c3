from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define

T = TypeVar("T", bound="SweepSpec")


@_attrs_define
class SweepSpec:
    """`sweep` as sent.

    Attributes:
        parameter (str):
        values (list[Any]):
    """

    parameter: str
    values: list[Any]

    def to_dict(self) -> dict[str, Any]:
        parameter = self.parameter

        values = self.values

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "parameter": parameter,
                "values": values,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        parameter = d.pop("parameter")

        values = cast(list[Any], d.pop("values"))

        sweep_spec = cls(
            parameter=parameter,
            values=values,
        )

        return sweep_spec
