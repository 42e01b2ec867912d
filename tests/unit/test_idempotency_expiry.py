"""Stripe forgets after a day: a saved idempotent answer after 24 hours, a meter event's
identifier after "a rolling period of at least 24 hours". The fake Stripe forgets both after
exactly 24 hours of its clock, the least Stripe promises. These runs go from the flush through
StripeMeterBilling and the real SDK to the fake, which shares the service's clock, and check
that an answer lost before such a day passes still bills every unit exactly once.
"""

import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from devtools.fake_stripe import IDEMPOTENCY_KEY_TTL, IDENTIFIER_WINDOW, FakeStripe
from tests.fakes import FakeClock, InMemoryStore
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.logic import flush
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.logic.quarantine import REPLAY_GUARD, ReplayRefused, replay
from usage_meter.logic.record import record_events
from usage_meter.models.input import EventIn
from usage_meter.models.output import FlushSummary

T = int(datetime(2026, 11, 26, 8, tzinfo=UTC).timestamp())
PAIR = ("cus_A", "m")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T)


@pytest.fixture
def stripe(clock: FakeClock) -> Iterator[FakeStripe]:
    with FakeStripe(clock=clock) as server:
        yield server


@pytest.fixture
def store(clock: FakeClock) -> InMemoryStore:
    store = InMemoryStore()
    now = datetime.fromtimestamp(clock(), UTC)
    usage = [EventIn(stripe_customer_id="cus_A", meter="m", quantity=5)]
    record_events(usage, meters={"m"}, store=store, now=now, batch=True)
    return store


def run(store: InMemoryStore, stripe: FakeStripe, clock: FakeClock) -> FlushSummary:
    """One flush run, as one Lambda invocation with its own Stripe client (no SDK retries)."""
    billing = StripeMeterBilling(
        "sk_test_expiry",
        api_base=stripe.url,
        timeout_seconds=2.0,
        max_network_retries=0,
        max_requests_per_second=1000,
    )
    return Flusher(
        store,
        billing,
        time_left=lambda: 300.0,
        clock=clock,
        sleep=clock.advance,
        rng=random.Random(7),
        policy=FlushPolicy(),
    ).run()


def lose_the_answer(store: InMemoryStore, stripe: FakeStripe, clock: FakeClock) -> None:
    """Stripe takes the first send and its answer never arrives: the decision stays open."""
    stripe.inject("lost_response")
    summary = run(store, stripe, clock)
    assert summary.sent == 0 and summary.errors  # the run did not learn the outcome
    assert stripe.totals() == {PAIR: 5}
    [counter] = store.counters.values()
    assert counter.sending is not None and counter.reported == 0


def test_the_fake_forgets_no_sooner_than_stripe_promises():
    assert IDEMPOTENCY_KEY_TTL == IDENTIFIER_WINDOW == 24 * 3600
    # The flush gives up resending a decision with an hour to spare
    assert flush.IDENTIFIER_WINDOW < IDENTIFIER_WINDOW


def test_a_resend_inside_stripes_window_is_recognised_as_delivered(store, stripe, clock):
    # Given a send whose answer was lost
    lose_the_answer(store, stripe, clock)
    # When the next run resends the same decision as late as the flush allows
    clock.advance(flush.IDENTIFIER_WINDOW)
    summary = run(store, stripe, clock)
    # Then Stripe still knows the identifier, answers "already exists", and the units count
    # as reported: billed once
    assert summary.sent == 1 and summary.units_reported == 5
    assert stripe.totals() == {PAIR: 5} and len(stripe.accepted()) == 1
    [counter] = store.counters.values()
    assert counter.reported == 5 and counter.sending is None


def test_a_run_more_than_a_day_after_a_lost_answer_does_not_bill_again(store, stripe, clock):
    # Given a send whose answer was lost
    lose_the_answer(store, stripe, clock)
    calls = stripe.calls
    # When the next run comes after Stripe forgot the identifier and any idempotency key
    clock.advance(IDENTIFIER_WINDOW + 60)
    summary = run(store, stripe, clock)
    # Then it does not resend blind (Stripe would take it as new): the decision is quarantined
    # for an operator to check, and Stripe holds the units once
    assert summary.quarantined == 1 and summary.sent == 0
    assert stripe.calls == calls and stripe.totals() == {PAIR: 5}
    [counter] = store.quarantined()
    assert counter.quarantine_reason.startswith("unconfirmed_decision")
    assert (counter.quarantined, counter.reported) == (5, 0)
    # And later runs leave it there
    clock.advance(3600)
    run(store, stripe, clock)
    assert stripe.calls == calls and stripe.totals() == {PAIR: 5}


def test_an_operator_replay_after_a_lost_answer_does_not_bill_twice(store, stripe, clock):
    # Given the decision quarantined a day after its answer was lost (Stripe has the units)
    lose_the_answer(store, stripe, clock)
    clock.advance(IDENTIFIER_WINDOW + 60)
    run(store, stripe, clock)
    [counter] = store.quarantined()
    identifier = counter.identifier(counter.held)
    # When an operator replays it without saying they checked Stripe
    clock.advance(REPLAY_GUARD)
    with pytest.raises(ReplayRefused, match=f"Stripe may already have {identifier}"):
        replay(store, counter.id, now=int(clock()))
    run(store, stripe, clock)
    # Then nothing is sent again: Stripe holds the units once
    assert stripe.totals() == {PAIR: 5}
    assert [c.quarantined for c in store.quarantined()] == [5]


def test_a_lost_send_that_never_reached_stripe_is_billed_once_after_a_fresh_replay(
    store, stripe, clock
):
    # Given a send that never reached Stripe, quarantined a day later as unconfirmed
    stripe.inject("server_error")
    run(store, stripe, clock)
    assert stripe.totals() == {}
    [counter] = store.counters.values()
    assert counter.sending is not None
    clock.advance(IDENTIFIER_WINDOW + 60)
    run(store, stripe, clock)
    [counter] = store.quarantined()
    assert counter.held is not None
    # When the operator, having found nothing in Stripe, replays it fresh
    clock.advance(REPLAY_GUARD)
    replay(store, counter.id, now=int(clock()), fresh=True)
    run(store, stripe, clock)
    # Then the units are billed once, under a new identifier
    assert stripe.totals() == {PAIR: 5}
    assert store.quarantined() == []
