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
        copy_tokenizer (bool | None | Unset): Copy the tokenizer files of the donor (the base model, else the first
            model) into the
            output, as mergekit's `--copy-tokenizer` [default: true].
        dtype (None | str | Unset):
        max_shard_size (Any | Unset): `"2GB"`, `"500MB"`, `"1GiB"` or a number of bytes.
        overwrite (bool | Unset): Write into a folder that holds files no ladle manifest claims (refused otherwise with
            `output_not_empty`). Those files are never deleted or replaced: a name ladle needs that
            is taken fails the job with `output_conflict`.
        write_model_card (bool | None | Unset): Write the model card `README.md` and `mergekit_config.yml`, as
            mergekit's
            `--write-model-card` [default: true].
    """

    uri: str
    copy_tokenizer: bool | None | Unset = UNSET
    dtype: None | str | Unset = UNSET
    max_shard_size: Any | Unset = UNSET
    overwrite: bool | Unset = UNSET
    write_model_card: bool | None | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        uri = self.uri

        copy_tokenizer: bool | None | Unset
        if isinstance(self.copy_tokenizer, Unset):
            copy_tokenizer = UNSET
        else:
            copy_tokenizer = self.copy_tokenizer

        dtype: None | str | Unset
        if isinstance(self.dtype, Unset):
            dtype = UNSET
        else:
            dtype = self.dtype

        max_shard_size = self.max_shard_size

        overwrite = self.overwrite

        write_model_card: bool | None | Unset
        if isinstance(self.write_model_card, Unset):
            write_model_card = UNSET
        else:
            write_model_card = self.write_model_card

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "uri": uri,
            }
        )
        if copy_tokenizer is not UNSET:
            field_dict["copy_tokenizer"] = copy_tokenizer
        if dtype is not UNSET:
            field_dict["dtype"] = dtype
        if max_shard_size is not UNSET:
            field_dict["max_shard_size"] = max_shard_size
        if overwrite is not UNSET:
            field_dict["overwrite"] = overwrite
        if write_model_card is not UNSET:
            field_dict["write_model_card"] = write_model_card

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        uri = d.pop("uri")

        def _parse_copy_tokenizer(data: object) -> bool | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(bool | None | Unset, data)

        copy_tokenizer = _parse_copy_tokenizer(d.pop("copy_tokenizer", UNSET))

        def _parse_dtype(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        dtype = _parse_dtype(d.pop("dtype", UNSET))

        max_shard_size = d.pop("max_shard_size", UNSET)

        overwrite = d.pop("overwrite", UNSET)

        def _parse_write_model_card(data: object) -> bool | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(bool | None | Unset, data)

        write_model_card = _parse_write_model_card(d.pop("write_model_card", UNSET))

        output_spec = cls(
            uri=uri,
            copy_tokenizer=copy_tokenizer,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            write_model_card=write_model_card,
        )

        return output_spec
