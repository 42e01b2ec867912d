"""Accepting usage (logic/record.py) at its edges (issue 15, mutation testing): what a client is
told when an event is refused, what the store keeps for an accepted one, what "the same body"
means for a replay, and when a subscription's period stops taking usage."""

import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.fakes import InMemoryStore
from usage_meter.errors import IdempotencyConflict, PeriodClosed, ValidationFailed
from usage_meter.logic.record import LateUsage, event_id, record_events
from usage_meter.logic.subscriptions import sync
from usage_meter.models.domain import ItemPeriods, SubscriptionRead
from usage_meter.models.input import EventIn

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
METERS = {"ai_messages", "api_calls"}


def event(**changes: object) -> EventIn:
    fields = {"stripe_customer_id": "cus_A1", "meter": "ai_messages", "quantity": 3}
    return EventIn.model_validate({**fields, **changes})


def record(store, *events: EventIn, now: datetime = NOW, batch: bool = False, **kwargs):
    return record_events(list(events), meters=METERS, store=store, now=now, batch=batch, **kwargs)


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


# -- what a refused event is told ------------------------------------------------------------------


def test_an_unknown_meter_is_told_the_configured_meters_in_order():
    with pytest.raises(ValidationFailed) as raised:
        record(InMemoryStore(), event(meter="gpu_seconds"))
    assert raised.value.code == "validation_error"
    assert raised.value.details == [
        {"field": "meter", "message": "unknown meter; configured: ai_messages, api_calls"}
    ]


def test_a_timestamp_too_far_ahead_is_told_the_five_minute_limit():
    # Given an event stamped one second past the 5 minutes Stripe allows ahead
    too_soon = event(timestamp=unix(NOW + timedelta(minutes=5, seconds=1)))
    # When it is recorded, Then the client is told why, on the timestamp field
    with pytest.raises(ValidationFailed) as raised:
        record(InMemoryStore(), too_soon)
    assert raised.value.details == [
        {"field": "timestamp", "message": "more than 5 minutes in the future"}
    ]


def test_a_timestamp_too_old_is_told_the_33_day_limit():
    too_old = event(timestamp=unix(NOW - timedelta(days=33, seconds=1)))
    with pytest.raises(ValidationFailed) as raised:
        record(InMemoryStore(), too_old)
    assert raised.value.details == [
        {"field": "timestamp", "message": "older than 33 days; Stripe would refuse it"}
    ]


def test_every_problem_of_every_event_is_reported_at_once_and_nothing_stored():
    # Given a batch whose second event has both an unknown meter and a future timestamp
    store = InMemoryStore()
    bad = event(meter="gpu_seconds", timestamp=unix(NOW + timedelta(hours=1)))
    # When it is recorded
    with pytest.raises(ValidationFailed) as raised:
        record(store, event(), bad, batch=True)
    # Then both problems are named with the event's index, and nothing is stored
    assert [d["field"] for d in raised.value.details] == [
        "events[1].meter",
        "events[1].timestamp",
    ]
    assert store.events == {}


def test_a_key_repeated_in_a_batch_names_the_event_it_repeats():
    with pytest.raises(ValidationFailed) as raised:
        record(
            InMemoryStore(),
            event(idempotency_key="a"),
            event(idempotency_key="k"),
            event(idempotency_key="k"),
            batch=True,
        )
    assert raised.value.details == [
        {
            "field": "events[2].idempotency_key",
            "message": "repeats the idempotency key of events[1]",
        }
    ]


def test_the_same_key_for_two_customers_in_one_batch_is_two_events():
    store = InMemoryStore()
    results = record(
        store,
        event(idempotency_key="k"),
        event(idempotency_key="k", stripe_customer_id="cus_B2"),
        batch=True,
    )
    assert [r.duplicate for r in results] == [False, False]
    assert len(store.events) == 2


def test_a_single_events_conflict_names_the_key_and_says_why():
    # Given an event stored under key k
    store = InMemoryStore()
    record(store, event(idempotency_key="k"))
    # When the same key comes with another quantity
    with pytest.raises(IdempotencyConflict) as raised:
        record(store, event(idempotency_key="k", quantity=4))
    # Then the 409's details name the body's field, not a batch index, and nothing changes
    assert raised.value.code == "idempotency_conflict"
    assert raised.value.details == [
        {
            "field": "idempotency_key",
            "message": "this idempotency key was used with a different body",
        }
    ]
    assert [e.quantity for e in store.events.values()] == [3]


# -- what "the same body" means --------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"meter": "api_calls"},
        {"timestamp": unix(NOW - timedelta(minutes=1))},
    ],
    ids=["another meter", "another timestamp"],
)
def test_a_key_reused_with_another_meter_or_time_is_a_conflict(change):
    store = InMemoryStore()
    record(store, event(idempotency_key="k", timestamp=unix(NOW)))
    with pytest.raises(IdempotencyConflict):
        record(store, event(**{"idempotency_key": "k", "timestamp": unix(NOW), **change}))


def test_a_replay_with_the_same_timestamp_in_another_offset_is_a_replay():
    store = InMemoryStore()
    [first] = record(store, event(idempotency_key="k", timestamp="2026-11-26T08:00:00Z"))
    [again] = record(store, event(idempotency_key="k", timestamp="2026-11-26T09:00:00+01:00"))
    assert (again.id, again.duplicate) == (first.id, True)


# -- what the store keeps --------------------------------------------------------------------------


def test_a_keyed_events_id_derives_from_customer_and_key_only():
    # The id is what makes a replay hit the same item: stable across calls and processes.
    assert event_id("cus_A1", "k") == event_id("cus_A1", "k")
    assert re.fullmatch(r"ev_[0-9a-f]{32}", event_id("cus_A1", "k"))
    assert event_id("cus_A1", "k") != event_id("cus_A1", "k2")


def test_events_without_a_key_are_each_stored_and_counted():
    # Given two identical events without an idempotency key
    store = InMemoryStore()
    # When both are recorded
    results = record(store, event(), event(), batch=True)
    # Then both are new, with distinct ids, and both count
    assert [r.duplicate for r in results] == [False, False]
    assert results[0].id != results[1].id and all(r.id.startswith("ev_") for r in results)
    assert sorted(e.quantity for e in store.events.values()) == [3, 3]


def test_the_stored_event_keeps_its_time_its_arrival_and_its_key():
    store = InMemoryStore()
    when = NOW - timedelta(days=2, seconds=7)
    [result] = record(store, event(idempotency_key="k", timestamp=unix(when), quantity=5))
    stored = store.events[result.id]
    assert (stored.customer, stored.meter, stored.quantity) == ("cus_A1", "ai_messages", 5)
    assert (stored.event_time, stored.received_at) == (unix(when), unix(NOW))
    assert stored.idempotency_key == "k"


def test_an_event_without_a_timestamp_happens_when_it_is_received():
    store = InMemoryStore()
    [result] = record(store, event())
    stored = store.events[result.id]
    assert stored.event_time == stored.received_at == unix(NOW)
    assert stored.idempotency_key is None


# -- a subscription's period closes ----------------------------------------------------------------

CUSTOMER = "cus_Anchor1"
START, RENEWAL = (
    unix(datetime(2026, 10, 13, 13, 37, 12, tzinfo=UTC)),
    unix(datetime(2026, 11, 13, 13, 37, 12, tzinfo=UTC)),
)
# Stripe's default 1 hour grace, less the flush's 15 minute margin: the old period closes here.
CLOSES = datetime(2026, 11, 13, 14, 22, 12, tzinfo=UTC)
IN_OLD_PERIOD = "2026-11-13T13:00:00Z"


def subscribed_store() -> InMemoryStore:
    store = InMemoryStore()
    item = ItemPeriods(
        item="si_1",
        meter="ai_messages",
        anchor=START,
        interval="month",
        periods=((START, RENEWAL),),
        renews=True,
    )
    read = SubscriptionRead(
        id="sub_1",
        customer=CUSTOMER,
        status="active",
        read_at=1,
        start_date=START,
        ended_at=None,
        items=(item,),
    )
    sync(read, store, now=START)
    return store


def late_event(**changes: object) -> EventIn:
    return event(stripe_customer_id=CUSTOMER, timestamp=IN_OLD_PERIOD, **changes)


def test_by_default_the_old_period_takes_usage_until_45_minutes_after_it_ends():
    # Given the default late-usage settings (nothing passed)
    store = subscribed_store()
    # When an event of the old period arrives one second before it closes, Then it is accepted
    [accepted] = record(store, late_event(), now=CLOSES - timedelta(seconds=1))
    assert accepted.duplicate is False
    # And at the closing second it is refused
    with pytest.raises(PeriodClosed):
        record(store, late_event(), now=CLOSES)


def test_a_refused_late_event_is_told_the_period_and_when_it_closed():
    store = subscribed_store()
    with pytest.raises(PeriodClosed) as raised:
        record(store, late_event(), now=CLOSES)
    assert raised.value.code == "period_closed"
    assert raised.value.message == "usage for a closed billing period"
    assert raised.value.details == [
        {
            "field": "timestamp",
            "type": "period_closed",
            "message": "the billing period 2026-10-13T13:37:12Z to 2026-11-13T13:37:12Z closed "
            "at 2026-11-13T14:22:12Z: Stripe finalizes its invoice and would not bill this usage",
        }
    ]
    assert store.events == {}


def test_a_grace_shorter_than_the_flush_margin_closes_the_period_at_its_end():
    store = subscribed_store()
    late = LateUsage(grace_seconds=600)
    with pytest.raises(PeriodClosed) as raised:
        record(store, late_event(), now=datetime(2026, 11, 13, 13, 37, 12, tzinfo=UTC), late=late)
    assert "closed at 2026-11-13T13:37:12Z" in raised.value.details[0]["message"]


def test_in_a_batch_the_late_event_is_named_by_index_and_nothing_is_stored():
    store = subscribed_store()
    on_time = event(stripe_customer_id=CUSTOMER)
    with pytest.raises(PeriodClosed) as raised:
        record(store, on_time, late_event(), now=CLOSES, batch=True)
    assert [d["field"] for d in raised.value.details] == ["events[1].timestamp"]
    assert store.events == {}


def test_a_late_event_without_a_key_is_refused_even_when_a_keyed_one_replays():
    # Given a keyed late event stored while its period was open
    store = subscribed_store()
    record(store, late_event(idempotency_key="k"), now=CLOSES - timedelta(minutes=1))
    # When, after the close, its replay comes in a batch with a new unkeyed late event
    with pytest.raises(PeriodClosed) as raised:
        record(store, late_event(idempotency_key="k"), late_event(), now=CLOSES, batch=True)
    # Then only the new one is refused
    assert [d["field"] for d in raised.value.details] == ["events[1].timestamp"]
    assert len(store.events) == 1


def test_a_replayed_late_event_answers_as_a_replay_in_a_batch():
    store = subscribed_store()
    [first] = record(store, late_event(idempotency_key="k"), now=CLOSES - timedelta(minutes=1))
    results = record(
        store,
        late_event(idempotency_key="k"),
        late_event(idempotency_key="k2", quantity=1),
        now=CLOSES,
        batch=True,
        late=LateUsage(policy="current_period"),
    )
    assert (results[0].id, results[0].duplicate) == (first.id, True)
    assert results[1].duplicate is False


def test_with_current_period_a_late_event_is_stored_in_the_period_it_is_billed_in():
    store = subscribed_store()
    [result] = record(store, late_event(), now=CLOSES, late=LateUsage(policy="current_period"))
    stored = store.events[result.id]
    assert (stored.period.start, stored.period.source) == (
        datetime.fromtimestamp(RENEWAL, UTC),
        "stripe_subscription",
    )
    # the event keeps the time it happened
    assert stored.event_time == unix(datetime(2026, 11, 13, 13, tzinfo=UTC))


def test_replays_of_late_events_after_the_close_answer_as_replays():
    # Given two keyed events of the old period stored while it was open
    store = subscribed_store()
    stored = record(
        store,
        late_event(idempotency_key="a"),
        late_event(idempotency_key="b"),
        now=CLOSES - timedelta(minutes=1),
        batch=True,
    )
    # When both are replayed after the close, alone and in a batch
    [alone] = record(store, late_event(idempotency_key="a"), now=CLOSES)
    again = record(
        store,
        late_event(idempotency_key="a"),
        late_event(idempotency_key="b"),
        now=CLOSES,
        batch=True,
    )
    # Then each answers as the replay of its original, and nothing more is stored
    assert (alone.id, alone.duplicate) == (stored[0].id, True)
    assert [(r.id, r.duplicate) for r in again] == [(s.id, True) for s in stored]
    assert len(store.events) == 2


class ChunkedStore(InMemoryStore):
    """Writes a batch one transaction per event, in order, stopping at a reused key: as the
    DynamoDB store does once a batch outgrows one transaction."""

    def put_events(self, events):
        existing: dict[str, str] = {}
        for one in events:
            existing.update(super().put_events([one]))
            if one.id in existing and existing[one.id] != one.fingerprint:
                break
        return existing


def test_a_batch_whose_last_event_conflicts_stores_nothing_even_if_written_in_chunks():
    # Given a key stored with quantity 3, and a store that writes batches in several transactions
    store = ChunkedStore()
    record(store, event(idempotency_key="k"))
    # When a batch of new events ends with that key and another quantity
    with pytest.raises(IdempotencyConflict) as raised:
        record(
            store,
            event(idempotency_key="new1"),
            event(idempotency_key="new2"),
            event(idempotency_key="k", quantity=9),
            batch=True,
        )
    # Then the 409 names it, and none of the new events was stored before it was found
    assert [d["field"] for d in raised.value.details] == ["events[2].idempotency_key"]
    assert len(store.events) == 1
