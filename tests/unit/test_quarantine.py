"""Quarantine and replay per counter: refused units wait for an operator, a replay makes them
sendable once more under a fresh identifier, and no run that read them before can send or
quarantine them after (DESIGN §6)."""

import random
from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling, FakeClock, HookedStore, InMemoryStore
from usage_meter.billing import PermanentBillingError, RateLimited
from usage_meter.errors import NotFound
from usage_meter.logic.flush import IDENTIFIER_WINDOW, STALE_READ, Flusher, FlushPolicy
from usage_meter.logic.quarantine import REPLAY_GUARD, ReplayRefused, replay
from usage_meter.logic.record import record_events
from usage_meter.models.domain import Counter, MeterEventRequest
from usage_meter.models.input import EventIn
from usage_meter.models.output import FlushSummary

T = int(datetime(2026, 11, 26, 8, tzinfo=UTC).timestamp())
DAY = 86_400
NOV, JAN = "2026-11-01T00:00:00Z", "2027-01-01T00:00:00Z"


def refusal() -> PermanentBillingError:
    return PermanentBillingError("No such customer", code="resource_missing")


def record(store: InMemoryStore, clock: FakeClock, quantity: int = 5) -> None:
    request = EventIn(stripe_customer_id="cus_A", meter="m", quantity=quantity)
    record_events([request], meters={"m"}, store=store, now=datetime.fromtimestamp(clock(), UTC))


def run(store: InMemoryStore, billing: FakeBilling, clock: FakeClock) -> FlushSummary:
    return Flusher(
        store,
        billing,
        time_left=lambda: 300,
        clock=clock,
        sleep=clock.advance,
        rng=random.Random(7),
        policy=FlushPolicy(parallel_pairs=1),
    ).run()


def counter(store: InMemoryStore, period: str = NOV) -> Counter:
    return store.counters[("cus_A", period, "m", 0)]


def quarantined_store() -> tuple[HookedStore, FakeBilling, FakeClock, str]:
    """5 units of cus_A Stripe refused at T (no such customer yet)."""
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [refusal()]
    run(store, billing, clock)
    [quarantined] = store.quarantined()
    return store, billing, clock, quarantined.id


def test_a_replayed_counter_is_sent_by_the_next_flush_under_a_fresh_identifier():
    # Given a counter whose units Stripe refused because the customer did not exist yet
    store, billing, clock, counter_id = quarantined_store()
    [refused] = billing.calls
    # When the operator replays it after the guard, and the flush runs
    clock.advance(REPLAY_GUARD)
    replayed = replay(store, counter_id, now=int(clock()))
    summary = run(store, billing, clock)
    # Then the units are delivered once, under a new identifier, and reported
    assert replayed.quarantined == 5
    [_, sent] = billing.calls
    assert sent.identifier == f"{counter_id}.2" != refused.identifier == f"{counter_id}.1"
    assert summary.sent == 1 and billing.totals() == {("cus_A", "m"): 5}
    assert (counter(store).reported, counter(store).quarantined) == (5, 0)
    assert store.quarantined() == [] and store.in_backlog == set()


def test_a_quarantined_counter_leaves_the_backlog_and_a_replay_puts_it_back():
    # Given a quarantined counter, which the next run takes out of the backlog
    store, billing, clock, counter_id = quarantined_store()
    run(store, billing, clock)
    assert store.in_backlog == set()
    # When it is replayed
    clock.advance(REPLAY_GUARD)
    replay(store, counter_id, now=int(clock()))
    # Then it is back in the backlog, with its units unsent again
    assert store.in_backlog == {("cus_A", NOV, "m", 0)} and counter(store).unsent == 5


def test_a_replay_before_the_guard_is_refused():
    # Given units quarantined at T
    store, _, _, counter_id = quarantined_store()
    quarantined_at = counter(store).quarantined_at or 0
    # When the operator replays a second too early / Then it is refused, and nothing changes
    with pytest.raises(ReplayRefused, match="replay it from"):
        replay(store, counter_id, now=quarantined_at + REPLAY_GUARD - 1)
    assert counter(store).quarantined == 5
    # and at the guard it is accepted
    replay(store, counter_id, now=quarantined_at + REPLAY_GUARD)
    assert counter(store).quarantined == 0


def test_the_replay_guard_outlasts_what_any_run_may_still_send():
    # Runs send nothing read more than STALE_READ ago; the guard leaves a margin for the call.
    assert REPLAY_GUARD >= STALE_READ + 5 * 60


def test_replaying_an_unknown_counter_is_not_found():
    store, _, clock, _ = quarantined_store()
    with pytest.raises(NotFound):
        replay(store, "umc_missing", now=int(clock()) + REPLAY_GUARD)


def test_a_counter_replayed_once_has_nothing_left_to_replay():
    # Given a counter replayed once
    store, billing, clock, counter_id = quarantined_store()
    clock.advance(REPLAY_GUARD)
    replay(store, counter_id, now=int(clock()))
    # When the operator replays it again / Then there is nothing to replay
    with pytest.raises(NotFound):
        replay(store, counter_id, now=int(clock()))
    # and the flush sends the units once
    run(store, billing, clock)
    run(store, billing, clock)
    assert billing.totals() == {("cus_A", "m"): 5}


def test_two_operators_replaying_at_once_replay_once():
    # Given two operators who both read the quarantined counter
    store, billing, clock, counter_id = quarantined_store()
    clock.advance(REPLAY_GUARD)
    store.after("quarantined_counter", lambda: replay(store, counter_id, now=int(clock())))
    # When the slower one replays / Then it is refused: the counter changed since it read it
    with pytest.raises(ReplayRefused, match="changed"):
        replay(store, counter_id, now=int(clock()))
    # and the units are sent once
    run(store, billing, clock)
    assert billing.totals() == {("cus_A", "m"): 5} and counter(store).reported == 5


def test_a_replay_of_a_counter_quarantined_again_meanwhile_is_refused():
    # Given an operator reading a quarantined counter, while new units of it are refused too
    store, billing, clock, counter_id = quarantined_store()
    clock.advance(REPLAY_GUARD)

    def more_units_refused() -> None:
        record(store, clock, quantity=3)
        billing.script = [refusal()]
        run(store, billing, clock)

    store.after("quarantined_counter", more_units_refused)
    # When the operator replays what was read / Then it is refused, and all 8 units stay
    with pytest.raises(ReplayRefused, match="changed"):
        replay(store, counter_id, now=int(clock()))
    assert counter(store).quarantined == 8
    # and a fresh replay, after the guard, moves all 8
    clock.advance(REPLAY_GUARD)
    replay(store, counter_id, now=int(clock()))
    run(store, billing, clock)
    assert billing.totals() == {("cus_A", "m"): 8}


def test_each_replay_sends_under_its_own_identifier():
    # Given a counter refused, replayed, and refused again
    store, billing, clock, counter_id = quarantined_store()
    clock.advance(REPLAY_GUARD)
    replay(store, counter_id, now=int(clock()))
    billing.script = [refusal()]
    run(store, billing, clock)
    # When it is replayed once more and sent
    clock.advance(REPLAY_GUARD)
    replay(store, counter_id, now=int(clock()))
    run(store, billing, clock)
    # Then every call had its own identifier, and only the last was delivered
    assert [c.identifier for c in billing.calls] == [f"{counter_id}.{n}" for n in (1, 2, 3)]
    assert list(billing.delivered) == [f"{counter_id}.3"]


def test_a_counter_too_old_for_stripe_is_replayed_only_with_restamp_into_the_current_period():
    # Given November's units, first flushed in January: too old for Stripe, so quarantined
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    clock.now = datetime(2027, 1, 6, tzinfo=UTC).timestamp()
    run(store, billing, clock)
    [old] = store.quarantined()
    assert old.quarantine_reason.startswith("timestamp_too_far_in_past") and billing.calls == []
    clock.advance(REPLAY_GUARD)
    # When the operator replays it as it is / Then it is refused: Stripe would refuse it again
    with pytest.raises(ReplayRefused, match="restamp"):
        replay(store, old.id, now=int(clock()))
    # When the operator replays it with restamp
    replay(store, old.id, now=int(clock()), restamp=True)
    # Then the units move from November's counter into January's
    assert (counter(store).quantity, counter(store).quarantined) == (0, 0)
    assert counter(store, period=JAN).quantity == 5
    # and the flush sends them once, stamped in January
    run(store, billing, clock)
    run(store, billing, clock)
    [sent] = billing.calls
    assert sent.value == 5 and sent.timestamp >= datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert billing.totals() == {("cus_A", "m"): 5} and store.in_backlog == set()


# -- a stale run and a replay ---------------------------------------------------------------


def in_flight_store() -> tuple[HookedStore, FakeBilling, FakeClock]:
    """5 units with decision 1 in flight: the run that made it died before sending."""
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock)

    def die() -> None:
        raise SystemExit("the Lambda died")

    store.after("decide", die)
    with pytest.raises(SystemExit):
        run(store, billing, clock)
    clock.advance(60)
    return store, billing, clock


def refuse_then_replay(store: HookedStore, billing: FakeBilling, clock: FakeClock) -> None:
    """Another run's resend is refused for good; the operator replays as soon as allowed."""
    billing.script.append(refusal())
    run(store, billing, clock)
    counter_id = counter(store).id
    with pytest.raises(ReplayRefused):
        replay(store, counter_id, now=int(clock()) + 60)
    clock.advance(REPLAY_GUARD)
    replay(store, counter_id, now=int(clock()))


def test_a_stale_run_cannot_resend_a_decision_replayed_since_it_read_it():
    # Given run A holding decision 1, backing off after a 429
    store, billing, clock = in_flight_store()
    billing.script = [RateLimited("slow down")]
    others: list[FlushSummary] = []

    def meanwhile(_seconds: float) -> None:
        # while A waits, another run's resend of decision 1 is refused and quarantined, the
        # operator replays it, and a third run sends the units as decision 2
        refuse_then_replay(store, billing, clock)
        others.append(run(store, billing, clock))

    run_a = Flusher(store, billing, time_left=lambda: 300, clock=clock, sleep=meanwhile)
    # When A wakes up
    summary_a = run_a.run()
    # Then A sends nothing it read that long ago, and the units are billed once: the refused
    # decision was a resend, so the replay sent it again as decision 1 (Stripe dedupes it)
    assert summary_a.sent == 0 and summary_a.deferred == 1 and others[0].sent == 1
    counter_id = counter(store).id
    assert list(billing.delivered) == [f"{counter_id}.1"]
    assert billing.totals() == {("cus_A", "m"): 5}
    assert (counter(store).reported, counter(store).quarantined) == (5, 0)


def test_a_stale_run_quarantining_a_replayed_resend_only_holds_it_again():
    # Given run A resending decision 1, and, while its call is out, another run's resend
    # refused and quarantined and the operator's replay
    store, billing, clock = in_flight_store()

    def meanwhile(request: MeterEventRequest) -> None:
        billing.on_call = None
        refuse_then_replay(store, billing, clock)
        billing.script.append(refusal())  # then Stripe refuses A's call too

    billing.on_call = meanwhile
    # When A quarantines what it holds
    summary_a = run(store, billing, clock)
    # Then it holds decision 1 again (the replay put that very decision back in flight), so
    # nothing is sendable under a new identifier, and the next replay resends decision 1 once
    assert summary_a.quarantined == 1 and counter(store).unsent == 0
    held = counter(store).held
    assert held is not None and held.seq == 1
    clock.advance(REPLAY_GUARD)
    replay(store, counter(store).id, now=int(clock()))
    run(store, billing, clock)
    assert billing.totals() == {("cus_A", "m"): 5} and counter(store).reported == 5
    assert list(billing.delivered) == [counter(store).identifier(held)]


def test_a_refused_resend_is_held_and_replayed_under_its_own_identifier():
    # Given decision 1 sent once (its answer lost), then refused when resent
    store, billing, clock = in_flight_store()
    billing.script.append(refusal())
    run(store, billing, clock)
    refused = counter(store)
    assert refused.held is not None and refused.quarantined == 5 and refused.unsent == 0
    # When the operator replays it
    clock.advance(REPLAY_GUARD)
    replay(store, refused.id, now=int(clock()))
    run(store, billing, clock)
    # Then decision 1 itself is sent again: had Stripe taken it, it would dedupe it
    assert list(billing.delivered) == [refused.identifier(refused.held)]
    assert (counter(store).reported, counter(store).held) == (5, None)


def test_a_held_decision_older_than_stripes_window_needs_a_fresh_replay():
    # Given a held decision a day old
    store, billing, clock = in_flight_store()
    billing.script.append(refusal())
    run(store, billing, clock)
    clock.advance(IDENTIFIER_WINDOW + 60)
    counter_id = counter(store).id
    # When it is replayed / Then only with fresh (after checking Stripe), under a new identifier
    with pytest.raises(ReplayRefused, match="check the meter's events"):
        replay(store, counter_id, now=int(clock()))
    replay(store, counter_id, now=int(clock()), fresh=True)
    run(store, billing, clock)
    assert list(billing.delivered) == [f"{counter_id}.2"] and counter(store).reported == 5
