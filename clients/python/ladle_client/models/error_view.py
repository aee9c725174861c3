from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.error_code import ErrorCode

T = TypeVar("T", bound="ErrorView")


@_attrs_define
class ErrorView:
    """A failed (or cancelled) job's error, or while a job waits for its retry, its last one.

    Example:
        {'attempt': 2, 'code': 'storage_error', 'message': 'reading s3://ft/a/model.safetensors: connection reset',
            'retryable': True}

    Attributes:
        attempt (int): The attempt (1-based) that failed.
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
        retryable (bool): Whether the queue retries a job failing this way (up to `max_attempts`, with backoff).
    """

    attempt: int
    code: ErrorCode
    message: str
    retryable: bool
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        attempt = self.attempt

        code = self.code.value

        message = self.message

        retryable = self.retryable

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "attempt": attempt,
                "code": code,
                "message": message,
                "retryable": retryable,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        attempt = d.pop("attempt")

        code = ErrorCode(d.pop("code"))

        message = d.pop("message")

        retryable = d.pop("retryable")

        error_view = cls(
            attempt=attempt,
            code=code,
            message=message,
            retryable=retryable,
        )

        error_view.additional_properties = d
        return error_view

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
