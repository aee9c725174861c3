from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.phase import Phase
from ..types import UNSET, Unset

T = TypeVar("T", bound="ProgressSnapshot")


@_attrs_define
class ProgressSnapshot:
    """The public shape of progress (`GET /v1/merges/{id}` → `progress`, and the data of a
    `progress` event).

        Attributes:
            bytes_read (int):
            bytes_written (int):
            tensors_done (int):
            tensors_total (int):
            bytes_total (int | Unset): Input bytes planned to be read: every tensor the merge reads, of every input it reads
                it from, plus one more read of a tensor's inputs per pre-pass (added when the pass
                starts, so it can grow while the job runs). `bytes_read` never passes it, and equals
                it when a merge ends having read everything (not when it kept a previous attempt's
                output).
            phase (None | Phase | Unset):
    """

    bytes_read: int
    bytes_written: int
    tensors_done: int
    tensors_total: int
    bytes_total: int | Unset = UNSET
    phase: None | Phase | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        bytes_read = self.bytes_read

        bytes_written = self.bytes_written

        tensors_done = self.tensors_done

        tensors_total = self.tensors_total

        bytes_total = self.bytes_total

        phase: None | str | Unset
        if isinstance(self.phase, Unset):
            phase = UNSET
        elif isinstance(self.phase, Phase):
            phase = self.phase.value
        else:
            phase = self.phase

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "bytes_read": bytes_read,
                "bytes_written": bytes_written,
                "tensors_done": tensors_done,
                "tensors_total": tensors_total,
            }
        )
        if bytes_total is not UNSET:
            field_dict["bytes_total"] = bytes_total
        if phase is not UNSET:
            field_dict["phase"] = phase

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        bytes_read = d.pop("bytes_read")

        bytes_written = d.pop("bytes_written")

        tensors_done = d.pop("tensors_done")

        tensors_total = d.pop("tensors_total")

        bytes_total = d.pop("bytes_total", UNSET)

        def _parse_phase(data: object) -> None | Phase | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                phase_type_1 = Phase(data)

                return phase_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | Phase | Unset, data)

        phase = _parse_phase(d.pop("phase", UNSET))

        progress_snapshot = cls(
            bytes_read=bytes_read,
            bytes_written=bytes_written,
            tensors_done=tensors_done,
            tensors_total=tensors_total,
            bytes_total=bytes_total,
            phase=phase,
        )

        progress_snapshot.additional_properties = d
        return progress_snapshot

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
