"""The invariant checker and the fault injector must be able to fail."""

import pytest
import stripe as stripe_sdk

from tests.faults.harness import CLEAN, Crash, Fault
from tests.faults.world import World


def send(world: World, identifier: str, value: int, timestamp: int) -> None:
    client = stripe_sdk.StripeClient(
        "sk_test_h", base_addresses={"api": world.stripe.url, "meter_events": world.stripe.url}
    )
    client.v1.billing.meter_events.create(
        params={
            "event_name": "ai_messages",
            "identifier": identifier,
            "timestamp": timestamp,
            "payload": {"stripe_customer_id": "cus_F1", "value": str(value)},
        }
    )


def five(world: World) -> None:
    world.record([{"stripe_customer_id": "cus_F1", "meter": "ai_messages", "quantity": 5}])


def test_a_clean_flush_is_clean(world):
    five(world)
    world.settle()
    assert world.invariant() == CLEAN


def test_a_unit_billed_twice_is_counted_as_doubled_and_misreported(world):
    five(world)
    world.settle()
    [event] = world.stripe.accepted()
    send(world, "another-identifier", 5, event.timestamp)
    found = world.invariant()
    assert found["doubled"] == 5 and found["misreported"] == 5
    assert found["off_period"] == 5  # under no counter's identifier


def test_usage_stripe_never_got_is_counted_as_lost_and_left(world):
    five(world)
    assert world.invariant() == {**CLEAN, "lost": 5, "left_unreported": 5, "in_backlog": 1}


def test_usage_billed_into_another_period_is_lost_doubled_and_off_period(world):
    five(world)
    world.settle()
    [event] = world.stripe.accepted()
    world.stripe.reset()
    send(world, event.identifier, 5, event.timestamp - 30 * 86400)  # 30 days earlier
    found = world.invariant()
    assert (found["lost"], found["doubled"], found["off_period"]) == (5, 5, 5)


def test_a_confirm_applied_twice_is_seen_by_customers(world):
    five(world)
    world.settle()
    [counter] = world.counters()
    # What a confirm without its condition would do on a stale run's retry
    world.db.update_item(
        TableName=world.table,
        Key={
            "pk": {"S": "USAGE#cus_F1"},
            "sk": {"S": f"PERIOD#{counter.period_start}#METER#ai_messages#0"},
        },
        UpdateExpression="ADD reported :v",
        ExpressionAttributeValues={":v": {"N": "5"}},
    )
    found = world.invariant()
    assert found["misreported"] == 5 and found["left_unreported"] == 5


def test_usage_the_ledger_has_but_no_counter_counts_is_miscounted(world):
    five(world)
    world.settle()
    world.ledger.add("cus_F1", "ai_messages", 2, world.now())
    found = world.invariant()
    assert found["miscounted"] == 2 and found["lost"] == 2


def test_a_killed_process_makes_no_more_calls(world):
    five(world)
    flusher, db = world.flusher([Fault("decide", 1, "crash")])
    with pytest.raises(Crash):
        flusher.run()
    assert db.dead and world.stripe.calls == 0
    assert [c.sending for c in world.counters()] == [None]


def test_a_write_applied_before_the_kill_stays_applied(world):
    five(world)
    assert world.flush([Fault("decide", 1, "crash_after")]) is None
    [counter] = world.counters()
    assert counter.sending is not None and world.stripe.calls == 0
