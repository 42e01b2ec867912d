"""The flush's edges and its run summary (issue 15, mutation testing: what a changed line of
logic/flush.py would get wrong that tests/unit/test_flush_logic.py does not see).

The summary is what the flush function logs and turns into the metrics the alarms watch
(functions/flush/app.py): the backlog's size and age, the quarantine, the deferred work.
"""

import threading
import time

from tests.fakes import FakeBilling, FakeClock, InMemoryStore
from tests.unit.test_flush_logic import NOV_END, STALE_READ, T, add_shard, counter, record, run
from usage_meter.billing import (
    BillingAuthError,
    PermanentBillingError,
    RateLimited,
    TransientBillingError,
)
from usage_meter.logic.flush import IDENTIFIER_WINDOW, Flusher, stamp
from usage_meter.models.domain import Counter

DAY = 86_400


def test_the_summary_counts_the_backlog_and_the_age_of_its_oldest_decision():
    # Given cus_A's 5 units in a decision left in flight 90 s ago, cus_B's 7 units of which 3
    # were reported and 1 quarantined, and cus_C's 2 units all reported (not yet released)
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, customer="cus_A", quantity=5)
    billing.script = [TransientBillingError("503")]
    run(store, billing, clock)
    for customer, quantity, reported, quarantined in [("cus_B", 7, 3, 1), ("cus_C", 2, 2, 0)]:
        record(store, clock, customer=customer, quantity=quantity)
        key = (customer, counter(store, customer).period_start, "m", 0)
        store.counters[key] = counter(store, customer).model_copy(
            update={"reported": reported, "quarantined": quarantined}
        )
    clock.advance(90)
    # When the next run reads them
    summary = run(store, billing, clock)
    # Then the units not yet reported are 5 + 3, and the oldest decision waited 90 s
    assert summary.units_unreported == 8
    assert summary.oldest_unreported_seconds == 90


def test_a_decision_made_after_the_run_read_its_clock_has_waited_zero_seconds():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [TransientBillingError("503")]
    run(store, billing, clock)
    clock.now = T - 30  # this run's clock is behind the one that decided
    billing.script = [TransientBillingError("503")]
    assert run(store, billing, clock).oldest_unreported_seconds == 0


def test_the_summary_counts_quarantined_decisions_units_and_pairs():
    # Given two shards of cus_A's counter and one of cus_B's, all refused by Stripe for good
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, customer="cus_A", quantity=5)
    add_shard(store, counter(store), shard=1, quantity=2)
    record(store, clock, customer="cus_B", quantity=7)
    billing.script = [PermanentBillingError("No such customer", code="resource_missing")] * 3
    # When the flush runs
    summary = run(store, billing, clock, parallel_pairs=1)
    # Then three decisions of 14 units, from two pairs, are quarantined
    assert (summary.quarantined, summary.units_quarantined, summary.pairs_quarantined) == (3, 14, 2)


def test_a_refusal_without_stripes_code_is_quarantined_as_rejected():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [PermanentBillingError("Bad request")]
    run(store, billing, clock)
    [quarantined] = store.quarantined()
    assert quarantined.quarantine_reason == "rejected: Bad request"


def test_a_resent_decision_too_old_for_stripe_names_its_identifier_for_the_operator():
    # Given a decision sent before (its answer lost), then the run that resends it comes late
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(NOV_END + 35 * DAY - 700)
    record(store, FakeClock(T))
    billing.script = [TransientBillingError("503")]
    run(store, billing, clock)
    identifier = billing.calls[0].identifier
    clock.advance(200)
    # When it runs / Then it is quarantined, naming what to check in Stripe
    run(store, billing, clock)
    [quarantined] = store.quarantined()
    assert quarantined.quarantine_reason == (
        "timestamp_too_far_in_past: older than Stripe's 35 days; "
        f"sent before: check Stripe for {identifier}"
    )
    # and the decision is held: a replay must not send its units anew under another identifier
    assert quarantined.held is not None and quarantined.held.seq == 1


def test_a_run_that_runs_out_of_time_defers_every_counter_it_did_not_reach():
    # Given one pair with three counter shards, and time running out after the first call
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=1)
    add_shard(store, counter(store), shard=1, quantity=2)
    add_shard(store, counter(store), shard=2, quantity=3)
    left = iter([300, 300])  # the page, then the first counter
    # When the flush runs
    summary = run(store, billing, clock, time_left=lambda: next(left, 10))
    # Then the two shards it could not reach are counted as deferred
    assert (summary.sent, summary.deferred) == (1, 2)


def test_a_store_fault_on_one_counter_is_one_deferred_error_naming_it():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)

    def broken(*args: object) -> bool:
        raise ConnectionError("table unavailable")

    store.decide = broken
    summary = run(store, billing, clock)
    assert summary.deferred == 1
    assert summary.errors == [f"{counter(store).id}: ConnectionError: table unavailable"]


def test_a_backlog_that_cannot_be_read_is_one_error_saying_so():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)

    def broken():
        raise ConnectionError("table unavailable")
        yield

    store.backlog = broken
    summary = run(store, billing, clock)
    assert summary.errors == ["reading the backlog failed: ConnectionError: table unavailable"]


def test_a_stripe_outage_is_an_error_naming_the_counter_and_a_deferral():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [TransientBillingError("503 Service Unavailable")]
    summary = run(store, billing, clock)
    assert summary.deferred == 1
    assert summary.errors == [f"{counter(store).id}: Stripe unavailable: 503 Service Unavailable"]


def test_a_refused_key_is_one_error_and_defers_the_decision_it_was_sending():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [BillingAuthError("Invalid API Key")]
    summary = run(store, billing, clock)
    assert summary.errors == ["Stripe refused the API key: Invalid API Key"]
    assert summary.deferred == 1 and counter(store).sending is not None


def test_rate_limited_every_time_it_sleeps_between_attempts_not_after_the_last():
    store, billing, clock, sleeps = InMemoryStore(), FakeBilling(), FakeClock(T), []
    record(store, clock)
    billing.script = [RateLimited("slow down") for _ in range(5)]
    summary = run(store, billing, clock, sleeps=sleeps)
    assert len(billing.calls) == 5 and len(sleeps) == 4 and summary.deferred == 1


def test_the_rate_limit_pause_doubles_up_to_its_cap():
    # Given Stripe answering 429 four times, and jitter that always takes its upper bound
    store, billing, clock, sleeps = InMemoryStore(), FakeBilling(), FakeClock(T), []
    record(store, clock)
    billing.script = [RateLimited("slow down") for _ in range(4)]
    flusher = Flusher(
        store,
        billing,
        time_left=lambda: 300,
        clock=clock,
        sleep=sleeps.append,
        rng=UpperBound(),
    )
    # When the flush runs / Then the pauses are 0.5, 1, 2 and 4 seconds, then it delivers
    assert flusher.run().sent == 1
    assert sleeps == [0.5, 1.0, 2.0, 4.0]


class UpperBound:
    def uniform(self, low: float, high: float) -> float:
        return high


def test_a_pause_that_would_end_exactly_at_the_reserve_is_not_taken():
    # Given 50 s left with a 45 s reserve, and Stripe asking to come back in 5 s
    store, billing, clock, sleeps = InMemoryStore(), FakeBilling(), FakeClock(T), []
    record(store, clock)
    billing.script = [RateLimited("slow down", retry_after=5.0)]
    deadline = clock() + 50
    summary = run(store, billing, clock, time_left=lambda: deadline - clock(), sleeps=sleeps)
    assert sleeps == [] and summary.deferred == 1


def test_a_run_still_sends_what_it_read_exactly_ten_minutes_ago():
    # Given Stripe asking the run to come back in exactly STALE_READ seconds
    store, billing, clock, sleeps = InMemoryStore(), FakeBilling(), FakeClock(T), []
    record(store, clock, quantity=5)
    billing.script = [RateLimited("slow down", retry_after=STALE_READ)]
    # When the run has waited that long / Then what it read is still fresh enough to send
    summary = run(store, billing, clock, time_left=900, sleeps=sleeps)
    assert sleeps == [STALE_READ] and summary.sent == 1


def test_usage_recorded_ahead_is_sent_from_the_first_second_of_its_period():
    # Given usage recorded into December while it is still November
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(NOV_END - 60)
    record(store, clock, at=NOV_END + 30)
    # When the flush runs at December's first second / Then it is sent
    clock.now = NOV_END
    assert run(store, billing, clock).sent == 1


def test_a_period_shorter_than_a_minute_is_stamped_inside_it():
    # Given a period of 20 s inside one minute (a subscription changed twice)
    start, end = T + 10, T + 30
    short = Counter(
        customer="cus_A",
        meter="m",
        period_start=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start)),
        period_end=end,
        quantity=1,
    )
    # Then a decision after it ended carries its last second, and one during it its own time
    assert stamp(short, end + 100) == end - 1
    assert stamp(short, start + 5) == start + 5


def test_pairs_beyond_the_parallel_limit_wait_for_a_free_slot():
    # Given six pairs, and calls that wait for each other until two are in flight
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    for c in "ABCDEF":
        record(store, clock, customer=f"cus_{c}")
    two = threading.Barrier(2, timeout=5)
    billing.on_call = lambda _: two.wait()
    # When the flush runs two pairs at a time
    summary = run(store, billing, clock, parallel_pairs=2)
    # Then never more than two calls were in flight
    assert summary.sent == 6 and billing.max_in_flight == 2


def test_a_decision_unconfirmed_for_a_day_tells_the_operator_what_to_check():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [TransientBillingError("503")]
    run(store, billing, clock)
    identifier = billing.calls[0].identifier
    clock.advance(IDENTIFIER_WINDOW + 1)
    run(store, billing, clock)
    [quarantined] = store.quarantined()
    assert quarantined.quarantine_reason == (
        "unconfirmed_decision: no answer from Stripe for a day; check the meter's events in "
        f"Stripe for {identifier} before replaying"
    )


def test_a_closed_periods_units_are_quarantined_saying_how_to_bill_them():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    key = next(iter(store.counters))
    store.counters[key] = store.counters[key].model_copy(
        update={"period_source": "stripe_subscription"}
    )
    clock.now = NOV_END + 3600
    run(store, billing, clock)
    [quarantined] = store.quarantined()
    assert quarantined.quarantine_reason == (
        "period_closed: the period's invoice is finalized and Stripe would not bill these "
        "units; replay with restamp to bill them in the current period"
    )


def test_a_counter_with_more_accounted_than_recorded_says_by_how_much():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=3)
    key = next(iter(store.counters))
    store.counters[key] = store.counters[key].model_copy(update={"reported": 5})
    summary = run(store, billing, clock)
    assert summary.errors == [f"{counter(store).id}: 2 units more accounted than recorded"]


def test_a_quarantine_another_run_got_to_first_is_deferred():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [PermanentBillingError("No such customer", code="resource_missing")]
    store.quarantine = lambda *args, **kwargs: False
    summary = run(store, billing, clock)
    assert (summary.quarantined, summary.deferred, summary.errors) == (0, 1, [])
