"""Stripe's asynchronous rejections: what each outcome means and when it is recorded (issue 15,
mutation testing: the outcomes and times a changed line of logic/rejections.py would get wrong)."""

from datetime import UTC, datetime

from tests.fakes import FakeBilling, FakeClock, InMemoryStore
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.logic.rejections import Rejection, handle_error_report, take_back
from usage_meter.models.input import EventIn

NOW = 1_795_680_000  # 2026-11-26T08:00:00Z


def flushed() -> tuple[InMemoryStore, str]:
    """A store whose one counter Stripe confirmed; the identifier it was sent under."""
    store, stripe = InMemoryStore(), FakeBilling()
    event = EventIn(stripe_customer_id="cus_Ghost1", meter="m", quantity=7)
    record_events([event], meters={"m"}, store=store, now=datetime.fromtimestamp(NOW, UTC))
    Flusher(store, stripe, time_left=lambda: 900, clock=FakeClock(NOW + 60)).run()
    [identifier] = stripe.delivered
    return store, identifier


def test_a_sent_identifier_whose_counter_expired_is_unknown():
    # Given an identifier logged as sent, whose counter is gone (expired by TTL)
    store, identifier = flushed()
    store.counters.clear()
    # When Stripe rejects it / Then it is unknown: nothing to take back
    assert take_back(Rejection(identifier, "no_meter"), store, NOW + 600) == "unknown"


def test_a_rejection_the_counter_no_longer_holds_is_unresolved_after_retries():
    # Given a counter that never takes the rejection (an operator moved the units meanwhile)
    store, identifier = flushed()
    attempts = []

    def refuse(*args):
        attempts.append(args)
        return False

    store.unreport = refuse
    # When Stripe rejects it / Then, after a few fresh reads, it is unresolved
    assert take_back(Rejection(identifier, "no_meter"), store, NOW + 600) == "unresolved"
    assert len(attempts) == 5


def test_the_quarantine_says_when_and_why_stripe_rejected_the_units():
    store, identifier = flushed()
    rejection = Rejection(identifier, "meter_event_customer_not_found", "No such customer")
    assert take_back(rejection, store, NOW + 600) == "quarantined"
    [held] = store.quarantined()
    assert held.quarantined_at == NOW + 600
    assert held.quarantine_reason == (
        f"meter_event_customer_not_found: Stripe rejected {identifier} after accepting it"
        " (No such customer)"
    )


def test_a_rejection_without_a_message_gives_the_code_alone():
    store, identifier = flushed()
    assert take_back(Rejection(identifier, "archived_meter"), store, NOW + 600) == "quarantined"
    [held] = store.quarantined()
    assert held.quarantine_reason == (
        f"archived_meter: Stripe rejected {identifier} after accepting it"
    )


def test_an_error_report_takes_back_at_its_own_time_and_is_remembered_then():
    store, identifier = flushed()
    remembered = []
    store.remember_stripe_event = lambda event_id, at: remembered.append((event_id, at))
    outcomes = handle_error_report("evt_9", [Rejection(identifier, "no_meter")], store, NOW + 900)
    assert outcomes == {"quarantined": 1} and remembered == [("evt_9", NOW + 900)]
    [held] = store.quarantined()
    assert held.quarantined_at == NOW + 900
