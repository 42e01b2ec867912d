"""Stripe webhooks: only signed, fresh deliveries count; each event is handled once, and a
repeated, late or out-of-order one only ever stores the subscription as Stripe has it now."""

import hashlib
import hmac
import json
import time

import pytest

from tests.fakes import InMemoryStore
from usage_meter.billing.stripe_subscriptions import InvalidSignature, verify_webhook
from usage_meter.logic.subscriptions import handle_subscription_event
from usage_meter.models.domain import ItemPeriods, SubscriptionRead

SECRET, OLD_SECRET = "whsec_new_secret", "whsec_old_secret"
CUSTOMER = "cus_Hook1"


def signed(payload: bytes, *secrets: str, at: int | None = None) -> str:
    stamp = int(time.time()) if at is None else at
    signatures = [
        hmac.new(s.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
        for s in secrets
    ]
    return ",".join([f"t={stamp}", *(f"v1={v}" for v in signatures)])


EVENT = json.dumps(
    {
        "id": "evt_1",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": int(time.time()),
        "data": {"object": {"id": "sub_1", "object": "subscription"}},
    }
).encode()


def test_a_delivery_signed_with_the_secret_is_the_event():
    event = verify_webhook(EVENT, signed(EVENT, SECRET), [SECRET])
    assert (event["id"], event["type"]) == ("evt_1", "customer.subscription.updated")


def test_during_a_roll_either_secret_verifies():
    header = signed(EVENT, SECRET, OLD_SECRET)  # Stripe signs with both while they overlap
    assert verify_webhook(EVENT, header, [OLD_SECRET])["id"] == "evt_1"
    assert verify_webhook(EVENT, signed(EVENT, SECRET), [OLD_SECRET, SECRET])["id"] == "evt_1"


@pytest.mark.parametrize(
    ("payload", "header"),
    [
        (EVENT, None),  # unsigned
        (EVENT, ""),
        (EVENT, signed(EVENT, "whsec_someone_else")),  # forged
        (EVENT.replace(b"evt_1", b"evt_2"), signed(EVENT, SECRET)),  # tampered body
        (EVENT, signed(EVENT, SECRET, at=int(time.time()) - 301)),  # older than 300 s
        (EVENT, "t=abc,v1=zz"),  # garbage
    ],
)
def test_unsigned_forged_tampered_or_stale_deliveries_are_refused(payload, header):
    with pytest.raises(InvalidSignature):
        verify_webhook(payload, header, [SECRET])


class Reader:
    """Stripe's subscription as it is now, whatever the event said."""

    def __init__(self, current: tuple[int, int]) -> None:
        self.current = current
        self.reads = 0

    def read(self, subscription_id: str) -> SubscriptionRead:
        self.reads += 1
        item = ItemPeriods(
            item="si_1",
            meter="ai_messages",
            anchor=self.current[0],
            interval="month",
            periods=(self.current,),
        )
        return SubscriptionRead(
            id=subscription_id,
            customer=CUSTOMER,
            status="active",
            read_at=time.time() + self.reads,
            start_date=self.current[0],
            items=(item,),
        )


def test_a_repeated_event_is_handled_once():
    store, reader = InMemoryStore(), Reader((1_800_000_000, 1_802_592_000))
    first = handle_subscription_event("evt_1", "sub_1", reader=reader, store=store, now=1)
    again = handle_subscription_event("evt_1", "sub_1", reader=reader, store=store, now=2)
    assert (first.handled, again.handled, reader.reads) == (True, False, 1)


def test_events_out_of_order_leave_stripes_current_state():
    store, reader = InMemoryStore(), Reader((1_802_592_000, 1_805_270_400))
    # The renewal's event is delivered first, then the older creation event: both read now.
    handle_subscription_event("evt_renewed", "sub_1", reader=reader, store=store, now=1)
    handle_subscription_event("evt_created", "sub_1", reader=reader, store=store, now=2)
    [item] = store.customer_billing(CUSTOMER).subscriptions["sub_1"].items
    assert item.periods[-1] == (1_802_592_000, 1_805_270_400)


def test_a_failed_sync_is_not_remembered_so_stripes_retry_handles_it():
    store = InMemoryStore()

    class Down:
        def read(self, subscription_id: str) -> SubscriptionRead:
            raise ConnectionError("Stripe is unreachable")

    with pytest.raises(ConnectionError):
        handle_subscription_event("evt_1", "sub_1", reader=Down(), store=store, now=1)
    assert store.stripe_event_handled("evt_1") is False
