"""The billing interface the flush depends on; the Stripe adapter is billing/stripe_meter.py."""

from enum import StrEnum
from typing import Protocol

from usage_meter.models.domain import MeterEventRequest


class SendOutcome(StrEnum):
    DELIVERED = "delivered"
    ALREADY_DELIVERED = "already_delivered"  # Stripe has this identifier from an earlier call


class BillingError(Exception):
    """Stripe did not take the event."""


class RateLimited(BillingError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransientBillingError(BillingError):
    """Worth retrying later: 5xx, timeouts, lost connections."""


class PermanentBillingError(BillingError):
    """Stripe refused this event for good (4xx): retrying it unchanged cannot succeed."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class BillingAuthError(BillingError):
    """The key is wrong or lacks permission: no event can succeed, so the run stops."""


class MeterBilling(Protocol):
    def send(self, request: MeterEventRequest) -> SendOutcome: ...
