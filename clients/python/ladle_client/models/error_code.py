from enum import StrEnum


class ErrorCode(StrEnum):
    CANCELLED = "cancelled"
    CHECKPOINT_MALFORMED = "checkpoint_malformed"
    CHECKPOINT_NOT_FOUND = "checkpoint_not_found"
    DATABASE_ERROR = "database_error"
    DATABASE_UNAVAILABLE = "database_unavailable"
    EVALUATOR_FAILED = "evaluator_failed"
    EVALUATOR_UNAVAILABLE = "evaluator_unavailable"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INPUT_CHANGED = "input_changed"
    INTERNAL = "internal"
    INVALID_ADAPTER = "invalid_adapter"
    INVALID_QUERY = "invalid_query"
    INVALID_RECIPE = "invalid_recipe"
    INVALID_TOKENIZER = "invalid_tokenizer"
    INVALID_URI = "invalid_uri"
    LEASE_EXPIRED = "lease_expired"
    MODEL_NOT_CACHED = "model_not_cached"
    NOT_CANCELLABLE = "not_cancellable"
    NOT_FOUND = "not_found"
    OUTPUT_CONFLICT = "output_conflict"
    OUTPUT_IN_USE = "output_in_use"
    OUTPUT_NOT_EMPTY = "output_not_empty"
    PATH_OUTSIDE_ROOTS = "path_outside_roots"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    SHAPE_MISMATCH = "shape_mismatch"
    STORAGE_ERROR = "storage_error"
    STORAGE_FULL = "storage_full"
    STORAGE_NOT_ALLOWED = "storage_not_allowed"
    UNAUTHORIZED = "unauthorized"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"

    def __str__(self) -> str:
        return str(self.value)
