"""Asynchronous rejections on DynamoDB Local: the logged decision is taken back into the
quarantine once, whether confirmed or still in flight, and a race with the flush retries."""

import random
from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling, FakeClock
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.logic.rejections import Rejection, take_back
from usage_meter.models.domain import Decision
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore

NOW = 1_795_680_000


@pytest.fixture
def store(local_table):
    return DynamoStore(
        local_table.name, client=local_table.client, clock=lambda: NOW, rng=random.Random(2)
    )


def record(store: DynamoStore, quantity: int) -> None:
    event = EventIn(stripe_customer_id="cus_Async1", meter="m", quantity=quantity)
    record_events([event], meters={"m"}, store=store, now=datetime.fromtimestamp(NOW, UTC))


def test_a_confirmed_decision_is_taken_back_once(store):
    record(store, 9)
    stripe = FakeBilling()
    Flusher(store, stripe, time_left=lambda: 900, clock=FakeClock(NOW + 60)).run()
    [identifier] = stripe.delivered
    sent = store.sent(identifier)
    assert sent is not None and (sent.value, sent.seq, sent.rejected_at) == (9, 1, None)
    assert take_back(Rejection(identifier, "meter_event_customer_not_found"), store, NOW + 300) == (
        "quarantined"
    )
    assert take_back(Rejection(identifier, "meter_event_customer_not_found"), store, NOW + 301) == (
        "already"
    )
    [held] = store.quarantined()
    assert (held.reported, held.quarantined) == (0, 9)


def test_a_decision_in_flight_is_taken_out_of_flight(store):
    record(store, 4)
    stripe = FakeBilling()

    def die(request):
        raise KeyboardInterrupt  # the run dies while Stripe has the call

    stripe.on_call = die
    with pytest.raises(KeyboardInterrupt):
        Flusher(store, stripe, time_left=lambda: 900, clock=FakeClock(NOW + 60)).run()
    [counter] = [c for page in store.backlog() for c in page]
    assert counter.sending is not None
    identifier = counter.identifier(counter.sending)
    assert take_back(Rejection(identifier, "archived_meter"), store, NOW + 300) == "quarantined"
    [held] = store.quarantined()
    assert (held.sending, held.reported, held.quarantined) == (None, 0, 4)


def test_a_stale_read_of_the_counter_is_refused_and_the_retry_reads_again(store):
    record(store, 5)
    stripe = FakeBilling()
    Flusher(store, stripe, time_left=lambda: 900, clock=FakeClock(NOW + 60)).run()
    [identifier] = stripe.delivered
    sent = store.sent(identifier)
    assert sent is not None
    stale = store.counter_of(sent)
    assert stale is not None
    # A decision in flight that the counter no longer has cannot be taken out of flight
    decision = Decision(seq=sent.seq, value=sent.value, timestamp=sent.timestamp, decided_at=NOW)
    in_flight = stale.model_copy(update={"sending": decision})
    assert store.unreport(in_flight, sent, "x", NOW + 300) is False
    assert store.sent(identifier).rejected_at is None  # type: ignore[union-attr]


def test_two_handlers_racing_on_one_rejection_take_it_back_once(store):
    # Given two confirmed decisions on the counter (18 units reported)
    stripe = FakeBilling()
    for minute in (1, 2):
        record(store, 9)
        Flusher(store, stripe, time_left=lambda: 900, clock=FakeClock(NOW + 60 * minute)).run()
    first = sorted(stripe.delivered)[0]
    # When two handlers both read the log and the counter before either writes
    sent, counter = store.sent(first), None
    assert sent is not None
    counter = store.counter_of(sent)
    assert counter is not None and counter.reported == 18
    assert store.unreport(counter, sent, "no_meter", NOW + 300) is True
    fresh = store.counter_of(sent)
    assert fresh is not None
    # Then the second is refused: the log says it was taken back already
    assert store.unreport(fresh, sent, "no_meter", NOW + 301) is False
    [held] = store.quarantined()
    assert (held.reported, held.quarantined) == (9, 9)
