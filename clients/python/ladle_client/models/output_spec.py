from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="OutputSpec")


@_attrs_define
class OutputSpec:
    """
    Attributes:
        uri (str):
        dtype (None | str | Unset):
        max_shard_size (Any | Unset): `"2GB"`, `"500MB"`, `"1GiB"` or a number of bytes.
    """

    uri: str
    dtype: None | str | Unset = UNSET
    max_shard_size: Any | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        uri = self.uri

        dtype: None | str | Unset
        if isinstance(self.dtype, Unset):
            dtype = UNSET
        else:
            dtype = self.dtype

        max_shard_size = self.max_shard_size

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "uri": uri,
            }
        )
        if dtype is not UNSET:
            field_dict["dtype"] = dtype
        if max_shard_size is not UNSET:
            field_dict["max_shard_size"] = max_shard_size

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        uri = d.pop("uri")

        def _parse_dtype(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        dtype = _parse_dtype(d.pop("dtype", UNSET))

        max_shard_size = d.pop("max_shard_size", UNSET)

        output_spec = cls(
            uri=uri,
            dtype=dtype,
            max_shard_size=max_shard_size,
        )

        return output_spec
