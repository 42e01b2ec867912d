"""Keeping billing periods in step with Stripe, at the edges (issue 15, mutation testing: what a
changed line of logic/subscriptions.py would get wrong that tests/unit/test_periods.py and
tests/unit/test_webhooks.py do not see): a plan change that swaps a meter, the backfill's first
period, re-reads, forgotten periods, counters cut per meter, and what a sync reports."""

from datetime import UTC, datetime

import pytest

from tests.fakes import InMemoryStore
from tests.unit.test_periods import CUSTOMER, PREVIOUS, RENEWAL, at, item, read
from usage_meter.errors import StoreUnavailable
from usage_meter.logic.record import record_events
from usage_meter.logic.subscriptions import (
    KEEP_PERIODS,
    SyncResult,
    WebhookOutcome,
    handle_subscription_event,
    merge,
    sync,
)
from usage_meter.models.domain import SubscriptionRead
from usage_meter.models.input import EventIn

NEXT = at("2026-12-13T13:37:12")


def test_a_meter_swapped_out_by_a_plan_change_keeps_its_past_and_stops_renewing():
    # Given a subscription billing meter "old", then read again billing "new" from a reset
    known = merge(None, read((PREVIOUS, RENEWAL), read_at=1, meter="old"), now=PREVIOUS)
    reset = at("2026-11-01T00:00:00")
    swapped = merge(known, read((reset, NEXT), read_at=2, meter="new", anchor=reset), now=reset)
    # Then "old" keeps its period up to where "new" starts, and predicts nothing after it
    old = next(i for i in swapped.items if i.meter == "old")
    assert old.periods == ((PREVIOUS, reset),) and old.renews is False
    assert [i.meter for i in swapped.items] == ["new", "old"]


def test_a_subscription_left_without_items_ends_its_meters_when_it_was_read():
    known = merge(None, read((PREVIOUS, RENEWAL), read_at=1), now=PREVIOUS)
    emptied = read((PREVIOUS, RENEWAL), read_at=PREVIOUS + 100).model_copy(update={"items": ()})
    [kept] = merge(known, emptied, now=PREVIOUS + 100).items
    assert kept.periods == ((PREVIOUS, PREVIOUS + 100),) and kept.renews is False


def test_reading_the_same_period_again_changes_nothing():
    first = merge(None, read((PREVIOUS, RENEWAL), read_at=1), now=PREVIOUS)
    again = merge(first, read((PREVIOUS, RENEWAL), read_at=2), now=PREVIOUS)
    assert again.items == first.items


def test_a_canceled_subscription_predicts_no_renewal_on_any_item():
    read_canceled = read((RENEWAL, NEXT), read_at=2, ended_at=RENEWAL + 60)
    read_canceled = read_canceled.model_copy(
        update={"items": tuple(i.model_copy(update={"renews": True}) for i in read_canceled.items)}
    )
    [ended] = merge(None, read_canceled, now=RENEWAL + 60).items
    assert ended.renews is False and ended.periods[-1] == (RENEWAL, RENEWAL + 60)


def test_a_period_is_forgotten_exactly_when_it_ended_keep_periods_ago():
    known = merge(None, read((PREVIOUS, RENEWAL), read_at=1), now=PREVIOUS)
    renewed = read((RENEWAL, NEXT), read_at=2)
    kept = merge(known, renewed, now=RENEWAL + KEEP_PERIODS - 1).items[0].periods
    forgotten = merge(known, renewed, now=RENEWAL + KEEP_PERIODS).items[0].periods
    assert kept == ((PREVIOUS, RENEWAL), (RENEWAL, NEXT)) and forgotten == ((RENEWAL, NEXT),)


@pytest.mark.parametrize(
    ("start_date", "anchor"),
    [(RENEWAL, PREVIOUS), (PREVIOUS, RENEWAL)],
    ids=["started-with-this-period", "anchored-at-this-period"],
)
def test_the_backfill_derives_no_earlier_period_before_the_subscription_or_its_anchor(
    start_date, anchor
):
    first = merge(None, read((RENEWAL, NEXT), read_at=1, start_date=start_date, anchor=anchor), 0)
    assert first.items[0].periods == ((RENEWAL, NEXT),)


def test_the_backfill_derives_the_previous_period_on_the_items_own_interval():
    # Given a yearly item first seen in its second year
    year_start, next_year = at("2026-03-01T00:00:00"), at("2027-03-01T00:00:00")
    yearly = read((year_start, next_year), read_at=1, anchor=at("2025-03-01T00:00:00"))
    yearly = yearly.model_copy(
        update={
            "start_date": at("2025-03-01T00:00:00"),
            "items": (item(((year_start, next_year),), anchor=at("2025-03-01"), interval="year"),),
        }
    )
    # Then the period before is the previous year, not the previous month
    periods = merge(None, yearly, now=year_start).items[0].periods
    assert periods == ((at("2025-03-01T00:00:00"), year_start), (year_start, next_year))


def test_a_sync_reports_what_it_stored_and_a_repeated_read_is_stale():
    store = InMemoryStore()
    fresh = read((PREVIOUS, RENEWAL), read_at=5)
    assert sync(fresh, store, now=PREVIOUS) == SyncResult("sub_1", CUSTOMER, "active", False, 0)
    # The same read delivered again changes nothing
    assert sync(fresh, store, now=PREVIOUS) == SyncResult("sub_1", CUSTOMER, "active", True)
    # A canceled read after it is stored, and reports its own status
    canceled = read((PREVIOUS, RENEWAL), read_at=6, ended_at=RENEWAL - 60)
    assert sync(canceled, store, now=RENEWAL - 60).status == "canceled"
    stale = read((PREVIOUS, RENEWAL), read_at=5)
    assert sync(stale, store, now=RENEWAL).status == "canceled"


def test_a_sync_merges_into_what_the_store_knew():
    # Given three renewals read one after the other
    store, before = InMemoryStore(), at("2026-09-13T13:37:12")
    for n, period in enumerate([(before, PREVIOUS), (PREVIOUS, RENEWAL), (RENEWAL, NEXT)]):
        sync(read(period, read_at=n, anchor=before), store, now=RENEWAL + 86_400)
    # Then the store knows all three periods, not only what the last read implies
    [stored] = store.customer_billing(CUSTOMER).subscriptions.values()
    assert stored.items[0].periods == ((before, PREVIOUS), (PREVIOUS, RENEWAL), (RENEWAL, NEXT))


def test_a_billing_that_keeps_changing_is_unavailable_naming_the_customer():
    store = InMemoryStore()
    store.save_billing = lambda billing, expected_version: False
    with pytest.raises(StoreUnavailable, match=rf"^customer {CUSTOMER}'s billing kept changing"):
        sync(read((PREVIOUS, RENEWAL), read_at=1), store, now=PREVIOUS)


def record(store: InMemoryStore, meter: str, when: datetime, quantity: int = 1) -> None:
    event = EventIn(stripe_customer_id=CUSTOMER, meter=meter, quantity=quantity)
    record_events([event], meters={"a", "b"}, store=store, now=when)


def two_meters(a: tuple[int, int], b: tuple[int, int], read_at: float) -> SubscriptionRead:
    fresh = read(a, read_at=read_at, meter="a")
    both = (*fresh.items, item((b,), meter="b", anchor=b[0]))
    return fresh.model_copy(update={"items": both})


def test_each_counter_is_cut_to_its_own_meters_period_and_counted():
    # Given usage of meters a and b in November, recorded before any subscription was known
    store = InMemoryStore()
    when = datetime(2026, 11, 5, tzinfo=UTC)
    record(store, "a", when)
    record(store, "b", when)
    # When a subscription is learned: a's period ends Nov 13, b's Nov 20
    b_end = at("2026-11-20T00:00:00")
    result = sync(two_meters((PREVIOUS, RENEWAL), (PREVIOUS, b_end), 1), store, now=RENEWAL - 9)
    # Then both counters are cut, each to its own meter's end
    assert result.counters_cut == 2
    ends = {c.meter: c.period_end for c in store.counters.values()}
    assert ends == {"a": RENEWAL, "b": b_end}
    # and a second read with the same periods cuts nothing more
    again = sync(two_meters((PREVIOUS, RENEWAL), (PREVIOUS, b_end), 2), store, now=RENEWAL - 8)
    assert again.counters_cut == 0


class Reader:
    def __init__(self, found: SubscriptionRead | None) -> None:
        self.found = found

    def read(self, subscription_id: str) -> SubscriptionRead | None:
        return self.found


def test_a_webhook_event_reports_its_sync_and_is_remembered_when_handled():
    store = InMemoryStore()
    remembered = []
    store.remember_stripe_event = lambda event_id, at: remembered.append((event_id, at))
    fresh = read((PREVIOUS, RENEWAL), read_at=1)
    outcome = handle_subscription_event(
        "evt_1", "sub_1", reader=Reader(fresh), store=store, now=PREVIOUS + 7
    )
    assert outcome == WebhookOutcome(
        "evt_1", handled=True, sync=SyncResult("sub_1", CUSTOMER, "active", False, 0)
    )
    assert remembered == [("evt_1", PREVIOUS + 7)]


def test_a_webhook_for_a_subscription_that_never_billed_is_handled_without_a_sync():
    store = InMemoryStore()
    outcome = handle_subscription_event(
        "evt_2", "sub_1", reader=Reader(None), store=store, now=PREVIOUS
    )
    assert outcome == WebhookOutcome("evt_2", handled=True, sync=None)
    assert handle_subscription_event(
        "evt_2", "sub_1", reader=Reader(None), store=store, now=PREVIOUS
    ) == WebhookOutcome("evt_2", handled=False)
