from datetime import UTC, datetime, timedelta

import pytest

from tests.fakes import InMemoryStore
from usage_meter.errors import IdempotencyConflict, ValidationFailed
from usage_meter.logic.record import record_events
from usage_meter.models.input import EventIn

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
METERS = {"ai_messages", "api_calls"}


def event(**changes: object) -> EventIn:
    fields = {"stripe_customer_id": "cus_A1", "meter": "ai_messages", "quantity": 3}
    return EventIn.model_validate({**fields, **changes})


def record(store, *events: EventIn, batch: bool = False):
    return record_events(list(events), meters=METERS, store=store, now=NOW, batch=batch)


def counted(store: InMemoryStore, period: str = "2026-11-01T00:00:00Z") -> tuple[int, int]:
    """The period counter's (quantity, reported)."""
    counter = store.counters[("cus_A1", period, "ai_messages", 0)]
    return counter.quantity, counter.reported


def test_a_new_event_is_stored_and_counted():
    store = InMemoryStore()
    [result] = record(store, event())
    assert not result.duplicate
    assert counted(store) == (3, 0)


def test_a_new_event_puts_its_counter_in_the_flush_backlog():
    # Given a counter the flush has reported and taken out of the backlog
    store = InMemoryStore()
    record(store, event())
    store.in_backlog.clear()
    # When a new event adds to it
    record(store, event(quantity=2))
    # Then the counter waits in the backlog again, with the new units unsent
    assert store.in_backlog == {("cus_A1", "2026-11-01T00:00:00Z", "ai_messages", 0)}
    assert counted(store) == (5, 0)


def test_a_replay_with_the_same_key_and_body_changes_nothing():
    # Given an event recorded with an idempotency key
    store = InMemoryStore()
    [first] = record(store, event(idempotency_key="msg_1"))
    # When it is sent again
    [again] = record(store, event(idempotency_key="msg_1"))
    # Then the original id comes back as a duplicate and the counter is unchanged
    assert (again.id, again.duplicate) == (first.id, True)
    assert counted(store) == (3, 0)


def test_the_same_key_with_another_body_is_a_conflict():
    store = InMemoryStore()
    record(store, event(idempotency_key="msg_1"))
    with pytest.raises(IdempotencyConflict):
        record(store, event(idempotency_key="msg_1", quantity=4))
    assert len(store.events) == 1


def test_the_same_key_for_another_customer_is_another_event():
    store = InMemoryStore()
    record(
        store,
        event(idempotency_key="k"),
        event(stripe_customer_id="cus_B2", idempotency_key="k"),
        batch=True,
    )
    assert len(store.events) == 2


def test_a_replay_without_timestamp_matches_the_original_without_timestamp():
    store = InMemoryStore()
    record(store, event(idempotency_key="k"))
    [again] = record_events(
        [event(idempotency_key="k")], meters=METERS, store=store, now=NOW + timedelta(minutes=1)
    )
    assert again.duplicate


def test_an_unknown_meter_is_rejected_and_nothing_stored():
    store = InMemoryStore()
    with pytest.raises(ValidationFailed) as raised:
        record(store, event(meter="gpu_seconds"))
    assert raised.value.details[0]["field"] == "meter"
    assert store.events == {}


@pytest.mark.parametrize(
    "offset", [timedelta(minutes=5, seconds=1), -timedelta(days=33, seconds=1)]
)
def test_timestamps_outside_the_accepted_window_are_rejected(offset):
    with pytest.raises(ValidationFailed) as raised:
        record(InMemoryStore(), event(timestamp=int((NOW + offset).timestamp())))
    assert raised.value.details[0]["field"] == "timestamp"


@pytest.mark.parametrize("offset", [timedelta(minutes=5), -timedelta(days=33)])
def test_timestamps_at_the_window_edges_are_accepted(offset):
    [result] = record(InMemoryStore(), event(timestamp=int((NOW + offset).timestamp())))
    assert not result.duplicate


def test_an_event_from_last_month_counts_in_last_months_period():
    store = InMemoryStore()
    record(store, event(timestamp="2026-10-31T23:59:59Z"))
    assert counted(store, period="2026-10-01T00:00:00Z") == (3, 0)


def test_one_invalid_event_in_a_batch_stores_nothing_and_names_its_index():
    store = InMemoryStore()
    with pytest.raises(ValidationFailed) as raised:
        record(store, event(), event(meter="nope"), event(), batch=True)
    assert [d["field"] for d in raised.value.details] == ["events[1].meter"]
    assert store.events == {}


def test_a_key_repeated_inside_one_batch_is_rejected():
    with pytest.raises(ValidationFailed) as raised:
        record(InMemoryStore(), event(idempotency_key="k"), event(idempotency_key="k"), batch=True)
    assert raised.value.details[0]["field"] == "events[1].idempotency_key"


def test_a_batch_with_a_conflicting_replay_stores_nothing():
    store = InMemoryStore()
    record(store, event(idempotency_key="k"))
    with pytest.raises(IdempotencyConflict) as raised:
        record(
            store, event(idempotency_key="new"), event(idempotency_key="k", quantity=9), batch=True
        )
    assert raised.value.details[0]["field"] == "events[1].idempotency_key"
    assert len(store.events) == 1


def test_a_batch_reports_duplicates_in_request_order():
    store = InMemoryStore()
    record(store, event(idempotency_key="b"))
    results = record(
        store, event(idempotency_key="a"), event(idempotency_key="b"), event(), batch=True
    )
    assert [r.duplicate for r in results] == [False, True, False]
    assert counted(store) == (9, 0)
