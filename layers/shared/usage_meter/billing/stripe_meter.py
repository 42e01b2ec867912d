"""Stripe Billing Meters adapter: the only module that imports `stripe`."""

import threading
import time

import stripe
from stripe.params.billing import MeterEventCreateParams

from usage_meter.billing import (
    BillingAuthError,
    PermanentBillingError,
    RateLimited,
    SendOutcome,
    TransientBillingError,
)
from usage_meter.billing.stripe_client import stripe_client
from usage_meter.models.domain import MeterEventRequest

# Stripe's answer to a repeated identifier; it means the event was delivered before.
_DUPLICATE = "An event already exists with identifier"
# A timestamp ahead of Stripe's clock is clock skew: the same decision succeeds a little later.
_TRANSIENT_CODES = frozenset({"timestamp_in_future"})
# Stripe allows 25 meter-event calls/s in test mode and 1,000/s live; keep headroom under both.
_TEST_MODE_RATE, _LIVE_RATE = 20.0, 500.0


class _RateLimiter:
    """Spaces calls evenly across threads so a run never bursts past Stripe's limit."""

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


class StripeMeterBilling:
    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout_seconds: float = 20.0,
        max_network_retries: int = 2,
        max_requests_per_second: float | None = None,
    ) -> None:
        self._client = stripe_client(
            api_key,
            api_base=api_base,
            timeout_seconds=timeout_seconds,
            max_network_retries=max_network_retries,
        )
        test_mode = "_test_" in api_key
        self._limiter = _RateLimiter(
            max_requests_per_second or (_TEST_MODE_RATE if test_mode else _LIVE_RATE)
        )

    def send(self, request: MeterEventRequest) -> SendOutcome:
        params: MeterEventCreateParams = {
            "event_name": request.event_name,
            "identifier": request.identifier,
            "timestamp": request.timestamp,
            "payload": {
                "stripe_customer_id": request.customer,
                "value": str(request.value),
            },
        }
        self._limiter.wait()
        try:
            # No idempotency key of ours: Stripe keeps its first answer to one for 24 hours, 500s
            # included, which would pin this decision to a failure for a day. The SDK sends a
            # fresh key per call (and reuses it across its own retries), and the identifier is
            # what Stripe deduplicates across calls and runs.
            self._client.v1.billing.meter_events.create(params=params)
        except stripe.RateLimitError as error:
            raise RateLimited(str(error.user_message), _retry_after(error)) from error
        except (stripe.AuthenticationError, stripe.PermissionError) as error:
            raise BillingAuthError(str(error.user_message)) from error
        except stripe.InvalidRequestError as error:
            message = str(error.user_message or error)
            if message.startswith(_DUPLICATE):
                return SendOutcome.ALREADY_DELIVERED
            if error.code in _TRANSIENT_CODES:
                raise TransientBillingError(message) from error
            raise PermanentBillingError(message, error.code) from error
        except stripe.IdempotencyError as error:
            raise PermanentBillingError(str(error.user_message), "idempotency_error") from error
        except (stripe.APIConnectionError, stripe.APIError) as error:
            raise TransientBillingError(str(error.user_message or error)) from error
        except stripe.StripeError as error:
            if error.http_status and error.http_status >= 500:
                raise TransientBillingError(str(error.user_message)) from error
            raise PermanentBillingError(str(error.user_message), error.code) from error
        return SendOutcome.DELIVERED


def _retry_after(error: stripe.StripeError) -> float | None:
    value = (error.headers or {}).get("Retry-After") if error.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
