"""Stripe adapter for what Stripe tells the service: webhooks about subscriptions (their billing
periods are read back from Stripe) and event notifications about meter events it rejected.

Only the webhook function and the operators' command import it (it imports `stripe`).
"""

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import stripe

from usage_meter.billing.stripe_client import stripe_client
from usage_meter.logic.rejections import Rejection
from usage_meter.models.domain import ItemPeriods, SubscriptionRead

# The events that can change a subscription's periods (API version 2025-03-31 and later keep
# them on the subscription items).
SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
    }
)
# Thin event notifications from an event destination: Stripe's asynchronous meter event errors.
ERROR_REPORT_EVENTS = frozenset(
    {"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"}
)
SIGNATURE_TOLERANCE = 300  # seconds: Stripe's default, which its retries are signed within
# Statuses whose items have periods Stripe bills in; `incomplete` ones never started.
_BILLING = frozenset({"active", "trialing", "past_due", "unpaid", "paused", "canceled"})


class InvalidSignature(Exception):
    """The request is not a webhook Stripe signed with one of our secrets, or is too old."""


def _verified_by_any[T](
    signature: str | None, secrets: Sequence[str], parse: Callable[[str], T]
) -> T:
    """What `parse` makes of the delivery with the first secret its signature verifies with
    (during a secret's roll, Stripe signs with the old and the new one)."""
    if not signature:
        raise InvalidSignature("no Stripe-Signature header")
    for secret in secrets:
        try:
            return parse(secret)
        except stripe.SignatureVerificationError:
            continue
        except ValueError as error:  # signed, but not a Stripe event
            raise InvalidSignature(f"the payload is not a Stripe event: {error}") from None
    raise InvalidSignature("no valid signature for this endpoint's secret, or it is too old")


def verify_webhook(payload: bytes, signature: str | None, secrets: Sequence[str]) -> Any:
    """The webhook's event, if one of `secrets` signed it within the tolerance."""
    return _verified_by_any(
        signature,
        secrets,
        lambda secret: stripe.Webhook.construct_event(
            payload, signature, secret, tolerance=SIGNATURE_TOLERANCE
        ),
    )


class StripeSubscriptions:
    def __init__(
        self, api_key: str, *, api_base: str | None = None, timeout_seconds: float = 20.0
    ) -> None:
        self._client = stripe_client(api_key, api_base=api_base, timeout_seconds=timeout_seconds)
        self._meters: dict[str, str] = {}  # meter id → event_name

    def notification(self, payload: bytes, signature: str | None, secrets: Sequence[str]) -> Any:
        """The thin event notification, if one of `secrets` signed it within the tolerance."""
        return _verified_by_any(
            signature,
            secrets,
            lambda secret: self._client.parse_event_notification(
                payload, signature, secret, tolerance=SIGNATURE_TOLERANCE
            ),
        )

    @staticmethod
    def rejections(notification: Any) -> list[Rejection]:
        """The identifiers an error report samples, with Stripe's code: fetched from Stripe,
        since a thin notification carries only the event's id."""
        event = notification.fetch_event()
        found = []
        for error_type in event.data.reason.error_types:
            for sample in error_type.sample_errors:
                identifier = getattr(sample.request, "identifier", None)
                if identifier:
                    message = str(getattr(sample, "error_message", "") or "")
                    found.append(Rejection(str(identifier), str(error_type.code), message))
        return found

    def read(self, subscription_id: str) -> SubscriptionRead | None:
        """The subscription as Stripe has it now; None if it never billed (incomplete)."""
        read_at = time.time()
        return self._convert(self._client.v1.subscriptions.retrieve(subscription_id), read_at)

    def all(self) -> Iterator[SubscriptionRead]:
        """Every subscription of the account, canceled ones included, page by page."""
        pages = self._client.v1.subscriptions.list(params={"status": "all", "limit": 100})
        for subscription in pages.auto_paging_iter():
            converted = self._convert(subscription, time.time())
            if converted is not None:
                yield converted

    def _event_name(self, meter_id: str) -> str | None:
        if meter_id not in self._meters:
            meters = self._client.v1.billing.meters.list(params={"limit": 100})
            self._meters = {m.id: m.event_name for m in meters.auto_paging_iter()}
        return self._meters.get(meter_id)

    def _convert(self, subscription: Any, read_at: float) -> SubscriptionRead | None:
        if subscription.status not in _BILLING:
            return None
        renews = subscription.status != "canceled" and not subscription.cancel_at_period_end
        items = []
        for item in subscription["items"].data:  # `items` is also a dict method
            recurring = item.price.recurring
            if recurring is None:
                continue
            metered = getattr(recurring, "usage_type", None) == "metered"
            meter_id = getattr(recurring, "meter", None) if metered else None
            items.append(
                ItemPeriods(
                    item=item.id,
                    # A licensed item still marks the customer's cycle; it bills no meter.
                    meter=(self._event_name(meter_id) or "") if meter_id else "",
                    anchor=subscription.billing_cycle_anchor,
                    interval=recurring.interval,
                    interval_count=getattr(recurring, "interval_count", None) or 1,
                    periods=((item.current_period_start, item.current_period_end),),
                    renews=renews and not getattr(subscription, "cancel_at", None),
                )
            )
        return SubscriptionRead(
            id=subscription.id,
            customer=_id(subscription.customer),
            status=subscription.status,
            read_at=read_at,
            start_date=subscription.start_date,
            ended_at=getattr(subscription, "ended_at", None),
            items=tuple(items),
        )


def _id(value: Any) -> str:
    return value if isinstance(value, str) else str(value.id)
