"""One deterministic test per fault a production flush meets (issue 9), on DynamoDB Local and the
fake Stripe behind the real SDK. Each ends in the invariant (tests/faults/harness.py): Stripe's
total per (customer, meter, period) equals the accepted units less the quarantined ones, the
counters customers read agree with both, every Stripe event lies in its counter's period, and
nothing is left in the backlog."""

import random
import threading
import time
from datetime import UTC, datetime

import pytest

from tests.faults.harness import CLEAN, Fault, Pause
from tests.faults.world import World, in_thread, run
from tests.polling import wait_until
from usage_meter.logic.flush import IDENTIFIER_WINDOW, FlushPolicy
from usage_meter.logic.periods import calendar_month
from usage_meter.logic.quarantine import REPLAY_GUARD, ReplayRefused, replay


def ten_events(world: World, customer: str = "cus_F1", meter: str = "ai_messages") -> list[dict]:
    now = world.now()
    return [
        {
            "stripe_customer_id": customer,
            "meter": meter,
            "quantity": 3,
            "timestamp": now - 60 - i,
            "idempotency_key": f"{customer}-{meter}-{i}",
        }
        for i in range(10)
    ]


def one_event(world: World, key: str, quantity: int = 7, customer: str = "cus_F1") -> dict:
    return {
        "stripe_customer_id": customer,
        "meter": "ai_messages",
        "quantity": quantity,
        "timestamp": world.now() - 5,
        "idempotency_key": key,
    }


def seqs(world: World) -> list[int]:
    return [int(e.identifier.rsplit(".", 1)[1]) for e in world.stripe.accepted()]


# -- the flush dies between two steps --------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "fault"),
    [
        ("reading the backlog index", Fault("read_backlog", 1, "crash")),
        ("reading the page's counters", Fault("read_counters", 1, "crash")),
        ("after reading, before deciding", Fault("decide", 1, "crash")),
        ("after deciding, before sending", Fault("decide", 1, "crash_after")),
        ("after Stripe accepted, before confirming", Fault("confirm", 1, "crash")),
        ("after confirming, before releasing", Fault("confirm", 1, "crash_after")),
        ("while releasing", Fault("release", 1, "crash")),
        ("after releasing", Fault("release", 1, "crash_after")),
    ],
)
def test_a_flush_killed_between_any_two_steps_is_finished_by_the_next_run(world, where, fault):
    # Given ten events in one counter
    world.record(ten_events(world))
    # When a flush is killed at `where`
    assert world.flush([fault]) is None
    # Then the next runs finish the job, and Stripe bills it once, in one call's identifier
    world.settle()
    assert world.invariant() == CLEAN
    assert seqs(world) == [1]


def test_a_kill_after_stripe_accepted_resends_the_same_identifier(world):
    world.record(ten_events(world))
    world.flush([Fault("confirm", 1, "crash")])
    [first] = world.stripe.accepted()
    calls = world.stripe.calls
    [summary] = world.settle()
    assert world.stripe.calls == calls + 1  # one resend, answered as already delivered
    assert summary.resumed == 1 and summary.sent == 1
    assert [e.identifier for e in world.stripe.accepted()] == [first.identifier]
    assert world.invariant() == CLEAN


@pytest.mark.parametrize(
    "fault", [Fault("quarantine", 1, "crash"), Fault("quarantine", 1, "crash_after")]
)
def test_a_flush_killed_around_a_quarantine_leaves_the_units_quarantined_once(world, fault):
    world.record(ten_events(world, "cus_F1") + ten_events(world, "cus_F2"))
    world.stripe.reject_customer("cus_F1")
    world.flush([fault])
    world.settle()
    [counter] = world.quarantined()
    assert counter.customer == "cus_F1" and counter.quarantined == 30
    assert world.invariant() == CLEAN


# -- DynamoDB applied a write but the caller could not tell -----------------------------------


@pytest.mark.parametrize("kind", ["retried", "lost"])
@pytest.mark.parametrize("step", ["decide", "confirm", "release"])
def test_a_write_applied_but_answered_as_a_failure_loses_and_doubles_nothing(world, step, kind):
    # Given a write DynamoDB applied whose answer was lost: the SDK's retry failed its own
    # condition (retried), or the caller saw a timeout (lost)
    world.record(ten_events(world))
    assert world.flush([Fault(step, 1, kind)]) is not None
    world.settle()
    # Then the next run recognises the state it finds: every unit billed once, nothing stranded
    assert world.invariant() == CLEAN
    assert seqs(world) == [1]


@pytest.mark.parametrize("kind", ["retried", "lost", "conflict"])
def test_a_quarantine_write_applied_lost_or_cancelled_quarantines_once(world, kind):
    world.record(ten_events(world))
    world.stripe.reject_customer("cus_F1")
    world.flush([Fault("quarantine", 1, kind)])
    world.settle()
    [counter] = world.quarantined()
    assert counter.quarantined == 30 and counter.sending is None
    assert world.invariant() == CLEAN


@pytest.mark.parametrize(
    "step", ["read_backlog", "read_counters", "decide", "confirm", "release", "quarantine"]
)
def test_dynamodb_throttling_at_any_step_loses_nothing(world, step):
    world.record(ten_events(world, "cus_F1") + ten_events(world, "cus_F2"))
    world.stripe.reject_customer("cus_F2")  # so that a quarantine happens
    summary = world.flush([Fault(step, 1, "throttle")])
    assert summary is not None and summary.errors
    world.settle()
    assert world.invariant() == CLEAN
    assert len(world.stripe.accepted()) == 1 and len(world.quarantined()) == 1


# -- Stripe misbehaves -------------------------------------------------------------------------


def test_stripe_500s_beyond_the_sdks_retries_leave_the_decision_for_the_next_run(world):
    world.record(ten_events(world))
    world.stripe.inject("server_error", count=3)
    summary = world.flush()
    assert summary.deferred == 1 and summary.errors and world.stripe.accepted() == []
    [counter] = world.counters()
    assert counter.sending is not None  # decided, in flight
    world.settle()
    assert world.invariant() == CLEAN and seqs(world) == [1]


def test_a_500_stripe_saved_under_the_idempotency_key_does_not_pin_the_usage(world):
    # Given Stripe answers the first call with a 500 it saves under the request's
    # Idempotency-Key, and replays to the SDK's own retries (same key)
    world.record(ten_events(world))
    world.stripe.inject("saved_server_error")
    summary = world.flush()
    assert world.stripe.calls == 3  # the call and the SDK's two retries, all the saved 500
    assert summary.deferred == 1 and summary.errors and world.stripe.accepted() == []
    # When the next run resends the decision
    second = world.flush()
    # Then it delivers under the same identifier: a new call carries a new key
    assert second.sent == 1 and second.resumed == 1
    assert seqs(world) == [1]
    assert world.invariant() == CLEAN


def test_a_429_is_retried_with_backoff_in_the_same_run(world):
    world.record(ten_events(world))
    world.stripe.inject("rate_limit", count=2)
    summary = world.flush()
    assert summary.sent == 1 and world.invariant() == CLEAN


def test_a_429_with_retry_after_waits_at_least_that_long(world):
    world.record(ten_events(world))
    world.stripe.inject("rate_limit", retry_after=0.3)
    started = time.monotonic()
    summary = world.flush()
    assert time.monotonic() - started >= 0.3
    assert summary.sent == 1 and world.invariant() == CLEAN


def test_a_timeout_is_billed_once(world):
    world.record(ten_events(world))
    world.stripe.inject("delay", seconds=0.6)
    summary = world.flush(stripe_timeout=0.3)
    # Stripe finishes the request the client gave up on: let it land in this test, not the next
    wait_until(lambda: world.stripe.accepted())
    world.settle()
    assert summary is not None and world.invariant() == CLEAN and seqs(world) == [1]


def test_lost_responses_after_stripe_processed_the_event_bill_once(world):
    world.record(ten_events(world))
    # Given Stripe processed the event and the answer never arrived (an SDK without retries: a
    # retry under the same Idempotency-Key would get the saved answer)
    world.stripe.inject("lost_response")
    summary = world.flush(stripe_retries=0)
    assert summary.deferred == 1 and len(world.stripe.accepted()) == 1
    # When the next run resends the decision, Stripe answers "already exists": delivered
    [second] = world.settle()
    assert second.sent == 1 and second.resumed == 1
    assert world.invariant() == CLEAN and seqs(world) == [1]


def test_a_lost_response_retried_by_the_sdk_gets_the_saved_answer(world):
    world.record(ten_events(world))
    world.stripe.inject("lost_response")
    summary = world.flush()
    assert summary.sent == 1 and world.stripe.calls == 2
    assert world.invariant() == CLEAN and seqs(world) == [1]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("resource_missing", "No such customer: 'cus_F1'"),
        ("timestamp_too_far_in_past", "Timestamp is too far in the past"),
        ("meter_event_invalid_value", "Value is too large"),
    ],
)
def test_a_permanent_rejection_quarantines_that_counter_and_others_keep_flowing(
    world, code, message
):
    world.record(ten_events(world, "cus_F1") + ten_events(world, "cus_F2"))
    world.stripe.inject("reject", code=code, message=message, customer="cus_F1")
    summary = world.flush()
    assert (summary.quarantined, summary.sent) == (1, 1)
    [counter] = world.quarantined()
    assert counter.customer == "cus_F1" and counter.quarantine_reason == f"{code}: {message}"
    # Quarantined usage is accounted for, never retried by later runs, and blocks nothing
    world.settle()
    assert world.invariant() == CLEAN and len(world.quarantined()) == 1


def test_a_timestamp_in_the_future_is_transient_not_quarantined(world):
    # Given Stripe's clock runs 10 minutes behind ours: it refuses "now" as in the future
    world.record(ten_events(world))
    world.stripe_clock.skew = -600
    summary = world.flush()
    assert summary.deferred == 1 and summary.quarantined == 0 and world.quarantined() == []
    # When the clocks agree again, the same decision is delivered
    world.stripe_clock.skew = 0
    world.settle()
    assert world.invariant() == CLEAN and seqs(world) == [1]


@pytest.mark.parametrize("when", ["mid-month", "two minutes before the month ends"])
def test_an_event_recorded_5_minutes_ahead_with_stripe_3s_behind_is_billed_not_quarantined(
    world, when
):
    month = calendar_month(datetime.fromtimestamp(world.now(), UTC))
    start = (
        month.end.timestamp() - 120
        if when.startswith("two")
        else month.start.timestamp() + 14 * 86400
    )
    world.clock.set(start)
    world.stripe_clock.skew = -3
    # Given an event stamped 5 minutes ahead of the service's clock, and one stamped now
    world.record(
        [
            {**one_event(world, "ahead"), "timestamp": world.now() + 300},
            one_event(world, "now", quantity=1),
        ]
    )
    first = world.flush()
    assert first.quarantined == 0 and first.errors == []
    # When the clock passes the event's period start (if it lies in the next period)
    world.clock.advance(200)
    world.settle()
    # Then it is billed, inside its period, nothing quarantined
    assert world.quarantined() == []
    assert world.invariant() == CLEAN
    assert sum(e.value for e in world.stripe.accepted()) == 8


# -- quarantine and replay ----------------------------------------------------------------


def test_a_replayed_quarantine_is_billed_once_the_cause_is_fixed(world):
    world.record(ten_events(world))
    world.stripe.reject_customer("cus_F1")
    world.flush()
    [counter] = world.quarantined()
    # The guard: a run that read the decision may still be going
    with pytest.raises(ReplayRefused):
        replay(world.store, counter.id, now=world.now())
    world.clock.advance(REPLAY_GUARD)
    world.stripe.accept_customer("cus_F1")  # the operator created the customer
    replay(world.store, counter.id, now=world.now())
    world.settle()
    assert world.quarantined() == [] and world.invariant() == CLEAN
    assert seqs(world) == [2]  # a fresh decision, a fresh identifier


@pytest.mark.parametrize(
    "held",
    [
        "after deciding, before sending",
        "backing off a 429",
        "with Stripe's refusal, before quarantining",
    ],
)
def test_a_stale_run_cannot_send_or_quarantine_a_decision_replayed_since(world, held):
    # Given run A holds decision 1 (customer unknown to Stripe) at `held`
    world.record(ten_events(world))
    world.stripe.reject_customer("cus_F1")
    if held == "after deciding, before sending":
        pause = Pause("decided")
        flusher, _ = world.flusher(tap=pause)
    elif held == "backing off a 429":
        world.stripe.inject("rate_limit")
        pause = Pause("backoff")
        flusher, _ = world.flusher(sleep=lambda seconds: pause("backoff"))
    else:
        pause = Pause("answered")
        flusher, _ = world.flusher(tap=pause)
    thread, out = in_thread(lambda: run(flusher))
    assert pause.reached.wait(30)
    # and run B resends decision 1, Stripe refuses it, B quarantines it (held: a resend)
    b = world.flush()
    assert b.quarantined == 1
    # When, after the replay guard, the operator fixes the customer and replays
    world.clock.advance(REPLAY_GUARD + 1)
    world.stripe.accept_customer("cus_F1")
    [counter] = world.quarantined()
    replay(world.store, counter.id, now=world.now())
    # and run C sends the replayed decision 1 again, as it was
    c = world.flush()
    assert c.sent == 1 and seqs(world) == [1]
    calls = world.stripe.calls
    # Then A, resumed, can neither send decision 1 nor quarantine it
    pause.resume()
    thread.join(30)
    [summary_a] = out
    world.settle()
    assert world.invariant() == CLEAN and seqs(world) == [1]
    assert world.quarantined() == []
    assert summary_a.sent == 0 and summary_a.quarantined == 0
    assert world.stripe.calls == calls


def test_a_stale_confirm_after_another_run_confirmed_changes_nothing(world):
    # Given run A got Stripe's acceptance of decision 1 and stalls before confirming
    world.record(ten_events(world))
    pause = Pause("answered")
    flusher, _ = world.flusher(tap=pause)
    thread, out = in_thread(lambda: run(flusher))
    assert pause.reached.wait(30)
    # and run B resends it ("already exists"), confirms, and new usage is billed after
    b = world.flush()
    assert b.sent == 1 and b.resumed == 1
    world.record([one_event(world, "later")])
    world.flush()
    assert seqs(world) == [1, 2]
    # When A confirms decision 1 late
    pause.resume()
    thread.join(30)
    [summary_a] = out
    # Then nothing changes: reported counts each unit once
    assert summary_a.sent == 0
    world.settle()
    assert world.invariant() == CLEAN


# -- recording never stops ------------------------------------------------------------------


@pytest.mark.parametrize(
    "between",
    [
        ("read", "reading and deciding"),
        ("decided", "deciding and sending"),
        ("answered", "sending and confirming"),
        ("confirmed", "confirming and releasing"),
    ],
    ids=lambda b: b[1],
)
def test_an_event_recorded_between_two_steps_of_a_flush_is_counted_once(world, between):
    point, _ = between
    world.record(ten_events(world))
    recorded = []

    def record_once(at: str, subject: object) -> None:
        if at == point and not recorded:
            recorded.append(at)
            world.record([one_event(world, f"during-{point}")])

    summary = world.flush(tap=record_once)
    assert recorded and summary.sent == 1 and summary.errors == []
    world.settle()
    assert world.invariant() == CLEAN
    assert sum(e.value for e in world.stripe.accepted()) == 37
    assert seqs(world) == [1, 2]


def test_sustained_ingest_faster_than_a_run_still_drains(world):
    # Given usage keeps arriving: a burst before every run and between every page a run reads,
    # far more events than an old-design run (one claim per event) could take
    rng = random.Random(7)
    pairs = 12

    def burst(at: str, subject: object) -> None:
        if at == "read":
            world.record_random(rng, 60, customers=pairs // 2)

    runs = 5
    for _ in range(runs):
        world.record_random(rng, 150, customers=pairs // 2)
        summary = world.flush(tap=burst)
        assert summary.errors == [] and summary.deferred == 0
    # Then each run reported every counter it read, once: Stripe calls follow the counters
    counters = world.counters()
    assert world.stripe.calls <= runs * len(counters)
    # and once ingest stops, one run drains it all
    final = world.flush()
    assert final.errors == [] and world.backlog_size() == 0
    assert world.invariant() == CLEAN


def test_cost_follows_counters_not_events(world):
    rng = random.Random(1)
    for _ in range(10):
        world.record(
            {**one_event(world, f"k{rng.randrange(10**9)}"), "quantity": rng.randint(1, 9)}
            for _ in range(100)
        )
    summary = world.flush()
    assert summary.sent == 1 and world.stripe.calls == 1
    assert world.invariant() == CLEAN


# -- concurrency ---------------------------------------------------------------------------------


def test_two_flushes_at_once_bill_every_unit_once(world):
    world.record_random(random.Random(3), 200, customers=6)
    runs = [in_thread(lambda: world.flush()) for _ in range(2)]
    for thread, _ in runs:
        thread.join()
    assert all(out[0] is not None for _, out in runs)
    world.settle()
    assert world.invariant() == CLEAN
    # Overlaps happen only across runs, and the 429 they cause is retried
    assert world.stripe.max_concurrent_per_pair <= 2


def test_two_flushes_and_recording_at_once_bill_every_unit_once(world):
    rng = random.Random(5)
    world.record_random(rng, 100)
    recorder = threading.Thread(target=lambda: [world.record_random(rng, 20) for _ in range(5)])
    flushes = [in_thread(lambda: world.flush()) for _ in range(2)]
    recorder.start()
    recorder.join()
    for thread, _ in flushes:
        thread.join()
    world.settle()
    assert world.invariant() == CLEAN


# -- more than one run can do ----------------------------------------------------------------


def test_a_backlog_larger_than_one_run_stops_in_time_and_later_runs_finish(world):
    rng = random.Random(11)
    for _ in range(6):
        world.record_random(rng, 200, customers=60)
    # Given a Lambda whose time runs low after a few dozen counters
    budget = iter([300.0] * 40)
    summary = world.flush(
        time_left=lambda: next(budget, 0.0),
        policy=FlushPolicy(reserve_seconds=1.0, backoff_base=0.01, backoff_cap=0.05),
    )
    # Then the run stops taking work, leaving consistent state
    assert summary.stopped_early and summary.sent < summary.counters_read
    world.settle(runs=20)
    assert world.invariant() == CLEAN


def test_a_decision_unconfirmed_for_a_day_waits_for_an_operator(world):
    # Given Stripe never answered decision 1 for a day
    world.record(ten_events(world))
    world.stripe.inject("server_error", count=3)
    world.flush()
    world.clock.advance(IDENTIFIER_WINDOW + 60)
    # Then the next run does not resend it blind: it is quarantined, for an operator to check
    summary = world.flush()
    assert summary.quarantined == 1 and world.stripe.calls == 3
    [counter] = world.quarantined()
    assert counter.quarantine_reason.startswith("unconfirmed_decision")
    world.settle()
    assert world.invariant() == CLEAN and world.stripe.calls == 3
    # and it is held: a replay without the operator saying they checked Stripe is refused
    assert counter.held is not None
    world.clock.advance(REPLAY_GUARD)
    with pytest.raises(ReplayRefused, match="Stripe may already have"):
        replay(world.store, counter.id, now=world.now())
    # and once the operator has checked Stripe (it has nothing) and replays fresh, billed once
    replay(world.store, counter.id, now=world.now(), fresh=True)
    world.settle()
    assert world.invariant() == CLEAN and seqs(world) == [2]


def test_a_refused_resend_of_a_delivered_decision_is_held_and_billed_once(world):
    # Given a decision Stripe took whose answer was lost, and then a refusal of its resend (the
    # fake validates the customer before it deduplicates, as Stripe may)
    world.record(ten_events(world))
    world.stripe.inject("lost_response")
    world.flush(stripe_retries=0)  # delivered, answer lost: decision 1 stays in flight
    world.stripe.reject_customer("cus_F1")
    # When the next run resends it and Stripe refuses
    refused = world.flush()
    # Then it is quarantined with the decision held, not its units made sendable anew
    assert refused is not None and refused.quarantined == 1
    [held] = world.quarantined()
    assert held.held is not None and held.unsent == 0
    # And once the cause is fixed and it is replayed, decision 1 itself is sent again, which
    # Stripe recognises: billed once
    world.stripe.accept_customer("cus_F1")
    world.clock.advance(REPLAY_GUARD)
    replay(world.store, held.id, now=world.now())
    world.settle()
    assert world.invariant() == CLEAN and seqs(world) == [1]
