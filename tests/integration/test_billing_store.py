"""Customers' Stripe periods on DynamoDB Local: optimistic sync writes, counter cuts, reads that
follow the subscription's period, and records that never undo a cut."""

import random
from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling, FakeClock
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.logic.subscriptions import sync
from usage_meter.logic.usage import current_usage
from usage_meter.models.domain import ItemPeriods, SubscriptionRead
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore

CUSTOMER = "cus_Periods1"


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


START, RENEWAL, NEXT = (
    at("2026-10-13T13:37:12"),
    at("2026-11-13T13:37:12"),
    at("2026-12-13T13:37:12"),
)


@pytest.fixture
def store(local_table):
    return DynamoStore(
        local_table.name, client=local_table.client, clock=lambda: RENEWAL, rng=random.Random(1)
    )


def subscription(current: tuple[int, int], read_at: float, anchor: int = START) -> SubscriptionRead:
    return SubscriptionRead(
        id="sub_P",
        customer=CUSTOMER,
        status="active",
        read_at=read_at,
        start_date=START,
        items=(
            ItemPeriods(
                item="si_P", meter="m", anchor=anchor, interval="month", periods=(current,)
            ),
        ),
    )


def record(store: DynamoStore, now: int, when: int, quantity: int) -> None:
    request = EventIn(stripe_customer_id=CUSTOMER, meter="m", quantity=quantity, timestamp=when)
    record_events([request], meters={"m"}, store=store, now=datetime.fromtimestamp(now, UTC))


def test_a_sync_is_written_only_over_the_version_it_read(store):
    sync(subscription((START, RENEWAL), read_at=1), store, now=START)
    billing = store.customer_billing(CUSTOMER)
    assert billing.version == 1
    assert store.save_billing(billing, expected_version=1) is True
    # A second writer that read version 1 too is refused: it must read again and merge.
    assert store.save_billing(billing, expected_version=1) is False
    assert store.customer_billing(CUSTOMER).version == 2
    fresh = store.customer_billings([CUSTOMER, "cus_Never"])
    assert fresh["cus_Never"].subscriptions == {}


def test_reads_follow_the_subscription_period_and_its_renewal(store):
    sync(subscription((START, RENEWAL), read_at=1), store, now=START)
    record(store, RENEWAL - 60, at("2026-11-13T13:07:00"), 3)
    record(store, RENEWAL + 60, at("2026-11-13T13:38:00"), 5)
    before = current_usage(
        CUSTOMER,
        included={"m": 0},
        store=store,
        now=datetime.fromtimestamp(RENEWAL - 1, UTC),
    )
    after = current_usage(
        CUSTOMER,
        included={"m": 0},
        store=store,
        now=datetime.fromtimestamp(RENEWAL, UTC),
    )
    assert (before.period.end, before.meters[0].quantity) == (
        datetime.fromtimestamp(RENEWAL, UTC),
        3,
    )
    assert (after.period.start, after.period.end, after.meters[0].quantity) == (
        datetime.fromtimestamp(RENEWAL, UTC),
        datetime.fromtimestamp(NEXT, UTC),
        5,
    )


def test_an_anchor_reset_cuts_the_counter_and_later_records_never_undo_the_cut(store):
    sync(subscription((RENEWAL, NEXT), read_at=1), store, now=RENEWAL)
    record(store, RENEWAL + 60, RENEWAL + 30, 4)
    reset = at("2026-11-20T10:11:12")
    result = sync(subscription((reset, at("2026-12-20T10:11:12")), 2, reset), store, now=reset)
    assert result.counters_cut == 1
    # A late event from before the reset adds to the cut counter: its end stays the reset.
    record(store, reset + 30, reset - 3600, 2)
    [counter] = store.customer_counters(CUSTOMER, "2026-11-13T13:37:12Z")
    assert (counter.quantity, counter.period_end) == (6, reset)
    stripe = FakeBilling()
    Flusher(store, stripe, time_left=lambda: 900, clock=FakeClock(reset + 300)).run()
    [sent] = stripe.delivered.values()
    assert (sent.value, sent.timestamp) == (6, at("2026-11-20T10:10:59"))  # its last whole minute


def test_a_handled_stripe_event_is_remembered(store):
    assert store.stripe_event_handled("evt_1") is False
    store.remember_stripe_event("evt_1", RENEWAL)
    assert store.stripe_event_handled("evt_1") is True


class _ReadBefore:
    """The store as a record request sees it when it read the billing before a sync wrote."""

    def __init__(self, store: DynamoStore) -> None:
        self._store = store
        self._billing = store.customer_billings([CUSTOMER])

    def customer_billings(self, customers):
        return self._billing

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_record_that_read_the_period_before_a_cut_does_not_undo_it(store):
    sync(subscription((RENEWAL, NEXT), read_at=1), store, now=RENEWAL)
    record(store, RENEWAL + 60, RENEWAL + 30, 4)
    stale = _ReadBefore(store)  # a record request reads the old period (ending NEXT) ...
    reset = at("2026-11-20T10:11:12")
    sync(subscription((reset, at("2026-12-20T10:11:12")), 2, reset), store, now=reset)
    record(stale, reset - 5, reset - 10, 1)  # ... and writes after the cut
    [counter] = store.customer_counters(CUSTOMER, "2026-11-13T13:37:12Z")
    assert (counter.quantity, counter.period_end) == (5, reset)
