"""Stripe billing periods end to end: the Stripe stand-in serves a subscription anchored at an
arbitrary second and sends signed webhooks to the local API; usage recorded on both sides of a
renewal (made by advancing a test clock, as in Stripe) is billed per Stripe period and read back
in the right window."""

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import stripe

from devtools.fake_stripe import FakeStripe
from devtools.local_stack import LOCAL_WEBHOOK_SECRET, LocalStack
from tests.clock import wait_out_month_end

WEBHOOK = "/v1/stripe/webhook"


def wait_for(condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def api(stack: LocalStack) -> Callable[..., requests.Response]:
    assert stack.api_url is not None
    headers = {"Authorization": f"Bearer {stack.server_key}"}

    def call(method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(
            method, f"{stack.api_url}{path}", headers=headers, timeout=30, **kwargs
        )

    return call


@pytest.fixture
def fake(stack: LocalStack) -> FakeStripe:
    assert stack.stripe is not None
    return stack.stripe


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_local", base_addresses={"api": fake.url})


def metered_price(client: stripe.StripeClient, fake: FakeStripe, meter: str) -> str:
    meter_id = next(
        (m["id"] for m in client.v1.billing.meters.list().data if m["event_name"] == meter),
        None,
    ) or str(fake.add_meter(meter)["id"])
    price = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 2,
            "product_data": {"name": meter},
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
        }
    )
    return str(price.id)


def usage(api: Callable[..., requests.Response], customer: str) -> dict[str, Any]:
    response = api("GET", f"/v1/customers/{customer}/usage")
    assert response.status_code == 200, response.text
    return dict(response.json())


def record(api: Callable[..., requests.Response], customer: str, at: int, quantity: int) -> None:
    body = {"stripe_customer_id": customer, "meter": "ai_messages", "quantity": quantity}
    response = api("POST", "/v1/events", json={**body, "timestamp": at})
    assert response.status_code == 202, response.text


def rfc3339(at: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def test_a_renewal_via_the_test_clock_bills_each_unit_in_its_own_stripe_period(
    stack, api, fake, client
):
    customer = "cus_E2eRenew1"
    now = int(time.time())
    clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": now})
    fake.add_customer(customer, test_clock=clock.id)
    renewal = now + 9  # the first period ends at an arbitrary second, a few seconds from now
    created_at = time.monotonic()
    subscription = client.v1.subscriptions.create(
        params={
            "customer": customer,
            "items": [{"price": metered_price(client, fake, "ai_messages")}],
            "billing_cycle_anchor": renewal,
        }
    )
    # The webhook reaches the service: the customer's period is the subscription's.
    first = wait_for(
        lambda: (u := usage(api, customer))["period"]["source"] == "stripe_subscription" and u
    )
    window = time.monotonic() - created_at
    print(f"from Stripe's change to a period the service reads: {window * 1000:.0f} ms")
    assert first["period"]["end"] == rfc3339(renewal)
    # Usage before the renewal and after it (recorded ahead, before any renewal webhook)
    record(api, customer, renewal - 4, 3)
    record(api, customer, renewal + 2, 5)
    # Stripe renews the subscription when its test clock passes the anchor
    client.v1.test_helpers.test_clocks.advance(clock.id, params={"frozen_time": renewal + 1})
    item = subscription["items"].data[0].id
    wait_for(lambda: len(fake.period_history(item)) == 2)
    wait_for(lambda: time.time() > renewal + 3, timeout=20)  # the new period has begun
    flushed = requests.post(f"{stack.api_url}/_local/flush", timeout=60)
    assert flushed.status_code == 200, flushed.text
    # Stripe holds each unit in the period its timestamp falls in
    periods = fake.period_history(item)
    assert periods[0][1] == renewal
    billed = {k: v for k, v in fake.totals_by_period().items() if k[0] == customer}
    assert billed == {
        (customer, "ai_messages", periods[0][0], periods[0][1]): 3,
        (customer, "ai_messages", periods[1][0], periods[1][1]): 5,
    }
    after = usage(api, customer)
    assert after["period"] == {
        "start": rfc3339(periods[1][0]),
        "end": rfc3339(periods[1][1]),
        "source": "stripe_subscription",
    }
    [meter] = [m for m in after["meters"] if m["meter"] == "ai_messages"]
    assert (meter["quantity"], meter["reported"], meter["pending"]) == (5, 5, 0)


def test_an_anchor_reset_and_a_cancellation_bill_recorded_units_before_the_change(
    stack, api, fake, client
):
    customer = "cus_E2eChange1"
    fake.add_customer(customer)
    subscription = client.v1.subscriptions.create(
        params={
            "customer": customer,
            "items": [{"price": metered_price(client, fake, "ai_messages")}],
            "billing_cycle_anchor": int(time.time()) + 86_400 + 17,
        }
    )
    item = subscription["items"].data[0].id
    wait_for(lambda: usage(api, customer)["period"]["source"] == "stripe_subscription")
    started = fake.period_history(item)[0][0]
    wait_for(lambda: time.time() >= started + 1)
    record(api, customer, int(time.time()), 4)  # inside the first period
    wait_for(lambda: time.time() >= started + 2)
    # A plan change that resets the billing anchor: the period so far ends now
    client.v1.subscriptions.update(subscription.id, params={"billing_cycle_anchor": "now"})
    reset = wait_for(lambda: len(fake.period_history(item)) == 2 and fake.period_history(item))
    wait_for(lambda: usage(api, customer)["period"]["start"] == rfc3339(reset[1][0]))
    wait_for(lambda: time.time() >= reset[1][0] + 1)
    record(api, customer, int(time.time()), 6)
    # Then the customer cancels
    client.v1.subscriptions.cancel(subscription.id)
    wait_for(lambda: usage(api, customer)["period"]["source"] == "calendar_month")
    assert requests.post(f"{stack.api_url}/_local/flush", timeout=60).status_code == 200
    billed = {k: v for k, v in fake.totals_by_period().items() if k[0] == customer}
    history = fake.period_history(item)
    assert billed == {
        (customer, "ai_messages", history[0][0], history[0][1]): 4,
        (customer, "ai_messages", history[1][0], history[1][1]): 6,
    }


def signed(payload: bytes, secret: str, at: int) -> dict[str, str]:
    return {
        "Stripe-Signature": FakeStripe.sign(payload, secret, at),
        "content-type": "application/json",
    }


@pytest.mark.parametrize(
    ("secret", "age"),
    [(LOCAL_WEBHOOK_SECRET, 301), ("whsec_forged", 0), (None, 0)],
    ids=["too old", "forged", "unsigned"],
)
def test_a_stale_forged_or_unsigned_webhook_gets_400_and_changes_nothing(stack, api, secret, age):
    customer = "cus_E2eForged1"
    payload = json.dumps(
        {
            "id": f"evt_forged{age}",
            "object": "event",
            "type": "customer.subscription.created",
            "created": int(time.time()),
            "data": {
                "object": {"id": "sub_forged", "object": "subscription", "customer": customer}
            },
        }
    ).encode()
    headers = signed(payload, secret, int(time.time()) - age) if secret else {}
    response = requests.post(f"{stack.api_url}{WEBHOOK}", data=payload, headers=headers, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    assert usage(api, customer)["period"]["source"] == "calendar_month"


def test_a_duplicate_delivery_is_answered_and_changes_nothing(stack, api, fake, client):
    customer = "cus_E2eTwice1"
    fake.add_customer(customer)
    subscription = client.v1.subscriptions.create(
        params={
            "customer": customer,
            "items": [{"price": metered_price(client, fake, "ai_messages")}],
        }
    )
    period = wait_for(
        lambda: (
            (u := usage(api, customer))["period"]["source"] == "stripe_subscription" and u["period"]
        )
    )
    [created] = [e for e in fake.events() if e["data"]["object"]["id"] == subscription.id]
    delivered = len(fake.deliveries)
    fake.redeliver(created["id"])
    wait_for(lambda: len(fake.deliveries) > delivered)
    assert fake.deliveries[-1]["status"] == 200
    assert usage(api, customer)["period"] == period


def test_usage_stripe_rejects_after_accepting_is_quarantined_then_billed_once_when_fixed(
    stack, api, fake, client
):
    customer = "cus_E2eGhost1"  # Stripe has no such customer yet
    wait_out_month_end(60)  # on calendar months: recorded and read in one
    metered_price(client, fake, "ai_messages")  # the meter exists
    fake.async_validation = True
    try:
        record(api, customer, int(time.time()), 7)
        flushed = requests.post(f"{stack.api_url}/_local/flush", timeout=60).json()
        assert flushed["FlushFunction"]["sent"] >= 1  # Stripe answered 200 ...
        [rejected] = [r for r in fake.rejected_async() if r.customer == customer]
        fake.flush_error_reports()  # ... and reports the failure as an event notification
        # The event destination's notification takes the units back into the quarantine
        meter = wait_for(
            lambda: (
                next(
                    m
                    for m in usage(api, customer)["meters"]
                    if m["meter"] == "ai_messages" and m["reported"] == 0
                )
                if any(
                    m["meter"] == "ai_messages" and m["reported"] == 0
                    for m in usage(api, customer)["meters"]
                )
                else None
            )
        )
        assert (meter["quantity"], meter["pending"]) == (7, 7)
        quarantined = _quarantined(stack)
        [held] = [c for c in quarantined if c.customer == customer]
        assert held.quarantine_reason and held.quarantine_reason.startswith(
            "meter_event_customer_not_found"
        )
        # Once the customer exists, the operator replays; the next flush bills it once
        fake.add_customer(customer)
        _replay(stack, held.id)
        assert requests.post(f"{stack.api_url}/_local/flush", timeout=60).status_code == 200
        assert fake.totals()[(customer, "ai_messages")] == 7
        assert rejected.identifier not in {e.identifier for e in fake.accepted()}
        [meter] = [m for m in usage(api, customer)["meters"] if m["meter"] == "ai_messages"]
        assert (meter["reported"], meter["pending"]) == (7, 0)
    finally:
        fake.async_validation = False


def _engine_store(stack: LocalStack):
    """The stack's table straight from the engine, as an operator's tool would see it."""
    import boto3

    from usage_meter.store.dynamodb import DynamoStore

    assert stack.backends is not None
    client = boto3.client(
        "dynamodb",
        endpoint_url=stack.iam_gates[0].upstream.geturl(),
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    return DynamoStore(stack.backends.table_name, client=client)


def _quarantined(stack: LocalStack):
    return _engine_store(stack).quarantined()


def _replay(stack: LocalStack, counter_id: str) -> None:
    from usage_meter.logic.quarantine import REPLAY_GUARD, replay

    # The replay guard's 15 minutes, passed by giving the replay a later clock
    replay(_engine_store(stack), counter_id, now=int(time.time()) + REPLAY_GUARD + 1)
