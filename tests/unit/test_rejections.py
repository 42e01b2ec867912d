"""Stripe's asynchronous rejections take a decision's units back into the quarantine, once, and
a replay then sends them again under a new identifier."""

from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling, FakeClock, InMemoryStore
from usage_meter.logic.flush import Flusher
from usage_meter.logic.quarantine import REPLAY_GUARD, replay
from usage_meter.logic.record import record_events
from usage_meter.logic.rejections import Rejection, handle_error_report, take_back
from usage_meter.models.input import EventIn

NOW = 1_795_680_000  # 2026-11-26T08:00:00Z


def recorded(quantity: int = 7) -> InMemoryStore:
    store = InMemoryStore()
    event = EventIn(stripe_customer_id="cus_Ghost1", meter="ai_messages", quantity=quantity)
    record_events(
        [event], meters={"ai_messages"}, store=store, now=datetime.fromtimestamp(NOW, UTC)
    )
    return store


def flush(store: InMemoryStore, stripe: FakeBilling, at: int) -> None:
    Flusher(store, stripe, time_left=lambda: 900, clock=FakeClock(at)).run()


def test_a_confirmed_decision_stripe_rejects_later_is_quarantined_once_and_replayable():
    store, stripe = recorded(), FakeBilling()
    flush(store, stripe, NOW + 60)
    [identifier] = stripe.delivered
    rejection = Rejection(identifier, "meter_event_customer_not_found", "No such customer")
    # When Stripe's error report names it (twice: a repeated notification)
    assert take_back(rejection, store, NOW + 600) == "quarantined"
    assert take_back(rejection, store, NOW + 601) == "already"
    # Then its units are quarantined with Stripe's code, no longer reported
    [held] = store.quarantined()
    assert (held.reported, held.quarantined) == (0, 7)
    assert held.quarantine_reason is not None
    assert held.quarantine_reason.startswith("meter_event_customer_not_found")
    # And a replay sends them again under a new identifier
    replay(store, held.id, now=NOW + 600 + REPLAY_GUARD)
    flush(store, stripe, NOW + 600 + REPLAY_GUARD + 60)
    assert sorted(stripe.delivered) == [identifier, identifier.replace(".1", ".2")]
    [counter] = store.counters.values()
    assert (counter.reported, counter.quarantined, counter.unsent) == (7, 0, 0)


def test_a_decision_still_in_flight_leaves_flight_for_the_quarantine():
    store, stripe = recorded(), FakeBilling()

    def die(request: object) -> None:
        raise KeyboardInterrupt  # the run dies while Stripe has the call

    stripe.on_call = die
    with pytest.raises(KeyboardInterrupt):
        flush(store, stripe, NOW + 60)
    [identifier] = store.sent_log  # logged before the call
    assert take_back(Rejection(identifier, "archived_meter"), store, NOW + 600) == "quarantined"
    [counter] = store.counters.values()
    assert (counter.sending, counter.reported, counter.quarantined) == (None, 0, 7)


def test_an_identifier_this_stack_never_sent_is_unknown():
    assert take_back(Rejection("umc_other.1", "no_meter"), InMemoryStore(), NOW) == "unknown"


def test_an_error_report_is_handled_once_per_event():
    store, stripe = recorded(), FakeBilling()
    flush(store, stripe, NOW + 60)
    [identifier] = stripe.delivered
    rejections = [Rejection(identifier, "no_meter"), Rejection("umc_x.1", "no_meter")]
    outcomes = handle_error_report("evt_1", rejections, store, NOW + 600)
    assert outcomes == {"quarantined": 1, "unknown": 1}
    assert handle_error_report("evt_1", rejections, store, NOW + 601) is None
