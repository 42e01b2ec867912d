"""Domain errors. Each carries a stable machine-readable code; api.py maps them to HTTP."""

from typing import Any


class UsageMeterError(Exception):
    code = "error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidJson(UsageMeterError):
    code = "invalid_json"


class PayloadTooLarge(UsageMeterError):
    code = "payload_too_large"


class ValidationFailed(UsageMeterError):
    code = "validation_error"


class PeriodClosed(ValidationFailed):
    """The event's billing period is closed: Stripe finalized (or is finalizing) its invoice."""

    code = "period_closed"


class IdempotencyConflict(UsageMeterError):
    code = "idempotency_conflict"


class NotFound(UsageMeterError):
    code = "not_found"


class InternalError(UsageMeterError):
    """What a caller sees of an unexpected fault: nothing of its internals."""

    code = "internal_error"


class StoreUnavailable(UsageMeterError):
    """The table refused the write after retries (throttling, contention); safe to retry."""

    code = "temporarily_unavailable"
