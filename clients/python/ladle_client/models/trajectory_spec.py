from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

from attrs import define as _attrs_define

if TYPE_CHECKING:
    from ..models.select_type_0 import SelectType0
    from ..models.select_type_1 import SelectType1
    from ..models.select_type_2 import SelectType2


T = TypeVar("T", bound="TrajectorySpec")


@_attrs_define
class TrajectorySpec:
    """`"trajectory": {"uri": …, "select": …}` as a request gives it.

    Attributes:
        select (SelectType0 | SelectType1 | SelectType2): Which checkpoints of the folder to take.
        uri (str):
    """

    select: SelectType0 | SelectType1 | SelectType2
    uri: str

    def to_dict(self) -> dict[str, Any]:
        from ..models.select_type_0 import SelectType0
        from ..models.select_type_1 import SelectType1

        select: dict[str, Any]
        if isinstance(self.select, SelectType0) or isinstance(self.select, SelectType1):
            select = self.select.to_dict()
        else:
            select = self.select.to_dict()

        uri = self.uri

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "select": select,
                "uri": uri,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.select_type_0 import SelectType0
        from ..models.select_type_1 import SelectType1
        from ..models.select_type_2 import SelectType2

        d = dict(src_dict)

        def _parse_select(data: object) -> SelectType0 | SelectType1 | SelectType2:
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                componentsschemas_select_type_0 = SelectType0.from_dict(data)

                return componentsschemas_select_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                componentsschemas_select_type_1 = SelectType1.from_dict(data)

                return componentsschemas_select_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            if not isinstance(data, dict):
                raise TypeError()
            componentsschemas_select_type_2 = SelectType2.from_dict(data)

            return componentsschemas_select_type_2

        select = _parse_select(d.pop("select"))

        uri = d.pop("uri")

        trajectory_spec = cls(
            select=select,
            uri=uri,
        )

        return trajectory_spec
