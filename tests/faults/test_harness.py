"""The invariant checker itself must be able to fail."""

import stripe as stripe_sdk

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


def test_a_unit_billed_twice_is_counted_as_doubled(world):
    world.record([{"stripe_customer_id": "cus_F1", "meter": "ai_messages", "quantity": 5}])
    world.settle()
    [event] = world.stripe.accepted()
    send(world, "another-identifier", 5, event.timestamp)
    assert world.invariant()["doubled"] == 5


def test_usage_stripe_never_got_is_counted_as_lost_and_left(world):
    world.record([{"stripe_customer_id": "cus_F1", "meter": "ai_messages", "quantity": 5}])
    assert world.invariant() == {"lost": 5, "doubled": 0, "left_unreported": 1}


def test_usage_billed_into_another_period_is_both_lost_and_doubled(world):
    world.record([{"stripe_customer_id": "cus_F1", "meter": "ai_messages", "quantity": 5}])
    world.settle()
    [event] = world.stripe.accepted()
    world.stripe.reset()
    send(world, event.identifier, 5, event.timestamp - 40 * 86400 + 10 * 86400)  # 30 days earlier
    assert world.invariant()["lost"] == 5 and world.invariant()["doubled"] == 5
