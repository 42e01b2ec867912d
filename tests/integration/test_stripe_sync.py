"""`stripe sync`, the backfill: every subscription of the account, page by page through the real
SDK, stored as the webhook stores it, on DynamoDB Local; running it again changes nothing."""

import json
import time

import pytest
import stripe

from devtools.fake_stripe import FakeStripe
from usage_meter import admin
from usage_meter.store.dynamodb import DynamoStore

SUBSCRIPTIONS = 105  # more than one page of 100


@pytest.fixture
def now() -> int:
    return int(time.time())


@pytest.fixture
def fake(now):
    # Stripe's clock holds still: the subscription canceled as it starts gets no period however
    # slow the machine (a second ticking between create and cancel gives it a one-second one)
    with FakeStripe(clock=lambda: now) as running:
        yield running


def subscribe_many(fake: FakeStripe, now: int) -> dict[str, int]:
    """Customers with monthly metered subscriptions anchored at arbitrary seconds, one of them
    canceled: customer → its anchor."""
    client = stripe.StripeClient("sk_test_sync", base_addresses={"api": fake.url})
    meter = fake.add_meter("ai_messages")
    price = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 1,
            "product_data": {"name": "AI"},
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter["id"]},
        }
    )
    anchors = {}
    for i in range(SUBSCRIPTIONS):
        customer = f"cus_Sync{i}"
        fake.add_customer(customer)
        anchors[customer] = now + 3600 + 37 * i
        created = client.v1.subscriptions.create(
            params={
                "customer": customer,
                "items": [{"price": price.id}],
                "billing_cycle_anchor": anchors[customer],
            }
        )
        if i == 0:
            client.v1.subscriptions.cancel(created.id)
    return anchors


def sync(local_table, fake, monkeypatch, capsys) -> list[dict]:
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_sync")
    monkeypatch.setenv("STRIPE_API_BASE", fake.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", local_table.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    assert admin.main(["--table", local_table.name, "stripe", "sync"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_the_backfill_stores_every_subscription_across_pages_and_is_safe_to_rerun(
    local_table, fake, now, monkeypatch, capsys
):
    anchors = subscribe_many(fake, now)
    lines = sync(local_table, fake, monkeypatch, capsys)
    assert lines[-1] == {
        "subscriptions": SUBSCRIPTIONS,
        "updated": SUBSCRIPTIONS,
        "counters_cut": 0,
    }
    store = DynamoStore(local_table.name, client=local_table.client)
    billings = store.customer_billings(list(anchors))
    for customer, anchor in anchors.items():
        [subscription] = billings[customer].subscriptions.values()
        if customer == "cus_Sync0":  # canceled as it started: no period ever billed
            assert (subscription.status, subscription.items) == ("canceled", ())
            continue
        [item] = subscription.items
        assert (item.meter, item.renews) == ("ai_messages", True)
        assert item.periods[-1][1] == anchor  # the first period ends at the anchor, to the second
    # Run again: every read is newer, the periods are the same
    again = sync(local_table, fake, monkeypatch, capsys)
    assert again[-1]["subscriptions"] == SUBSCRIPTIONS
    for customer in anchors:
        before = billings[customer].subscriptions
        after = store.customer_billing(customer).subscriptions
        assert {k: v.items for k, v in before.items()} == {k: v.items for k, v in after.items()}
