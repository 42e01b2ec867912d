"""Stripe billing periods: the anchor's schedule, prediction, fallbacks, merging and cuts."""

from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling, FakeClock, InMemoryStore
from usage_meter.errors import PeriodClosed
from usage_meter.logic.flush import Flusher
from usage_meter.logic.periods import is_closed, period_for, schedule_point, scheduled_period
from usage_meter.logic.quarantine import ReplayRefused, replay
from usage_meter.logic.record import LateUsage, record_events
from usage_meter.logic.subscriptions import merge, sync
from usage_meter.logic.usage import current_usage
from usage_meter.models.domain import (
    CustomerBilling,
    ItemPeriods,
    Subscription,
    SubscriptionRead,
)
from usage_meter.models.input import EventIn

CUSTOMER = "cus_Anchor1"


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


RENEWAL = at("2026-11-13T13:37:12")  # a period boundary at an arbitrary second
PREVIOUS = at("2026-10-13T13:37:12")


def item(
    periods: tuple[tuple[int, int], ...],
    *,
    meter: str = "ai_messages",
    anchor: int = PREVIOUS,
    renews: bool = True,
    interval: str = "month",
) -> ItemPeriods:
    return ItemPeriods(
        item=f"si_{meter}",
        meter=meter,
        anchor=anchor,
        interval=interval,  # type: ignore[arg-type]
        periods=periods,
        renews=renews,
    )


def billing(*items: ItemPeriods) -> CustomerBilling:
    subscription = Subscription(
        id="sub_1", customer=CUSTOMER, status="active", read_at=0, items=items
    )
    return CustomerBilling(customer=CUSTOMER, subscriptions={"sub_1": subscription})


def read(
    current: tuple[int, int],
    *,
    read_at: float,
    anchor: int = PREVIOUS,
    ended_at: int | None = None,
    start_date: int = PREVIOUS,
    meter: str = "ai_messages",
) -> SubscriptionRead:
    renews = ended_at is None
    return SubscriptionRead(
        id="sub_1",
        customer=CUSTOMER,
        status="canceled" if ended_at else "active",
        read_at=read_at,
        start_date=start_date,
        ended_at=ended_at,
        items=(item((current,), anchor=anchor, renews=renews, meter=meter),),
    )


# -- the anchor's schedule -------------------------------------------------------------------


def test_months_from_a_31st_anchor_clamp_to_the_month_end_and_keep_the_second():
    anchor = at("2027-01-31T13:37:12")
    points = [schedule_point(anchor, "month", 1, n) for n in range(4)]
    assert points == [
        anchor,
        at("2027-02-28T13:37:12"),
        at("2027-03-31T13:37:12"),
        at("2027-04-30T13:37:12"),
    ]
    assert schedule_point(at("2028-01-31T00:00:01"), "month", 1, 1) == at("2028-02-29T00:00:01")
    assert schedule_point(anchor, "month", 1, -2) == at("2026-11-30T13:37:12")


@pytest.mark.parametrize(
    ("interval", "count", "when", "expected"),
    [
        ("month", 1, "2026-11-13T13:37:11", ("2026-10-13T13:37:12", "2026-11-13T13:37:12")),
        ("month", 1, "2026-11-13T13:37:12", ("2026-11-13T13:37:12", "2026-12-13T13:37:12")),
        ("month", 3, "2027-02-01T00:00:00", ("2027-01-13T13:37:12", "2027-04-13T13:37:12")),
        ("week", 2, "2026-10-27T13:37:12", ("2026-10-27T13:37:12", "2026-11-10T13:37:12")),
        ("day", 1, "2026-10-12T00:00:00", ("2026-10-11T13:37:12", "2026-10-12T13:37:12")),
        ("year", 1, "2028-02-01T00:00:00", ("2027-10-13T13:37:12", "2028-10-13T13:37:12")),
    ],
)
def test_the_scheduled_period_contains_the_moment(interval, count, when, expected):
    found = scheduled_period(PREVIOUS, interval, count, at(when))
    assert found == (at(expected[0]), at(expected[1]))


# -- which period an event belongs to ----------------------------------------------------------


def test_usage_either_side_of_a_renewal_at_an_arbitrary_second_lands_in_its_own_period():
    known = billing(item(((PREVIOUS, RENEWAL),)))
    before = period_for(known, "ai_messages", moment("2026-11-13T13:07:00"))
    after = period_for(known, "ai_messages", moment("2026-11-13T13:38:00"))
    assert (before.start, before.end, before.source) == (
        moment("2026-10-13T13:37:12"),
        moment("2026-11-13T13:37:12"),
        "stripe_subscription",
    )
    # The renewal is predicted from the anchor before any webhook says so.
    assert (after.start, after.end, after.source) == (
        moment("2026-11-13T13:37:12"),
        moment("2026-12-13T13:37:12"),
        "stripe_subscription",
    )


def test_a_customer_with_no_subscription_has_calendar_months():
    for known in (None, CustomerBilling(customer=CUSTOMER)):
        period = period_for(known, "ai_messages", moment("2026-11-13T13:07:00"))
        assert (period.start, period.end, period.source) == (
            moment("2026-11-01T00:00:00"),
            moment("2026-12-01T00:00:00"),
            "calendar_month",
        )


def test_after_a_cancellation_nothing_is_predicted_and_the_month_starts_at_the_end():
    ended = at("2026-11-20T09:00:00")
    known = billing(item(((PREVIOUS, RENEWAL), (RENEWAL, ended)), renews=False))
    period = period_for(known, "ai_messages", moment("2026-11-25T00:00:00"))
    assert (period.start, period.end, period.source) == (
        moment("2026-11-20T09:00:00"),
        moment("2026-12-01T00:00:00"),
        "calendar_month",
    )


def test_usage_before_a_subscription_starts_is_not_put_in_its_first_period():
    start = at("2026-11-15T10:00:00")
    known = billing(item(((start, at("2026-12-15T10:00:00")),), anchor=start))
    period = period_for(known, "ai_messages", moment("2026-11-10T00:00:00"))
    assert (period.start, period.end) == (moment("2026-11-01"), moment("2026-11-15T10:00:00"))


def test_a_meter_on_no_item_follows_the_customers_cycle():
    known = billing(item(((PREVIOUS, RENEWAL),), meter="api_calls"))
    period = period_for(known, "ai_messages", moment("2026-11-01T00:00:00"))
    assert (period.start, period.source) == (moment("2026-10-13T13:37:12"), "stripe_subscription")


# -- merging what Stripe says ------------------------------------------------------------------


def test_a_renewal_keeps_the_previous_period():
    known = merge(None, read((PREVIOUS, RENEWAL), read_at=1), now=RENEWAL)
    renewed = merge(known, read((RENEWAL, at("2026-12-13T13:37:12")), read_at=2), now=RENEWAL)
    assert renewed.items[0].periods == (
        (PREVIOUS, RENEWAL),
        (RENEWAL, at("2026-12-13T13:37:12")),
    )


def test_an_anchor_reset_cuts_the_current_period_where_the_new_one_starts():
    known = merge(None, read((RENEWAL, at("2026-12-13T13:37:12")), read_at=1), now=RENEWAL)
    reset = at("2026-11-20T10:11:12")
    changed = merge(
        known, read((reset, at("2026-12-20T10:11:12")), read_at=2, anchor=reset), now=reset
    )
    assert changed.items[0].periods[-2:] == (
        (RENEWAL, reset),
        (reset, at("2026-12-20T10:11:12")),
    )


def test_a_cancellation_ends_every_period_at_ended_at():
    known = merge(None, read((RENEWAL, at("2026-12-13T13:37:12")), read_at=1), now=RENEWAL)
    ended = at("2026-11-20T10:11:12")
    canceled = merge(
        known,
        read((RENEWAL, at("2026-12-13T13:37:12")), read_at=2, ended_at=ended),
        now=ended,
    )
    assert canceled.items[0].periods[-1] == (RENEWAL, ended)
    assert canceled.items[0].renews is False


def test_the_backfill_derives_the_previous_period_from_the_anchor():
    first = merge(
        None,
        read((RENEWAL, at("2026-12-13T13:37:12")), read_at=1, start_date=at("2026-10-20")),
        now=RENEWAL,
    )
    # The subscription started after the previous scheduled boundary: its first period is short.
    assert first.items[0].periods == (
        (at("2026-10-20"), RENEWAL),
        (RENEWAL, at("2026-12-13T13:37:12")),
    )


def test_an_older_read_never_replaces_a_newer_one():
    store = InMemoryStore()
    newer = read((RENEWAL, at("2026-12-13T13:37:12")), read_at=20)
    older = read((PREVIOUS, RENEWAL), read_at=10)
    assert sync(newer, store, now=RENEWAL).stale is False
    assert sync(older, store, now=RENEWAL).stale is True
    stored = store.customer_billing(CUSTOMER).subscriptions["sub_1"]
    assert stored.items[0].periods[-1] == (RENEWAL, at("2026-12-13T13:37:12"))


# -- recording, reading and flushing with Stripe periods ---------------------------------------


def event(when: str, quantity: int = 1, key: str | None = None) -> EventIn:
    return EventIn(
        stripe_customer_id=CUSTOMER,
        meter="ai_messages",
        quantity=quantity,
        timestamp=f"{when}Z",
        idempotency_key=key,
    )


def subscribed_store() -> InMemoryStore:
    store = InMemoryStore()
    sync(read((PREVIOUS, RENEWAL), read_at=1), store, now=PREVIOUS)
    return store


def record(store: InMemoryStore, now: str, *events: EventIn, late: LateUsage | None = None):
    return record_events(
        list(events),
        meters={"ai_messages"},
        store=store,
        now=moment(now),
        batch=len(events) > 1,
        late=late or LateUsage(),
    )


def flush(store: InMemoryStore, billing_: FakeBilling, now: str) -> None:
    Flusher(store, billing_, time_left=lambda: 900, clock=FakeClock(at(now))).run()


def test_a_renewal_at_13_37_12_bills_13_07_and_13_38_each_in_its_own_period():
    store, stripe = subscribed_store(), FakeBilling()
    record(store, "2026-11-13T13:07:30", event("2026-11-13T13:07:00", 3))
    before = current_usage(
        CUSTOMER, included={"ai_messages": 2}, store=store, now=moment("2026-11-13T13:08:00")
    )
    assert (before.period.start, before.meters[0].quantity) == (moment("2026-10-13T13:37:12"), 3)
    record(store, "2026-11-13T13:38:30", event("2026-11-13T13:38:00", 5))
    after = current_usage(
        CUSTOMER, included={"ai_messages": 2}, store=store, now=moment("2026-11-13T13:39:00")
    )
    assert (after.period.start, after.period.end, after.period.source) == (
        moment("2026-11-13T13:37:12"),
        moment("2026-12-13T13:37:12"),
        "stripe_subscription",
    )
    assert (after.meters[0].quantity, after.meters[0].billable) == (5, 3)
    flush(store, stripe, "2026-11-13T13:40:00")
    stamps = sorted((r.timestamp, r.value) for r in stripe.delivered.values())
    # The ended period's units carry its last whole minute's last second (13:36:59: Stripe's
    # summaries are minute-aligned, so they reconcile); the new one's the flush time.
    assert stamps == [(at("2026-11-13T13:36:59"), 3), (at("2026-11-13T13:40:00"), 5)]


def test_an_anchor_reset_learned_later_cuts_the_counter_so_its_units_stay_before_it():
    store, stripe = subscribed_store(), FakeBilling()
    record(store, "2026-10-20T08:00:00", event("2026-10-20T08:00:00", 4))
    reset = at("2026-10-25T12:00:07")
    sync(read((reset, at("2026-11-25T12:00:07")), read_at=2, anchor=reset), store, now=reset + 5)
    record(store, "2026-10-25T12:01:00", event("2026-10-25T12:00:30", 6))
    flush(store, stripe, "2026-10-25T12:05:00")
    assert sorted((r.timestamp, r.value) for r in stripe.delivered.values()) == [
        (at("2026-10-25T11:59:59"), 4),
        (at("2026-10-25T12:05:00"), 6),
    ]


def test_late_usage_is_refused_with_the_period_named_or_billed_in_the_current_period():
    store = subscribed_store()
    # 45 minutes after the renewal, with Stripe's 1 hour grace, the old period still takes usage.
    record(store, "2026-11-13T14:22:11", event("2026-11-13T13:00:00", 1))
    with pytest.raises(PeriodClosed) as refused:
        record(store, "2026-11-13T14:22:12", event("2026-11-13T13:00:00", 2, key="late"))
    assert refused.value.code == "period_closed"
    [detail] = refused.value.details
    assert detail["field"] == "timestamp"
    assert "2026-10-13T13:37:12Z to 2026-11-13T13:37:12Z" in detail["message"]
    # current_period: the same event counts in the period it is billed in.
    record(
        store,
        "2026-11-13T14:22:12",
        event("2026-11-13T13:00:00", 2, key="late"),
        late=LateUsage(policy="current_period"),
    )
    usage = current_usage(
        CUSTOMER, included={"ai_messages": 0}, store=store, now=moment("2026-11-13T14:23:00")
    )
    assert (usage.period.start, usage.meters[0].quantity) == (moment("2026-11-13T13:37:12"), 2)
    # A replay of it, once the period is closed, still answers as a replay.
    [again] = record(store, "2026-11-13T15:00:00", event("2026-11-13T13:00:00", 2, key="late"))
    assert again.duplicate is True


def test_a_longer_grace_keeps_the_period_open_longer():
    store = subscribed_store()
    late = LateUsage(grace_seconds=72 * 3600)
    record(store, "2026-11-16T13:00:00", event("2026-11-13T13:00:00", 1), late=late)
    period = period_for(store.customer_billing(CUSTOMER), "ai_messages", moment("2026-11-13"))
    assert not is_closed(period, moment("2026-11-16T13:22:11"), 72 * 3600)
    assert is_closed(period, moment("2026-11-16T13:22:12"), 72 * 3600)


def test_a_flush_after_the_invoice_finalized_quarantines_instead_of_sending():
    store, stripe = subscribed_store(), FakeBilling()
    record(store, "2026-11-13T13:07:30", event("2026-11-13T13:07:00", 3))
    flush(store, stripe, "2026-11-13T14:37:12")  # the grace period is over
    assert stripe.delivered == {}
    [held] = store.quarantined()
    assert held.quarantine_reason and held.quarantine_reason.startswith("period_closed")
    # The operator bills them in the current period instead.
    with pytest.raises(ReplayRefused, match="replay it with restamp"):
        replay(store, held.id, now=at("2026-11-13T15:00:00"))
    replay(store, held.id, now=at("2026-11-13T15:00:00"), restamp=True)
    flush(store, stripe, "2026-11-13T15:05:00")
    [sent] = stripe.delivered.values()
    assert (sent.value, sent.timestamp) == (3, at("2026-11-13T15:05:00"))


def test_stamps_stay_inside_the_periods_whole_minutes_so_they_reconcile():
    store, stripe = subscribed_store(), FakeBilling()
    record(store, "2026-11-13T13:37:20", event("2026-11-13T13:37:15", 2))
    # Flushed in the new period's first partial minute: stamped at its first whole minute,
    # 30 s ahead (Stripe takes up to 5 minutes ahead)
    flush(store, stripe, "2026-11-13T13:37:30")
    [sent] = stripe.delivered.values()
    assert sent.timestamp == at("2026-11-13T13:38:00")
