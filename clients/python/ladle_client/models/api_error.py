from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.error_code import ErrorCode
from ..types import UNSET, Unset

T = TypeVar("T", bound="ApiError")


@_attrs_define
class ApiError:
    """Every error body: a stable code and a message for people.

    Example:
        {'code': 'invalid_recipe', 'field': 'models[0].weight', 'message': 'models[0].weight: must be finite',
            'request_id': '0193a4f2-7c1e-7b40-9d2a-5f0c3e8b1a66'}

    Attributes:
        code (ErrorCode): Stable error codes (never renamed). A request's error gets the HTTP status below; a failed
            job's `error.code` uses the same codes.

            | code | HTTP | retried by the queue |
            | --- | ---: | --- |
            | `invalid_recipe` | 400 | no |
            | `invalid_uri` | 400 | no |
            | `invalid_query` | 400 | no |
            | `unauthorized` | 401 | no |
            | `storage_not_allowed` | 403 | no |
            | `path_outside_roots` | 403 | no |
            | `not_found` | 404 | no |
            | `request_timeout` | 408 | no |
            | `idempotency_key_reused` | 409 | no |
            | `output_in_use` | 409 | no |
            | `output_conflict` | 409 | no |
            | `output_not_empty` | 409 | no |
            | `not_cancellable` | 409 | no |
            | `cancelled` | 409 | no |
            | `payload_too_large` | 413 | no |
            | `unsupported_media_type` | 415 | no |
            | `checkpoint_not_found` | 422 | no |
            | `model_not_cached` | 422 | no |
            | `checkpoint_malformed` | 422 | no |
            | `invalid_adapter` | 422 | no |
            | `invalid_tokenizer` | 422 | no |
            | `shape_mismatch` | 422 | no |
            | `unsupported_dtype` | 422 | no |
            | `evaluator_failed` | 422 | no |
            | `internal` | 500 | no |
            | `storage_error` | 502 | yes |
            | `lease_expired` | 502 | yes |
            | `evaluator_unavailable` | 502 | no |
            | `database_error` | 503 | yes |
            | `database_unavailable` | 503 | yes |
            | `input_changed` | 503 | yes |
            | `storage_full` | 507 | no |
        message (str):
        field (None | str | Unset): The request field at fault (`models[1].uri`, `parameters.density`, `limit`), if one
            is.
        request_id (str | Unset): The request's id, the same as its `x-request-id` response header (the client's own
            when it sent a sane one, else generated): the key to the request's server log lines.
    """

    code: ErrorCode
    message: str
    field: None | str | Unset = UNSET
    request_id: str | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        code = self.code.value

        message = self.message

        field: None | str | Unset
        if isinstance(self.field, Unset):
            field = UNSET
        else:
            field = self.field

        request_id = self.request_id

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "code": code,
                "message": message,
            }
        )
        if field is not UNSET:
            field_dict["field"] = field
        if request_id is not UNSET:
            field_dict["request_id"] = request_id

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        code = ErrorCode(d.pop("code"))

        message = d.pop("message")

        def _parse_field(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        field = _parse_field(d.pop("field", UNSET))

        request_id = d.pop("request_id", UNSET)

        api_error = cls(
            code=code,
            message=message,
            field=field,
            request_id=request_id,
        )

        api_error.additional_properties = d
        return api_error

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
