from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

T = TypeVar("T", bound="EvaluatorSpec")


@_attrs_define
class EvaluatorSpec:
    """`evaluator` as sent.

    Attributes:
        url (str):
        max_evaluations (int | None | Unset):
        timeout_s (float | None | Unset):
    """

    url: str
    max_evaluations: int | None | Unset = UNSET
    timeout_s: float | None | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        url = self.url

        max_evaluations: int | None | Unset
        if isinstance(self.max_evaluations, Unset):
            max_evaluations = UNSET
        else:
            max_evaluations = self.max_evaluations

        timeout_s: float | None | Unset
        if isinstance(self.timeout_s, Unset):
            timeout_s = UNSET
        else:
            timeout_s = self.timeout_s

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "url": url,
            }
        )
        if max_evaluations is not UNSET:
            field_dict["max_evaluations"] = max_evaluations
        if timeout_s is not UNSET:
            field_dict["timeout_s"] = timeout_s

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        url = d.pop("url")

        def _parse_max_evaluations(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        max_evaluations = _parse_max_evaluations(d.pop("max_evaluations", UNSET))

        def _parse_timeout_s(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        timeout_s = _parse_timeout_s(d.pop("timeout_s", UNSET))

        evaluator_spec = cls(
            url=url,
            max_evaluations=max_evaluations,
            timeout_s=timeout_s,
        )

        return evaluator_spec
