"""The flush protocol on the in-memory fakes: decide, send, confirm or quarantine, release; one
Stripe call per counter with new usage; every race forced at a named step (DESIGN §6)."""

import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.fakes import FakeBilling, FakeClock, HookedStore, InMemoryStore
from usage_meter.billing import (
    BillingAuthError,
    MeterBilling,
    PermanentBillingError,
    RateLimited,
    SendOutcome,
    TransientBillingError,
)
from usage_meter.logic.flush import (
    IDENTIFIER_WINDOW,
    MAX_STRIPE_VALUE,
    STALE_READ,
    Flusher,
    FlushPolicy,
)
from usage_meter.logic.record import record_events
from usage_meter.models.domain import Counter, MeterEventRequest
from usage_meter.models.input import EventIn
from usage_meter.models.output import FlushSummary

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
T = int(NOW.timestamp())
NOV, DEC = "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"
NOV_END = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
DAY = 86_400


class Crash(BaseException):
    """The Lambda dies at this point: nothing after it runs, nothing is cleaned up."""


def crash() -> None:
    raise Crash


class AnswerLost:
    """Stripe takes the call, and the run dies before its answer arrives."""

    def __init__(self, billing: FakeBilling) -> None:
        self.billing = billing

    def send(self, request: MeterEventRequest) -> SendOutcome:
        self.billing.send(request)
        raise Crash


def record(
    store: InMemoryStore,
    clock: FakeClock,
    *,
    customer: str = "cus_A",
    meter: str = "m",
    quantity: int = 1,
    at: int | str | None = None,
    count: int = 1,
) -> None:
    requests = [
        EventIn(stripe_customer_id=customer, meter=meter, quantity=quantity, timestamp=at)
        for _ in range(count)
    ]
    now = datetime.fromtimestamp(clock(), UTC)
    record_events(requests, meters={"m", "n"}, store=store, now=now, batch=True)


def flusher(
    store: InMemoryStore,
    billing: MeterBilling,
    clock: FakeClock,
    *,
    time_left: float | Callable[[], float] = 300.0,
    sleeps: list[float] | None = None,
    **policy: Any,
) -> Flusher:
    def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)
        clock.advance(seconds)

    return Flusher(
        store,
        billing,
        time_left=time_left if callable(time_left) else lambda: time_left,
        clock=clock,
        sleep=sleep,
        rng=random.Random(7),
        policy=FlushPolicy(**policy),
    )


def run(
    store: InMemoryStore, billing: MeterBilling, clock: FakeClock, **options: Any
) -> FlushSummary:
    return flusher(store, billing, clock, **options).run()


def counter(
    store: InMemoryStore, customer: str = "cus_A", meter: str = "m", period: str = NOV
) -> Counter:
    return store.counters[(customer, period, meter, 0)]


def add_shard(store: InMemoryStore, like: Counter, shard: int, quantity: int) -> None:
    """A counter shard, as the DynamoDB adapter makes one when shard 0 is contended."""
    shard_counter = Counter(
        customer=like.customer,
        meter=like.meter,
        period_start=like.period_start,
        period_end=like.period_end,
        shard=shard,
        quantity=quantity,
    )
    key = (like.customer, like.period_start, like.meter, shard)
    store.counters[key] = shard_counter
    store.in_backlog.add(key)


# -- one call per counter with new usage ----------------------------------------------------


def test_one_stripe_call_per_counter_carries_the_sum_of_its_events():
    # Given 100 events for each of two customers and two meters, all in one period
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    for customer in ("cus_A", "cus_B"):
        for meter in ("m", "n"):
            record(store, clock, customer=customer, meter=meter, quantity=2, count=100)
    # When a flush runs
    summary = run(store, billing, clock)
    # Then Stripe got one call per counter, each with the counter's 200 units
    assert len(billing.calls) == 4
    assert billing.totals() == {(c, m): 200 for c in ("cus_A", "cus_B") for m in ("m", "n")}
    assert (summary.counters_read, summary.sent, summary.units_reported) == (4, 4, 800)
    # and every counter is reported in full and out of the backlog
    assert all(
        c.reported == c.quantity == 200 and c.sending is None for c in store.counters.values()
    )
    assert store.in_backlog == set() and summary.released == 4


def test_a_second_flush_sends_nothing():
    # Given a flushed backlog
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, count=3)
    run(store, billing, clock)
    # When another flush runs
    summary = run(store, billing, clock)
    # Then it reads nothing and calls Stripe for nothing
    assert len(billing.calls) == 1 and summary == FlushSummary()


def test_new_usage_after_a_report_is_sent_alone_under_a_fresh_identifier():
    # Given a counter whose 5 units were reported
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)
    run(store, billing, clock)
    # When 3 more units arrive and the flush runs again
    record(store, clock, quantity=3)
    clock.advance(60)
    run(store, billing, clock)
    # Then the second call carries only the 3 new units, under the next decision's identifier
    first, second = billing.calls
    assert (first.value, second.value) == (5, 3)
    stem = counter(store).id
    assert (first.identifier, second.identifier) == (f"{stem}.1", f"{stem}.2")
    assert counter(store).reported == 8 and billing.totals() == {("cus_A", "m"): 8}


def test_a_current_period_is_stamped_with_the_flush_time():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    clock.advance(90)
    run(store, billing, clock)
    [call] = billing.calls
    assert call.timestamp == T + 90


def test_an_ended_period_is_stamped_with_its_last_second_so_it_bills_in_that_period():
    # Given usage at the very end of October, flushed in November
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, at="2026-10-31T23:30:00Z")
    # When the flush runs
    run(store, billing, clock)
    # Then Stripe gets it inside October
    [call] = billing.calls
    assert call.timestamp == int(datetime(2026, 11, 1, tzinfo=UTC).timestamp()) - 1


def test_each_shard_of_a_hot_counter_is_its_own_decision_with_its_own_identifier():
    # Given a contended counter spread over shards 0 and 1
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=4)
    add_shard(store, counter(store), shard=1, quantity=6)
    # When the flush runs
    run(store, billing, clock)
    # Then each shard is reported once, under identifiers that differ
    assert sorted(c.value for c in billing.calls) == [4, 6]
    assert len({c.identifier for c in billing.calls}) == 2
    assert billing.totals() == {("cus_A", "m"): 10}


# -- crashes: the next run resends the same decision -----------------------------------------


CRASH_POINTS = ["after decide", "Stripe's answer lost", "before confirm"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_after_a_crash_the_next_run_resends_the_same_identifier_value_and_timestamp(point):
    # Given a run that decided a counter's 5 units and died at `point`
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)
    if point == "after decide":
        store.after("decide", crash)
    if point == "before confirm":
        store.before("confirm", crash)
    crashed_billing = AnswerLost(billing) if point == "Stripe's answer lost" else billing
    with pytest.raises(Crash):
        run(store, crashed_billing, clock)
    decided = counter(store).sending
    assert decided is not None
    # When the next run comes, later, with 2 more units recorded meanwhile
    clock.advance(300)
    record(store, clock, quantity=2)
    summary = run(store, billing, clock)
    # Then it resent the decision as it was: the same identifier, value and timestamp
    resend = billing.calls[-1]
    assert resend.identifier == counter(store).identifier(decided)
    assert (resend.value, resend.timestamp) == (5, decided.timestamp) == (5, T)
    assert summary.resumed == 1 and summary.sent == 1
    # and Stripe holds the 5 units once; the 2 new ones go with the run after
    assert billing.totals() == {("cus_A", "m"): 5} and counter(store).reported == 5
    run(store, billing, clock)
    assert billing.totals() == {("cus_A", "m"): 7} and counter(store).reported == 7


def test_stripes_duplicate_answer_confirms_the_decision():
    # Given a decision Stripe took, from a run that died before confirming it
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)
    store.before("confirm", crash)
    with pytest.raises(Crash):
        run(store, billing, clock)
    # When the next run resends it, and Stripe answers that the identifier already exists
    summary = run(store, billing, clock)
    # Then the decision is confirmed and released, and Stripe counts the units once
    assert len(billing.calls) == 2 and len(billing.delivered) == 1
    assert billing.send(billing.calls[-1]) == SendOutcome.ALREADY_DELIVERED
    assert summary.sent == 1 and summary.units_reported == 5 and summary.released == 1
    assert billing.totals() == {("cus_A", "m"): 5}
    assert counter(store).reported == 5 and counter(store).sending is None


def test_a_crash_after_confirm_leaves_only_the_release_for_the_next_run():
    # Given a run that confirmed and died before releasing the counter
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)
    store.after("confirm", crash)
    with pytest.raises(Crash):
        run(store, billing, clock)
    # When the next run comes
    summary = run(store, billing, clock)
    # Then it calls Stripe for nothing and takes the counter out of the backlog
    assert len(billing.calls) == 1 and summary.released == 1 and store.in_backlog == set()


# -- stale runs change nothing --------------------------------------------------------------


def decided_and_crashed(quantity: int = 5) -> tuple[HookedStore, FakeBilling, FakeClock]:
    """A counter with a decision in flight: its run died right after deciding."""
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=quantity)
    store.after("decide", crash)
    with pytest.raises(Crash):
        run(store, billing, clock)
    clock.advance(60)
    return store, billing, clock


def test_a_stale_run_cannot_confirm_a_decision_another_run_already_confirmed():
    # Given run A resending a decision, and run B resending and confirming it meanwhile
    store, billing, clock = decided_and_crashed()
    other_run: list[FlushSummary] = []

    def run_b_first(request: MeterEventRequest) -> None:
        billing.on_call = None
        other_run.append(run(store, billing, clock))

    billing.on_call = run_b_first
    # When A's call returns (Stripe: already delivered) and A confirms
    summary_a = run(store, billing, clock)
    # Then only B's confirmation counted: the units are reported once
    assert other_run[0].sent == 1 and summary_a.sent == 0
    assert counter(store).reported == 5 and billing.totals() == {("cus_A", "m"): 5}


def test_a_stale_run_cannot_quarantine_a_decision_another_run_already_confirmed():
    # Given run A resending a decision, B confirming it meanwhile, and A's call then refused
    store, billing, clock = decided_and_crashed()

    def run_b_first(request: MeterEventRequest) -> None:
        billing.on_call = None
        run(store, billing, clock)
        billing.script = [PermanentBillingError("No such customer", code="resource_missing")]

    billing.on_call = run_b_first
    # When A quarantines what it holds
    summary_a = run(store, billing, clock)
    # Then nothing is quarantined, and the reported units stay as B confirmed them
    assert summary_a.quarantined == 0
    assert counter(store).quarantined == 0 and counter(store).reported == 5
    assert store.quarantined() == []


def test_a_stale_decide_after_another_runs_decide_fails_and_sends_nothing():
    # Given run A that read a counter, and run B that decided, sent and confirmed it meanwhile
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)
    other_run: list[FlushSummary] = []
    store.before("decide", lambda: other_run.append(run(store, billing, clock)))
    # When A decides from what it read
    summary_a = run(store, billing, clock)
    # Then A's decision is refused: one call, and the units reported once
    assert other_run[0].sent == 1 and summary_a.sent == 0
    assert len(billing.calls) == 1 and counter(store).seq == 1
    assert counter(store).reported == 5


def test_a_stale_decide_fails_even_when_another_run_left_its_decision_in_flight():
    # Given run A that read a counter, and run B that decided it and died meanwhile
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)

    def run_b_dies_after_deciding() -> None:
        store.after("decide", crash)
        with pytest.raises(Crash):
            run(store, billing, clock)

    store.before("decide", run_b_dies_after_deciding)
    # When A decides from what it read
    run(store, billing, clock)
    # Then A wrote nothing over B's decision, and sent nothing
    assert billing.calls == [] and counter(store).sending is not None
    assert counter(store).sending.seq == counter(store).seq == 1


# -- Stripe's answers ----------------------------------------------------------------------


def test_a_rate_limited_call_is_retried_with_backoff_honouring_retry_after():
    # Given Stripe answers 429 twice, the second time with Retry-After: 3
    store, billing, clock, sleeps = InMemoryStore(), FakeBilling(), FakeClock(T), []
    record(store, clock)
    billing.script = [RateLimited("slow down"), RateLimited("slow down", retry_after=3.0)]
    # When the flush runs
    summary = run(store, billing, clock, sleeps=sleeps)
    # Then it backed off (jittered, then at least Retry-After) and delivered on the third call
    assert summary.sent == 1 and len(billing.calls) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and sleeps[1] >= 3.0
    assert len({c.identifier for c in billing.calls}) == 1


def test_a_counter_still_rate_limited_after_every_attempt_is_deferred_not_lost():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [RateLimited("slow down") for _ in range(5)]
    summary = run(store, billing, clock)
    assert (summary.sent, summary.deferred) == (0, 1)
    # and the next run delivers the same decision
    assert run(store, billing, clock).sent == 1
    assert billing.totals() == {("cus_A", "m"): 1}
    assert len({c.identifier for c in billing.calls}) == 1


def test_a_retry_after_longer_than_the_time_left_defers_instead_of_sleeping_past_it():
    # Given a run with 60 s left (45 s reserve), and Stripe asking it to come back in 120 s
    store, billing, clock, sleeps = InMemoryStore(), FakeBilling(), FakeClock(T), []
    record(store, clock)
    billing.script = [RateLimited("slow down", retry_after=120.0)]
    deadline = clock() + 60
    # When the flush runs
    summary = run(store, billing, clock, time_left=lambda: deadline - clock(), sleeps=sleeps)
    # Then it does not sleep into its reserve: the decision waits for the next run
    assert sleeps == [] and summary.deferred == 1 and len(billing.calls) == 1
    assert counter(store).sending is not None


def test_a_stripe_outage_leaves_the_decision_in_flight_for_the_next_run():
    # Given Stripe answers 503
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=3)
    billing.script = [TransientBillingError("503 Service Unavailable")]
    # When the flush runs
    summary = run(store, billing, clock)
    # Then the decision is deferred, not quarantined, and the error is reported
    assert summary.deferred == 1 and summary.quarantined == 0 and summary.errors
    assert counter(store).sending is not None and counter(store).quarantined == 0
    # and the next run resends it, once
    again = run(store, billing, clock)
    assert (again.resumed, again.sent) == (1, 1)
    assert billing.calls[0].identifier == billing.calls[1].identifier
    assert billing.totals() == {("cus_A", "m"): 3}


def test_a_timestamp_in_future_answer_is_retried_later_not_quarantined():
    # Given Stripe's clock is behind ours: it answers timestamp_in_future (a transient error)
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=3)
    billing.script = [TransientBillingError("Timestamp is in the future (timestamp_in_future)")]
    # When the flush runs
    summary = run(store, billing, clock)
    # Then nothing is quarantined; the next run delivers the same decision
    assert summary.quarantined == 0 and store.quarantined() == []
    assert run(store, billing, clock).sent == 1
    assert billing.totals() == {("cus_A", "m"): 3}


def test_a_permanent_refusal_quarantines_that_counter_with_the_reason_and_no_other():
    # Given two customers, and Stripe refusing the first for good
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, customer="cus_A", quantity=5)
    record(store, clock, customer="cus_B", quantity=7)
    billing.script = [PermanentBillingError("No such customer", code="resource_missing")]
    # When the flush runs
    summary = run(store, billing, clock, parallel_pairs=1)
    # Then cus_A's units wait in quarantine, with Stripe's reason, and cus_B's are reported
    assert (summary.quarantined, summary.sent) == (1, 1)
    [quarantined] = store.quarantined()
    assert quarantined.customer == "cus_A" and quarantined.quarantined == 5
    assert quarantined.quarantine_reason == "resource_missing: No such customer"
    assert billing.totals() == {("cus_B", "m"): 7}
    # and later runs never send them again, and take the counter out of the backlog
    calls = len(billing.calls)
    run(store, billing, clock)
    run(store, billing, clock)
    assert len(billing.calls) == calls and store.in_backlog == set()


def test_a_bad_api_key_stops_the_run_and_quarantines_nothing():
    # Given six customers, and Stripe refusing the API key
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    for c in "ABCDEF":
        record(store, clock, customer=f"cus_{c}")
    billing.script = [BillingAuthError("Invalid API Key")] * 6
    # When the flush runs
    summary = run(store, billing, clock, parallel_pairs=1)
    # Then it stops after the first refusal, and quarantines nothing
    assert summary.errors and summary.stopped_early and summary.quarantined == 0
    assert len(billing.calls) == 1 and store.quarantined() == []
    # and once the key is fixed, the next run reports all six, the first one resent
    billing.script = []
    again = run(store, billing, clock)
    assert (again.sent, again.resumed) == (6, 1)
    assert billing.totals() == {(f"cus_{c}", "m"): 1 for c in "ABCDEF"}


# -- time: periods, Stripe's windows, stale reads ------------------------------------------


def test_usage_recorded_ahead_into_a_period_not_yet_started_waits_for_that_period():
    # Given, three minutes before December, usage now and usage stamped one minute into December
    before_december = NOV_END - 180
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(before_december)
    record(store, clock, quantity=2)
    record(store, clock, quantity=3, at=NOV_END + 60)
    # When the flush runs before December starts
    run(store, billing, clock)
    # Then only November's usage is sent; December's is not decided, and waits in the backlog
    assert [(c.value, c.timestamp) for c in billing.calls] == [(2, before_december)]
    assert counter(store, period=DEC).seq == 0
    assert ("cus_A", DEC, "m", 0) in store.in_backlog
    # When the flush runs again once December has started
    clock.advance(210)
    run(store, billing, clock)
    # Then December's usage goes, stamped inside December
    last = billing.calls[-1]
    assert last.value == 3 and NOV_END <= last.timestamp == clock() < NOV_END + 31 * DAY


@pytest.mark.parametrize(
    ("flushed_at", "sent"),
    [
        (NOV_END + 35 * DAY - 601, True),  # the period's last second is just young enough
        (NOV_END + 35 * DAY - 600, False),  # inside the 10-minute margin of Stripe's 35 days
        (NOV_END + 36 * DAY, False),
    ],
)
def test_a_period_that_ended_more_than_35_days_ago_is_quarantined_as_too_old(flushed_at, sent):
    # Given November's usage, not flushed until `flushed_at`
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)
    clock.now = flushed_at
    # When the flush runs
    summary = run(store, billing, clock)
    # Then it is sent while Stripe takes its timestamp, and quarantined, unsent, after
    if sent:
        assert summary.sent == 1 and billing.totals() == {("cus_A", "m"): 5}
    else:
        assert summary.quarantined == 1 and billing.calls == []
        [quarantined] = store.quarantined()
        assert quarantined.quarantine_reason.startswith("timestamp_too_far_in_past")
        assert quarantined.quarantined == 5 and quarantined.reported == 0


@pytest.mark.parametrize(
    ("age", "resent"), [(IDENTIFIER_WINDOW, True), (IDENTIFIER_WINDOW + 1, False)]
)
def test_a_decision_unconfirmed_for_more_than_23_hours_is_quarantined_not_resent(age, resent):
    # Given a decision in flight since T
    store, billing, clock = decided_and_crashed()
    # When the next run comes `age` seconds after the decision
    clock.now = T + age
    summary = run(store, billing, clock)
    # Then it is resent inside 23 hours, and after that waits for an operator instead
    if resent:
        assert summary.sent == 1 and billing.totals() == {("cus_A", "m"): 5}
    else:
        assert summary.quarantined == 1 and billing.calls == []
        [quarantined] = store.quarantined()
        assert quarantined.quarantine_reason.startswith("unconfirmed_decision")
        assert quarantined.quarantined == 5


def test_a_run_sends_nothing_it_read_more_than_ten_minutes_ago():
    # Given a run with 15 minutes left, and Stripe asking it to come back in 11
    store, billing, clock, sleeps = InMemoryStore(), FakeBilling(), FakeClock(T), []
    record(store, clock, quantity=5)
    billing.script = [RateLimited("slow down", retry_after=STALE_READ + 60)]
    # When the run has waited that long
    summary = run(store, billing, clock, time_left=900, sleeps=sleeps)
    assert sleeps == [STALE_READ + 60]
    # Then it does not send what it read before waiting: the decision is left for the next run
    assert len(billing.calls) == 1 and summary.deferred == 1 and summary.sent == 0
    assert counter(store).sending is not None
    assert run(store, billing, clock).sent == 1
    assert billing.totals() == {("cus_A", "m"): 5}


# -- large values ----------------------------------------------------------------------------


def test_a_value_above_15_digits_is_split_across_decisions():
    # Given a counter of 2,001 trillion units: more than two calls' worth
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    for _ in range(20):
        record(store, clock, quantity=10**12, count=100)
    record(store, clock, quantity=10**12)
    total = 2001 * 10**12
    # When flushes run until the counter leaves the backlog
    runs = 0
    while store.in_backlog and runs < 5:
        run(store, billing, clock)
        runs += 1
    # Then each call carries at most 15 digits, under its own identifier, and the sum is exact
    values = [c.value for c in billing.calls]
    assert values == [MAX_STRIPE_VALUE, MAX_STRIPE_VALUE, total - 2 * MAX_STRIPE_VALUE]
    assert len({c.identifier for c in billing.calls}) == 3
    assert counter(store).reported == total and billing.totals() == {("cus_A", "m"): total}


# -- concurrent records, sustained ingest ----------------------------------------------------


@pytest.mark.parametrize(
    "step",
    [
        ("before", "decide"),  # between the read and the decision
        ("after", "decide"),  # between the decision and the call
        ("before", "confirm"),  # between the call and the confirmation
        ("after", "confirm"),  # between the confirmation and the release
    ],
    ids=lambda step: f"{step[0]} {step[1]}",
)
def test_usage_recorded_during_any_step_of_a_flush_is_reported_exactly_once(step):
    # Given a counter with 5 units, and 3 more recorded at `step` of the flush
    store, billing, clock = HookedStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=5)
    when, name = step
    getattr(store, when)(name, lambda: record(store, clock, quantity=3))
    # When flushes run until the backlog is empty
    for _ in range(3):
        run(store, billing, clock)
    # Then Stripe holds all 8 units once, and the counter says so
    assert billing.totals() == {("cus_A", "m"): 8}
    assert counter(store).quantity == counter(store).reported == 8
    assert store.in_backlog == set() and len(billing.calls) == 2


def test_sustained_ingest_between_pages_and_runs_still_drains():
    # Given 20 (customer, meter) pairs with usage, and records arriving after every page a run
    # reads and between runs, for four runs: some into counters a run has just reported
    rng = random.Random(11)
    store, billing, clock = HookedStore(page_size=4), FakeBilling(), FakeClock(T)
    pairs = [(f"cus_S{i}", m) for i in range(10) for m in ("m", "n")]
    accepted: dict[tuple[str, str], int] = {}
    ingesting = True

    def ingest() -> None:
        customer, meter = rng.choice(pairs)
        quantity = rng.randint(1, 9)
        record(store, clock, customer=customer, meter=meter, quantity=quantity)
        accepted[(customer, meter)] = accepted.get((customer, meter), 0) + quantity

    def ingest_after_each_page() -> None:
        if ingesting:
            ingest()
        store.after("backlog", ingest_after_each_page)

    for customer, meter in pairs:
        record(store, clock, customer=customer, meter=meter, quantity=5)
        accepted[(customer, meter)] = 5
    store.after("backlog", ingest_after_each_page)
    # When four runs go while records keep coming
    runs = []
    for _ in range(4):
        runs.append(run(store, billing, clock, parallel_pairs=2))
        ingest()
        clock.advance(60)
    # and runs go on after the records stop
    ingesting = False
    drained_in = 0
    while store.in_backlog and drained_in < 3:
        runs.append(run(store, billing, clock, parallel_pairs=2))
        drained_in += 1
    # Then every run made progress, and the backlog drained with each unit reported once
    assert all(r.sent > 0 for r in runs)
    assert store.in_backlog == set() and drained_in <= 2
    assert billing.totals() == accepted
    assert all(c.reported == c.quantity for c in store.counters.values())


# -- bounded work: pages, time, parallel pairs -------------------------------------------------


def test_the_backlog_is_read_one_page_at_a_time_as_the_work_goes():
    # Given ten counters, and pages of three
    store, billing, clock = HookedStore(page_size=3), FakeBilling(), FakeClock(T)
    for i in range(10):
        record(store, clock, customer=f"cus_P{i}")
    calls_at_each_read: list[int] = []
    for _ in range(4):
        store.after("backlog", lambda: calls_at_each_read.append(len(billing.calls)))
    # When the flush runs
    summary = run(store, billing, clock)
    # Then it read each page only after sending the one before: it never holds more than a page
    assert calls_at_each_read == [0, 3, 6, 9]
    assert summary.counters_read == 10 and summary.sent == 10


def test_with_no_time_left_a_run_takes_no_new_work():
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    summary = run(store, billing, clock, time_left=10)
    assert summary.stopped_early and billing.calls == [] and counter(store).seq == 0


def test_a_run_that_runs_out_of_time_stops_early_and_the_next_run_continues():
    # Given ten counters, and Stripe calls that take a second each
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    for i in range(10):
        record(store, clock, customer=f"cus_R{i}")
    billing.on_call = lambda _: clock.advance(1)
    # When runs go, each with three seconds of work before its 45-second reserve
    runs = []
    while store.in_backlog and len(runs) < 10:
        deadline = clock() + 48
        runs.append(
            run(store, billing, clock, time_left=lambda d=deadline: d - clock(), parallel_pairs=1)
        )
        # Then no run overruns its reserve
        assert deadline - clock() >= 45
    # and every run made progress, the first stopping early, and each unit went once
    assert [r.sent for r in runs] == [3, 3, 3, 1]
    assert runs[0].stopped_early and not runs[-1].stopped_early
    assert billing.totals() == {(f"cus_R{i}", "m"): 1 for i in range(10)}


def test_pairs_are_sent_in_parallel_but_one_customer_and_meter_never_two_at_once():
    # Given four (customer, meter) pairs; cus_A's has three counters (two periods, two shards)
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    for c in "ABCD":
        record(store, clock, customer=f"cus_{c}")
    record(store, clock, customer="cus_A", at="2026-10-31T12:00:00Z")
    add_shard(store, counter(store), shard=1, quantity=2)
    # and Stripe holding each pair's first call until four calls are in flight at once
    meeting = threading.Barrier(4, timeout=5)
    first_calls: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def meet(request: MeterEventRequest) -> None:
        with lock:
            first = (request.customer, request.event_name) not in first_calls
            first_calls.add((request.customer, request.event_name))
        if first:
            meeting.wait()

    billing.on_call = meet
    # When the flush runs four pairs at a time
    summary = run(store, billing, clock, parallel_pairs=4)
    # Then the four pairs were in flight together, but never two calls of one pair
    assert summary.sent == 6 and not summary.errors
    assert billing.max_in_flight == 4 and billing.max_in_flight_per_pair == 1


# -- store faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault_on", ["backlog", "decide", "confirm", "release"])
def test_a_store_fault_leaves_the_work_for_the_next_run(fault_on):
    # Given the table failing one kind of request during a run
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=4)

    def broken(*args: object, **kwargs: object) -> None:
        raise ConnectionError("table unavailable")

    setattr(store, fault_on, broken)
    # When the run meets it
    summary = run(store, billing, clock)
    # Then it reports the error instead of losing or inventing usage
    assert summary.errors
    # and once the table is back, the next run finishes the job, once
    delattr(store, fault_on)
    run(store, billing, clock)
    assert billing.totals() == {("cus_A", "m"): 4}
    assert counter(store).reported == 4 and store.in_backlog == set()


def test_the_timestamp_of_a_resent_decision_does_not_move_with_the_clock():
    # Given a decision made at T, left in flight by a 503
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock)
    billing.script = [TransientBillingError("503")]
    run(store, billing, clock)
    # When it is resent an hour later
    clock.advance(3600)
    run(store, billing, clock)
    # Then both calls carry the decision's timestamp
    assert [c.timestamp for c in billing.calls] == [T, T]


def test_a_counter_with_more_accounted_than_recorded_is_reported_as_an_error_not_billed():
    # Given a counter whose reported units exceed what was recorded (a corrupted item)
    store, billing, clock = InMemoryStore(), FakeBilling(), FakeClock(T)
    record(store, clock, quantity=3)
    key = (counter(store).customer, NOV, "m", 0)
    store.counters[key] = counter(store).model_copy(update={"reported": 5})
    # When the flush meets it
    summary = run(store, billing, clock)
    # Then it sends nothing, keeps the counter for a person to look at, and says why
    assert billing.calls == [] and summary.released == 0
    assert "2 units more accounted than recorded" in summary.errors[0]
    assert [c.id for page in store.backlog() for c in page] == [counter(store).id]
