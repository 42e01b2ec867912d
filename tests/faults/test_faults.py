"""One deterministic test per fault a production flush meets (issue 3). Each ends in the
invariant: for every (customer, meter, period), Stripe's total (each identifier once) equals the
accepted quantity; nothing left unreported except quarantined batches."""

import random
import threading
import time

import pytest

from tests.faults.harness import Fault
from usage_meter.logic.flush import FlushPolicy

CLEAN = {"lost": 0, "doubled": 0, "left_unreported": 0}
NOW = int(time.time())


def ten_events(
    customer: str = "cus_F1", meter: str = "ai_messages", quantity: int = 3
) -> list[dict]:
    return [
        {
            "stripe_customer_id": customer,
            "meter": meter,
            "quantity": quantity,
            "timestamp": NOW - 60 - i,
            "idempotency_key": f"{customer}-{meter}-{i}",
        }
        for i in range(10)
    ]


# -- the flush dies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "fault"),
    [
        ("after planning", Fault("update_item", 1, "crash")),
        ("half-way through claiming", Fault("update_item", 5, "crash")),
        (
            "after claiming, before sending",
            Fault("update_item", 11, "crash"),
        ),  # the batch's own update
        ("after Stripe accepted, before confirming", Fault("transact_write_items", 1, "crash")),
    ],
)
def test_a_flush_killed_anywhere_is_finished_by_the_next_run_without_doubling(world, where, fault):
    # Given ten events in one group
    world.record(ten_events())
    # When a flush is killed at `where`
    assert world.flush([fault]) is None
    # Then the next runs finish the job, and Stripe bills it once
    world.settle()
    assert world.invariant() == CLEAN
    assert len(world.stripe.accepted()) == 1


def test_a_kill_after_stripe_accepted_resends_the_same_identifier(world):
    world.record(ten_events())
    world.flush([Fault("transact_write_items", 1, "crash")])
    [first] = world.stripe.accepted()
    calls = world.stripe.calls
    world.settle()
    assert world.stripe.calls == calls + 1  # one resend, answered as already delivered
    assert [e.identifier for e in world.stripe.accepted()] == [first.identifier]


# -- Stripe misbehaves ------------------------------------------------------------------------


def test_stripe_500s_beyond_the_sdks_retries_leave_the_batch_for_the_next_run(world):
    world.record(ten_events())
    world.stripe.inject("server_error", count=3)
    summary = world.flush()
    assert summary.groups_deferred == 1 and summary.errors and world.stripe.accepted() == []
    world.settle()
    assert world.invariant() == CLEAN


def test_a_429_without_retry_after_is_retried_with_backoff_in_the_same_run(world):
    world.record(ten_events())
    world.stripe.inject("rate_limit", count=2)
    summary = world.flush()
    assert summary.groups_sent == 1 and world.invariant() == CLEAN


def test_a_429_with_retry_after_waits_at_least_that_long(world):
    world.record(ten_events())
    world.stripe.inject("rate_limit", retry_after=0.3)
    started = time.monotonic()
    summary = world.flush()
    assert time.monotonic() - started >= 0.3
    assert summary.groups_sent == 1 and world.invariant() == CLEAN


def test_a_timeout_is_retried_under_the_same_idempotency_key(world):
    world.record(ten_events())
    world.stripe.inject("delay", seconds=0.6)
    summary = world.flush(stripe_timeout=0.3)
    world.settle()
    assert summary is not None and world.invariant() == CLEAN and len(world.stripe.accepted()) == 1


def test_a_lost_response_after_stripe_processed_the_event_bills_once(world):
    world.record(ten_events())
    world.stripe.inject("lost_response", count=3)  # the first and both SDK retries
    world.flush()
    world.settle()
    assert world.invariant() == CLEAN and len(world.stripe.accepted()) == 1


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("resource_missing", "No such customer: 'cus_F1'"),
        ("timestamp_too_far_in_past", "Timestamp is too far in the past"),
        ("meter_event_invalid_value", "Value is too large"),
    ],
)
def test_a_permanent_rejection_quarantines_that_batch_and_others_keep_flowing(world, code, message):
    world.record(ten_events("cus_F1") + ten_events("cus_F2"))
    world.stripe.inject("reject", code=code, message=message, customer="cus_F1")
    summary = world.flush()
    assert (summary.groups_quarantined, summary.groups_sent) == (1, 1)
    [batch] = world.store.quarantined_batches()
    assert batch.customer == "cus_F1" and batch.reason == f"{code}: {message}"
    # Quarantined usage is accounted for, never retried by later runs, and blocks nothing
    world.settle()
    assert world.invariant() == CLEAN
    assert len(world.store.quarantined_batches()) == 1


def test_a_replayed_quarantined_batch_is_billed_once_the_cause_is_fixed(world):
    from usage_meter.logic.quarantine import replay

    world.record(ten_events("cus_F1"))
    world.stripe.reject_customer("cus_F1")
    world.flush()
    [batch] = world.store.quarantined_batches()
    world.stripe.accept_customer("cus_F1")  # the operator created the customer
    replay(world.store, batch.id, now=int(time.time()))
    world.settle()
    assert world.store.quarantined_batches() == [] and world.invariant() == CLEAN


# -- concurrency ---------------------------------------------------------------------------------


def test_two_flushes_at_once_bill_every_unit_once(world):
    rng = random.Random(3)
    world.record_random(rng, 200, customers=6)
    summaries = []
    runs = [threading.Thread(target=lambda: summaries.append(world.flush())) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    world.settle()
    assert world.invariant() == CLEAN
    assert (
        world.stripe.max_concurrent_per_pair <= 2
    )  # overlaps happen only across runs, and 429 is handled


def test_events_recorded_while_a_flush_runs_are_billed_once(world):
    rng = random.Random(5)
    world.record_random(rng, 100)
    recorder = threading.Thread(target=lambda: [world.record_random(rng, 20) for _ in range(5)])
    recorder.start()
    world.flush()
    recorder.join()
    world.settle()
    assert world.invariant() == CLEAN


# -- DynamoDB misbehaves -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault("put_item", 1, "throttle"),  # planning
        Fault("update_item", 3, "throttle"),  # claiming
        Fault("update_item", 11, "throttle"),  # fixing the batch after claiming
        Fault("transact_write_items", 1, "throttle"),  # confirming
    ],
)
def test_dynamodb_throttling_loses_nothing(world, fault):
    world.record(ten_events())
    summary = world.flush([fault])
    assert summary is not None and summary.errors
    world.settle()
    assert world.invariant() == CLEAN and len(world.stripe.accepted()) == 1


def test_a_cancelled_confirm_transaction_is_retried_in_the_same_run(world):
    world.record(ten_events())
    summary = world.flush([Fault("transact_write_items", 1, "conflict")])
    assert summary.groups_sent == 1 and not summary.errors and world.invariant() == CLEAN


@pytest.mark.parametrize(
    ("step", "fault"),
    [
        ("planning", Fault("put_item", 1, "condition")),
        ("claiming", Fault("update_item", 3, "condition")),
        ("fixing the batch", Fault("update_item", 11, "condition")),
        ("confirming", Fault("transact_write_items", 1, "condition")),
    ],
)
def test_a_conditional_write_retried_after_a_lost_answer_loses_and_doubles_nothing(
    world, step, fault
):
    # Given a write that DynamoDB applied, whose answer was lost, so the retry fails its condition
    world.record(ten_events())
    world.flush([fault])
    world.settle()
    # Then the flush recognises its own write: every unit billed once, nothing stranded
    assert world.invariant() == CLEAN and len(world.stripe.accepted()) == 1


def test_a_claim_that_loses_to_a_concurrent_batch_leaves_the_event_to_it(world):
    from usage_meter.logic.flush import plan

    # Given this run planned all ten events, and a concurrent run's batch took four of them
    world.record(ten_events())
    events = list(world.store.backlog())
    [ours] = plan(events, NOW)
    [theirs] = plan(events[:4], NOW)
    world.store.create_batch(ours)
    world.store.create_batch(theirs)
    taken = world.store.claim(theirs)
    world.store.mark_claimed(theirs, sum(q for q, _ in taken.values()), NOW, sorted(taken))
    # When this run claims, four conditional writes fail
    summary = world.flush()
    # Then each batch is billed for its own events, each event once
    assert summary.groups_sent == 2
    assert world.store.get_batch(ours.id).quantity == 6 * 3
    assert world.invariant() == CLEAN


# -- more than one run can do ----------------------------------------------------------------


def test_a_backlog_larger_than_one_run_stops_in_time_and_later_runs_finish(world):
    # Given 3,000 events over many groups, and a Lambda with little time left
    rng = random.Random(11)
    for _ in range(15):
        world.record_random(rng, 200, customers=40)
    deadline = time.monotonic() + 4.0
    summary = world.flush(
        time_left=lambda: deadline - time.monotonic(), policy=FlushPolicy(reserve_seconds=1.0)
    )
    # Then the run stopped early, before its deadline, with consistent state
    assert summary.stopped_early and time.monotonic() < deadline
    # and later runs finish the job
    world.settle(runs=20)
    assert world.invariant() == CLEAN
