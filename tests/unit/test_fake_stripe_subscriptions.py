"""The fake's billing side through the real SDK: meters, prices, subscriptions, clocks, webhooks."""

from __future__ import annotations

import datetime
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from devtools.fake_stripe import API_VERSION, FakeStripe, next_period_end
from tests.receiver import Receiver as LoopbackReceiver

DAY = 24 * 3600
REPO_ROOT = Path(__file__).resolve().parents[2]


def ts(*parts: int) -> int:
    """Unix seconds of a UTC date and time."""
    return int(datetime.datetime(*parts, tzinfo=datetime.UTC).timestamp())  # type: ignore[misc]


# A month-end anchor at an arbitrary second: 2026-01-31T13:37:42Z.
T0 = ts(2026, 1, 31, 13, 37, 42)


class Clock:
    """Stripe's wall clock for the fake, moved by hand."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Receiver(LoopbackReceiver):
    """A loopback webhook endpoint."""

    def __init__(self) -> None:
        super().__init__("/stripe/webhooks")

    def events(self, secret: str) -> list[Any]:
        """Every request received, verified with `secret` exactly as a handler would."""
        return [
            stripe.Webhook.construct_event(body, headers["Stripe-Signature"], secret)
            for body, headers in self.received()
        ]


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeStripe]:
    with FakeStripe(
        clock=clock, webhook_retry_seconds=0.02, webhook_max_attempts=3, tick_seconds=0.05
    ) as server:
        yield server


@pytest.fixture
def client(fake: FakeStripe) -> Iterator[stripe.StripeClient]:
    http_client = stripe.RequestsClient(timeout=5)
    yield stripe.StripeClient(
        "sk_test_fake",
        base_addresses={"api": fake.url, "meter_events": fake.url},
        max_network_retries=0,
        http_client=http_client,
    )
    http_client.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def metered_price(
    client: stripe.StripeClient,
    meter_id: str,
    *,
    interval: str = "month",
    interval_count: int = 1,
) -> Any:
    return client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount_decimal": "0.25",
            "product_data": {"name": "AI messages"},
            "recurring": {
                "interval": interval,  # type: ignore[typeddict-item]
                "interval_count": interval_count,
                "usage_type": "metered",
                "meter": meter_id,
            },
        }
    )


def clocked_customer(client: stripe.StripeClient, fake: FakeStripe, frozen_time: int) -> str:
    """A customer on a new test clock frozen at `frozen_time`; returns the clock's id."""
    test_clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": frozen_time})
    fake.add_customer("cus_Q1w2E3r4", test_clock=test_clock.id)
    return test_clock.id


def subscribe(client: stripe.StripeClient, price_id: str, **params: Any) -> Any:
    return client.v1.subscriptions.create(
        params={"customer": "cus_Q1w2E3r4", "items": [{"price": price_id}], **params}
    )


def item_of(subscription: Any) -> Any:
    return subscription["items"].data[0]


def advance(client: stripe.StripeClient, clock_id: str, to: int) -> Any:
    return client.v1.test_helpers.test_clocks.advance(clock_id, params={"frozen_time": to})


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def error_of(caught: pytest.ExceptionInfo[stripe.StripeError]) -> dict[str, Any]:
    assert isinstance(caught.value.json_body, dict)
    body: dict[str, Any] = caught.value.json_body["error"]
    return body


# -- period arithmetic ----------------------------------------------------------------------


def test_monthly_periods_clamp_to_the_month_end_and_keep_the_time_of_day() -> None:
    # Given an anchor on Jan 31 at an arbitrary second of a leap year
    anchor = ts(2024, 1, 31, 13, 37, 42)

    # When the period ends are walked one after another
    ends = [next_period_end(anchor, "month", 1, anchor)]
    for _ in range(3):
        ends.append(next_period_end(anchor, "month", 1, ends[-1]))

    # Then each is the anchor's day clamped to the month's end, at 13:37:42
    assert ends == [
        ts(2024, 2, 29, 13, 37, 42),
        ts(2024, 3, 31, 13, 37, 42),
        ts(2024, 4, 30, 13, 37, 42),
        ts(2024, 5, 31, 13, 37, 42),
    ]
    # And in a common year February ends on the 28th
    assert next_period_end(ts(2025, 1, 31, 0, 0, 1), "month", 1, ts(2025, 2, 1)) == ts(
        2025, 2, 28, 0, 0, 1
    )


@pytest.mark.parametrize(
    ("anchor", "interval", "count", "after", "expected"),
    [
        # the end is strictly after `after`: a boundary itself starts the next period
        (ts(2025, 3, 15, 7, 8, 9), "month", 1, ts(2025, 4, 15, 7, 8, 8), ts(2025, 4, 15, 7, 8, 9)),
        (ts(2025, 3, 15, 7, 8, 9), "month", 1, ts(2025, 4, 15, 7, 8, 9), ts(2025, 5, 15, 7, 8, 9)),
        # before the anchor, the anchor ends the first (short) period
        (ts(2025, 3, 15, 7, 8, 9), "month", 1, ts(2025, 3, 1), ts(2025, 3, 15, 7, 8, 9)),
        # a leap-day anchor: Feb 28 in common years, Feb 29 again in 2028
        (ts(2024, 2, 29, 23, 59, 59), "year", 1, ts(2025, 1, 1), ts(2025, 2, 28, 23, 59, 59)),
        (ts(2024, 2, 29, 23, 59, 59), "year", 1, ts(2027, 3, 1), ts(2028, 2, 29, 23, 59, 59)),
        # quarterly from Nov 30: Feb 28 (clamped), then May 30 (from the anchor, not Feb 28)
        (ts(2024, 11, 30, 1, 2, 3), "month", 3, ts(2024, 12, 1), ts(2025, 2, 28, 1, 2, 3)),
        (ts(2024, 11, 30, 1, 2, 3), "month", 3, ts(2025, 2, 28, 1, 2, 3), ts(2025, 5, 30, 1, 2, 3)),
        # days and weeks are exact UTC seconds
        (1_000_000_007, "day", 3, 1_000_000_007 + 3 * DAY, 1_000_000_007 + 6 * DAY),
        (1_000_000_007, "week", 2, 1_000_000_007 + 13 * DAY, 1_000_000_007 + 14 * DAY),
        # far from the anchor without walking every month
        (ts(2020, 1, 31, 12), "month", 1, ts(2031, 2, 10), ts(2031, 2, 28, 12)),
    ],
    ids=[
        "one-second-before-boundary",
        "at-boundary",
        "before-anchor",
        "leap-anchor-common-year",
        "leap-anchor-next-leap-year",
        "quarterly-clamped",
        "quarterly-from-anchor",
        "three-days",
        "two-weeks",
        "eleven-years-on",
    ],
)
def test_next_period_end(anchor: int, interval: str, count: int, after: int, expected: int) -> None:
    # Given / When / Then the schedule matches Stripe's calendar arithmetic
    assert next_period_end(anchor, interval, count, after) == expected


def test_next_period_end_refuses_unknown_intervals() -> None:
    with pytest.raises(ValueError, match="interval"):
        next_period_end(T0, "fortnight", 1, T0)
    with pytest.raises(ValueError, match="interval_count"):
        next_period_end(T0, "month", 0, T0)


# -- meters, prices, customers ----------------------------------------------------------------


def test_meters_list_filter_deactivate_and_reactivate(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a meter made through the API and one through the helper
    api_meter = client.v1.billing.meters.create(
        params={
            "display_name": "API calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "count"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    helper_meter = fake.add_meter("ai_messages")

    # When one is deactivated
    client.v1.billing.meters.deactivate(api_meter.id)

    # Then the status filter sees it as inactive, and its event_name is free again
    assert api_meter.object == "billing.meter" and api_meter.status == "active"
    active = client.v1.billing.meters.list(params={"status": "active"})
    inactive = client.v1.billing.meters.list(params={"status": "inactive"})
    assert [meter.id for meter in active.data] == [helper_meter["id"]]
    assert [meter.id for meter in inactive.data] == [api_meter.id]
    assert inactive.data[0].status_transitions.deactivated_at == T0
    replacement = fake.add_meter("api_calls")
    # And reactivating the old one would make two active meters for one event name
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meters.reactivate(api_meter.id)
    assert caught.value.param == "event_name"
    client.v1.billing.meters.deactivate(replacement["id"])
    assert client.v1.billing.meters.reactivate(api_meter.id).status == "active"
    assert client.v1.billing.meters.retrieve(api_meter.id).default_aggregation.formula == "count"


def test_prices_are_created_retrieved_and_listed(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a meter and a product
    meter = fake.add_meter("ai_messages")
    product = client.v1.products.create(params={"name": "Usage"})

    # When a metered and a licensed price are created
    metered = metered_price(client, meter["id"], interval="week", interval_count=2)
    licensed = client.v1.prices.create(
        params={
            "currency": "EUR",
            "unit_amount": 900,
            "product": product.id,
            "recurring": {"interval": "year"},
        }
    )

    # Then they read back as Stripe price objects
    fetched = client.v1.prices.retrieve(metered.id, params={"expand": ["product"]})
    assert fetched.recurring.to_dict() == {
        "interval": "week",
        "interval_count": 2,
        "meter": meter["id"],
        "trial_period_days": None,
        "usage_type": "metered",
    }
    assert fetched.unit_amount is None and fetched.unit_amount_decimal == Decimal("0.25")
    assert fetched.product.name == "AI messages"  # expanded
    assert licensed.currency == "eur" and licensed.recurring.usage_type == "licensed"
    # And the list pages newest first and filters
    first = client.v1.prices.list(params={"limit": 1})
    assert [price.id for price in first.data] == [licensed.id] and first.has_more
    second = client.v1.prices.list(params={"limit": 1, "starting_after": licensed.id})
    assert [price.id for price in second.data] == [metered.id] and not second.has_more
    by_meter = client.v1.prices.list(params={"recurring": {"meter": meter["id"]}})
    assert [price.id for price in by_meter.data] == [metered.id]


def test_customers_with_fixed_ids_and_test_clocks(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a test clock
    test_clock = client.v1.test_helpers.test_clocks.create(
        params={"frozen_time": T0 - 40 * DAY, "name": "renewals"}
    )

    # When customers are made by the helper and through the API
    fake.add_customer("cus_Q1w2E3r4", test_clock=test_clock.id)
    made = client.v1.customers.create(params={"email": "a@example.com"})

    # Then both read back, the clocked one created at its clock's time
    fixed = client.v1.customers.retrieve("cus_Q1w2E3r4")
    assert fixed.test_clock == test_clock.id and fixed.created == T0 - 40 * DAY
    assert client.v1.customers.retrieve(made.id).email == "a@example.com"
    assert made.id.startswith("cus_") and made.test_clock is None
    with pytest.raises(ValueError, match="already exists"):
        fake.add_customer("cus_Q1w2E3r4")


# -- subscriptions on a test clock ------------------------------------------------------------


def test_subscription_object_has_periods_on_its_items(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a customer on a test clock and a monthly metered price
    clock_id = clocked_customer(client, fake, T0)
    price = metered_price(client, fake.add_meter("ai_messages")["id"])

    # When the customer subscribes
    subscription = subscribe(
        client, price.id, metadata={"plan": "pro"}, expand=["items.data.price.product"]
    )

    # Then the subscription is shaped like Stripe's at this API version
    assert subscription.object == "subscription" and subscription.status == "active"
    assert subscription.customer == "cus_Q1w2E3r4" and subscription.test_clock == clock_id
    assert subscription.billing_cycle_anchor == T0 and subscription.start_date == T0
    assert subscription.created == T0 and subscription.livemode is False
    assert subscription.metadata.to_dict() == {"plan": "pro"}
    assert "current_period_start" not in subscription  # it lives on the items now
    item = item_of(subscription)
    assert item.object == "subscription_item" and item.subscription == subscription.id
    assert item.current_period_start == T0
    assert item.current_period_end == ts(2026, 2, 28, 13, 37, 42)
    assert "quantity" not in item  # a metered item has none (OpenAPI: an integer when present)
    assert item.price.id == price.id and item.price.recurring.meter == price.recurring.meter
    assert item.price.product.name == "AI messages"
    assert fake.subscription(subscription.id)["items"]["data"][0]["id"] == item.id


def test_future_anchor_makes_a_short_first_period(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a customer on a test clock and a monthly price
    clock_id = clocked_customer(client, fake, T0)
    price = metered_price(client, fake.add_meter("ai_messages")["id"])
    anchor = T0 + 9 * DAY + 4321  # any second

    # When the subscription is anchored in the future
    subscription = subscribe(client, price.id, billing_cycle_anchor=anchor)

    # Then the first period runs from the start to the anchor
    item = item_of(subscription)
    assert (item.current_period_start, item.current_period_end) == (T0, anchor)
    # And later ones are whole months from the anchor (Feb 9 -> Mar 9)
    advance(client, clock_id, anchor)
    anchor_date = datetime.datetime.fromtimestamp(anchor, datetime.UTC)
    next_month = int(anchor_date.replace(month=anchor_date.month + 1).timestamp())
    assert fake.period_history(item.id) == [(T0, anchor), (anchor, next_month)]


def test_anchor_beyond_the_next_natural_billing_date_is_refused(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a monthly price
    clocked_customer(client, fake, T0)
    price = metered_price(client, fake.add_meter("ai_messages")["id"])

    # When the anchor is more than a month ahead, or before the start
    # Then Stripe refuses both
    for anchor in (T0 + 40 * DAY, T0 - 1):
        with pytest.raises(stripe.InvalidRequestError) as caught:
            subscribe(client, price.id, billing_cycle_anchor=anchor)
        assert caught.value.param == "billing_cycle_anchor"


def test_backdated_subscription_has_its_past_periods(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a weekly price
    clocked_customer(client, fake, T0)
    price = metered_price(client, fake.add_meter("ai_messages")["id"], interval="week")

    # When a subscription is backdated 10 days
    subscription = subscribe(client, price.id, backdate_start_date=T0 - 10 * DAY)

    # Then its history holds the ended week and the current one contains now
    start = T0 - 10 * DAY
    assert subscription.start_date == start
    assert fake.period_history(item_of(subscription).id) == [
        (start, start + 7 * DAY),
        (start + 7 * DAY, start + 14 * DAY),
    ]


def test_advancing_the_test_clock_renews_once_per_period_with_one_event_each(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given a webhook endpoint and a monthly subscription anchored on Jan 31 at 13:37:42
    endpoint = fake.add_webhook_endpoint(receiver.url)
    clock_id = clocked_customer(client, fake, T0)
    price = metered_price(client, fake.add_meter("ai_messages")["id"])
    subscription = subscribe(client, price.id)
    item_id = item_of(subscription).id

    # When the clock advances two months in one step (Stripe's limit)
    advanced = advance(client, clock_id, ts(2026, 3, 31, 13, 37, 42))

    # Then each ended period rolled into the next, month-end clamped
    assert advanced.status == "advancing"
    assert client.v1.test_helpers.test_clocks.retrieve(clock_id).status == "ready"
    feb28, mar31, apr30 = (
        ts(2026, 2, 28, 13, 37, 42),
        ts(2026, 3, 31, 13, 37, 42),
        ts(2026, 4, 30, 13, 37, 42),
    )
    assert fake.period_history(item_id) == [(T0, feb28), (feb28, mar31), (mar31, apr30)]
    current = item_of(client.v1.subscriptions.retrieve(subscription.id))
    assert (current.current_period_start, current.current_period_end) == (mar31, apr30)
    # And one customer.subscription.updated per renewal went out, stamped at its boundary
    assert fake.wait_for_deliveries(5)
    events = receiver.events(endpoint["secret"])
    assert [event.type for event in events] == [
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.updated",
    ]
    assert [event.created for event in events] == [T0, feb28, mar31]
    renewal = events[1]
    assert renewal.api_version == API_VERSION and renewal.request.id is None
    assert item_of(renewal.data.object).current_period_start == feb28
    previous_item = renewal.data.previous_attributes["items"]["data"][0]
    assert previous_item["current_period_end"] == feb28
    assert events[0].request.id is not None  # the create call's request
    assert client.v1.events.retrieve(renewal.id).pending_webhooks == 0


def test_test_clock_cannot_go_back_or_jump_past_two_intervals(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a monthly subscription on a test clock
    clock_id = clocked_customer(client, fake, T0)
    subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)

    # When the clock is moved back, or three months ahead
    # Then Stripe refuses both
    for target in (T0 - 1, T0, ts(2026, 4, 30, 13, 37, 42)):
        with pytest.raises(stripe.InvalidRequestError) as caught:
            advance(client, clock_id, target)
        assert caught.value.param == "frozen_time"


def test_anchor_reset_cuts_the_current_period_at_the_reset(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a monthly subscription, twelve days and a few seconds into its period
    clock_id = clocked_customer(client, fake, T0)
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    reset_at = T0 + 12 * DAY + 5
    advance(client, clock_id, reset_at)

    # When billing_cycle_anchor=now is set
    updated = client.v1.subscriptions.update(
        subscription.id, params={"billing_cycle_anchor": "now", "proration_behavior": "none"}
    )

    # Then the old period ends at the reset and a month starts there
    item = item_of(updated)
    next_end = next_period_end(reset_at, "month", 1, reset_at)
    assert updated.billing_cycle_anchor == reset_at
    assert (item.current_period_start, item.current_period_end) == (reset_at, next_end)
    assert fake.period_history(item.id) == [(T0, reset_at), (reset_at, next_end)]
    event = fake.events("customer.subscription.updated")[-1]
    assert event["created"] == reset_at
    assert event["data"]["previous_attributes"]["billing_cycle_anchor"] == T0


def test_plan_change_to_another_interval_resets_the_anchor(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a monthly subscription ten days in
    clock_id = clocked_customer(client, fake, T0)
    meter_id = fake.add_meter("ai_messages")["id"]
    subscription = subscribe(client, metered_price(client, meter_id).id)
    item_id = item_of(subscription).id
    change_at = T0 + 10 * DAY
    advance(client, clock_id, change_at)

    # When its item moves to a weekly price
    weekly = metered_price(client, meter_id, interval="week")
    updated = client.v1.subscriptions.update(
        subscription.id, params={"items": [{"id": item_id, "price": weekly.id}]}
    )

    # Then the same item now bills weekly from the change
    item = item_of(updated)
    assert item.id == item_id and item.price.id == weekly.id
    assert fake.period_history(item_id) == [(T0, change_at), (change_at, change_at + 7 * DAY)]


def test_cancel_now_ends_the_subscription_and_emits_deleted(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a subscription five days and one second into its period
    clock_id = clocked_customer(client, fake, T0)
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    cancel_at = T0 + 5 * DAY + 1
    advance(client, clock_id, cancel_at)

    # When it is canceled
    canceled = client.v1.subscriptions.cancel(
        subscription.id, params={"cancellation_details": {"comment": "moving on"}}
    )

    # Then it is canceled now, the item keeps its period, and the history is cut now
    assert canceled.status == "canceled"
    assert canceled.canceled_at == cancel_at and canceled.ended_at == cancel_at
    assert canceled.cancellation_details.comment == "moving on"
    item = item_of(canceled)
    assert item.current_period_end == ts(2026, 2, 28, 13, 37, 42)
    assert fake.period_history(item.id) == [(T0, cancel_at)]
    deleted = fake.events("customer.subscription.deleted")
    assert [event["data"]["object"]["id"] for event in deleted] == [subscription.id]
    # And it can still be read, but not canceled twice
    assert client.v1.subscriptions.retrieve(subscription.id).status == "canceled"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.subscriptions.cancel(subscription.id)
    assert caught.value.http_status == 404 and caught.value.code == "resource_missing"


def test_cancel_at_period_end_ends_at_the_boundary(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a subscription set to cancel at its period end on day 3
    clock_id = clocked_customer(client, fake, T0)
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    advance(client, clock_id, T0 + 3 * DAY)
    flagged = client.v1.subscriptions.update(subscription.id, params={"cancel_at_period_end": True})
    feb28 = ts(2026, 2, 28, 13, 37, 42)
    assert flagged.cancel_at == feb28 and flagged.canceled_at == T0 + 3 * DAY

    # When the clock passes the period end
    advance(client, clock_id, feb28 + 60)

    # Then the subscription ended exactly there, without renewing
    ended = client.v1.subscriptions.retrieve(subscription.id)
    assert ended.status == "canceled" and ended.ended_at == feb28
    assert fake.period_history(item_of(ended).id) == [(T0, feb28)]
    types = [event["type"] for event in fake.events()]
    assert types == [
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ]
    assert fake.events()[-1]["created"] == feb28


def test_pause_and_resume(fake: FakeStripe, client: stripe.StripeClient) -> None:
    # Given a subscription paused on day 4
    clock_id = clocked_customer(client, fake, T0)
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    item_id = item_of(subscription).id
    advance(client, clock_id, T0 + 4 * DAY)
    paused = fake.pause_subscription(subscription.id)
    assert paused["status"] == "paused"

    # When the clock passes the period end while paused, then it is resumed on day 30
    advance(client, clock_id, T0 + 30 * DAY)
    assert fake.period_history(item_id) == [(T0, T0 + 4 * DAY)]  # no renewal while paused
    resumed = client.v1.subscriptions.resume(
        subscription.id, params={"billing_cycle_anchor": "now"}
    )

    # Then it is active again with a new month from the resume
    resume_at = T0 + 30 * DAY
    assert resumed.status == "active" and resumed.billing_cycle_anchor == resume_at
    next_end = next_period_end(resume_at, "month", 1, resume_at)
    assert fake.period_history(item_id) == [(T0, T0 + 4 * DAY), (resume_at, next_end)]
    assert [event["type"] for event in fake.events()][-2:] == [
        "customer.subscription.paused",
        "customer.subscription.resumed",
    ]
    # And an active subscription cannot be resumed
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.resume(subscription.id)


def test_list_paginates_and_status_all_includes_canceled(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given three subscriptions made a second apart, the oldest canceled
    clock_id = clocked_customer(client, fake, T0)
    meter_id = fake.add_meter("ai_messages")["id"]
    ids = []
    for second in range(3):
        if second:
            advance(client, clock_id, T0 + second)
        ids.append(subscribe(client, metered_price(client, meter_id).id).id)
    client.v1.subscriptions.cancel(ids[0])

    # When they are listed
    default = client.v1.subscriptions.list(params={"customer": "cus_Q1w2E3r4"})
    first = client.v1.subscriptions.list(params={"status": "all", "limit": 2})
    rest = client.v1.subscriptions.list(
        params={"status": "all", "limit": 2, "starting_after": first.data[-1].id}
    )
    back = client.v1.subscriptions.list(
        params={"status": "all", "limit": 2, "ending_before": rest.data[0].id}
    )

    # Then the default hides the canceled one, and status=all pages newest first
    assert [sub.id for sub in default.data] == [ids[2], ids[1]]
    assert [sub.id for sub in first.data] == [ids[2], ids[1]] and first.has_more
    assert [sub.id for sub in rest.data] == [ids[0]] and not rest.has_more
    assert [sub.id for sub in back.data] == [ids[2], ids[1]]
    all_ids = [sub.id for sub in first.auto_paging_iter()]
    assert all_ids == [ids[2], ids[1], ids[0]]
    canceled = client.v1.subscriptions.list(params={"status": "canceled"})
    assert [sub.id for sub in canceled.data] == [ids[0]]


def test_fake_renew_route_starts_the_next_period_now(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a subscription a day and a bit into its period
    clock_id = clocked_customer(client, fake, T0)
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    renew_at = T0 + DAY + 17
    advance(client, clock_id, renew_at)

    # When a human renews it through the admin route
    response = requests.post(f"{fake.url}/_fake/subscriptions/{subscription.id}/renew", timeout=5)

    # Then the period ended now and the next one is a month from now
    assert response.status_code == 200
    next_end = next_period_end(renew_at, "month", 1, renew_at)
    item_id = item_of(subscription).id
    assert fake.period_history(item_id) == [(T0, renew_at), (renew_at, next_end)]
    assert fake.events()[-1]["type"] == "customer.subscription.updated"
    missing = requests.post(f"{fake.url}/_fake/subscriptions/sub_nope/renew", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "resource_missing"


# -- subscriptions on the wall clock ----------------------------------------------------------


def test_wall_clock_renewal_is_delivered_by_the_ticker_without_a_request(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock, receiver: Receiver
) -> None:
    # Given a webhook endpoint and a daily subscription on the fake's own clock
    endpoint = fake.add_webhook_endpoint(receiver.url, ["customer.subscription.updated"])
    fake.add_customer("cus_Q1w2E3r4")
    price = metered_price(client, fake.add_meter("ai_messages")["id"], interval="day")
    subscription = subscribe(client, price.id)

    # When the wall clock passes the period end and nobody calls the API
    clock.now = T0 + DAY + 5

    # Then the ticker renews it and the webhook arrives on its own
    assert receiver.wait_for(1, timeout=5)
    (event,) = receiver.events(endpoint["secret"])
    assert event.type == "customer.subscription.updated" and event.created == T0 + DAY
    assert item_of(event.data.object).current_period_end == T0 + 2 * DAY
    assert item_of(client.v1.subscriptions.retrieve(subscription.id)).current_period_start == (
        T0 + DAY
    )


def test_totals_by_period_splits_events_at_a_boundary_second(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    # Given a monthly subscription on the wall clock from Jan 31 13:37:42
    fake.add_customer("cus_Q1w2E3r4")
    price = metered_price(client, fake.add_meter("ai_messages")["id"])
    subscription = subscribe(client, price.id)
    feb28 = ts(2026, 2, 28, 13, 37, 42)
    mar31 = ts(2026, 3, 31, 13, 37, 42)
    clock.now = feb28 + 120  # the fake renews it when it next looks

    # When events land one second before the boundary, on it, before the start, and on a
    # meter no subscription bills
    def send(identifier: str, value: int, timestamp: int, event_name: str = "ai_messages") -> None:
        client.v1.billing.meter_events.create(
            params={
                "event_name": event_name,
                "identifier": identifier,
                "timestamp": timestamp,
                "payload": {"stripe_customer_id": "cus_Q1w2E3r4", "value": str(value)},
            }
        )

    send("before-boundary", 5, feb28 - 1)
    send("at-boundary", 7, feb28)
    send("after-boundary", 11, feb28 + 100)
    send("before-start", 13, T0 - 1)
    send("other-meter", 17, feb28, event_name="api_calls")

    # Then each event is billed in the period containing its timestamp, or nowhere
    assert fake.totals_by_period() == {
        ("cus_Q1w2E3r4", "ai_messages", T0, feb28): 5,
        ("cus_Q1w2E3r4", "ai_messages", feb28, mar31): 18,
        ("cus_Q1w2E3r4", "ai_messages", None, None): 13,
        ("cus_Q1w2E3r4", "api_calls", None, None): 17,
    }
    assert fake.period_history(item_of(subscription).id) == [(T0, feb28), (feb28, mar31)]
    listing = requests.get(f"{fake.url}/_fake/billing_periods", timeout=5).json()
    row = {"customer": "cus_Q1w2E3r4", "event_name": "ai_messages", "value": 5}
    assert {**row, "period_start": T0, "period_end": feb28} in listing["data"]


def test_totals_by_period_follows_a_canceled_subscription_and_a_reset(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    # Given a subscription reset on day 2 and canceled on day 3
    fake.add_customer("cus_Q1w2E3r4")
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    clock.now = T0 + 2 * DAY
    client.v1.subscriptions.update(subscription.id, params={"billing_cycle_anchor": "now"})
    clock.now = T0 + 3 * DAY
    client.v1.subscriptions.cancel(subscription.id)
    clock.now = T0 + 4 * DAY

    # When usage is reported for each stretch
    for identifier, timestamp in (
        ("first", T0 + DAY),
        ("second", T0 + 2 * DAY),
        ("after-cancel", T0 + 3 * DAY),
    ):
        client.v1.billing.meter_events.create(
            params={
                "event_name": "ai_messages",
                "identifier": identifier,
                "timestamp": timestamp,
                "payload": {"stripe_customer_id": "cus_Q1w2E3r4", "value": "1"},
            }
        )

    # Then the cut period, the period after the reset and "nowhere" each get one
    assert fake.totals_by_period() == {
        ("cus_Q1w2E3r4", "ai_messages", T0, T0 + 2 * DAY): 1,
        ("cus_Q1w2E3r4", "ai_messages", T0 + 2 * DAY, T0 + 3 * DAY): 1,
        ("cus_Q1w2E3r4", "ai_messages", None, None): 1,
    }


# -- webhooks ---------------------------------------------------------------------------------


def test_webhook_endpoints_api(fake: FakeStripe, client: stripe.StripeClient) -> None:
    # Given an endpoint made through the API
    endpoint = client.v1.webhook_endpoints.create(
        params={
            "url": "http://127.0.0.1:9/hooks",
            "enabled_events": ["customer.subscription.updated", "customer.subscription.deleted"],
        }
    )

    # When endpoints are listed, and then it is deleted
    listed = client.v1.webhook_endpoints.list()
    deleted = client.v1.webhook_endpoints.delete(endpoint.id)

    # Then the secret was shown at creation only, and the delete is Stripe-shaped
    assert endpoint.secret.startswith("whsec_") and endpoint.status == "enabled"
    assert [item.id for item in listed.data] == [endpoint.id]
    assert "secret" not in listed.data[0]
    assert deleted.deleted is True
    assert client.v1.webhook_endpoints.list().data == []
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.webhook_endpoints.create(
            params={"url": "ftp://example.com", "enabled_events": ["*"]}
        )
    assert caught.value.param == "url"


def test_deliveries_are_signed_as_construct_event_expects(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given an endpoint with a known secret
    fake.add_webhook_endpoint(receiver.url, secret="whsec_known")
    fake.add_customer("cus_Q1w2E3r4")

    # When a subscription is created
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)

    # Then the delivery verifies, names the request, and matches GET /v1/events/{id}
    assert receiver.wait_for(1)
    (event,) = receiver.events("whsec_known")
    body, headers = receiver.requests[0]
    assert headers["Content-Type"].startswith("application/json")
    assert event.type == "customer.subscription.created"
    assert event.data.object.id == subscription.id
    assert event.request.idempotency_key  # the SDK sends one with every POST
    assert client.v1.events.retrieve(event.id).data.object.id == subscription.id
    listed = client.v1.events.list(params={"type": "customer.subscription.*"})
    assert [item.id for item in listed.data] == [event.id]
    # And a forged or stale request built with sign() fails verification
    now = int(time.time())
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(
            body, FakeStripe.sign(body, "whsec_other", now), "whsec_known"
        )
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(
            body, FakeStripe.sign(body, "whsec_known", now - 600), "whsec_known"
        )
    assert (
        stripe.Webhook.construct_event(
            body, FakeStripe.sign(body, "whsec_known", now), "whsec_known"
        ).id
        == event.id
    )


def test_rolled_secret_signs_with_old_and_new_during_the_overlap(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given an endpoint whose secret was rolled with an overlap
    endpoint = fake.add_webhook_endpoint(receiver.url)
    old_secret = endpoint["secret"]
    new_secret = fake.roll_webhook_secret(endpoint["id"], overlap_seconds=3600)
    fake.add_customer("cus_Q1w2E3r4")

    # When an event is delivered
    subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    assert receiver.wait_for(1)

    # Then both secrets verify it, and the header carries the new signature first
    assert receiver.events(new_secret)[0].id == receiver.events(old_secret)[0].id
    body, headers = receiver.requests[0]
    signatures = [part for part in headers["Stripe-Signature"].split(",") if part.startswith("v1=")]
    timestamp = int(headers["Stripe-Signature"].split(",")[0].removeprefix("t="))
    assert len(signatures) == 2
    assert FakeStripe.sign(body, new_secret, timestamp).split(",")[1] == signatures[0]


def test_rolled_secret_without_overlap_stops_signing_with_the_old(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given an endpoint whose secret was rolled with no overlap
    endpoint = fake.add_webhook_endpoint(receiver.url)
    new_secret = fake.roll_webhook_secret(endpoint["id"], overlap_seconds=0)
    fake.add_customer("cus_Q1w2E3r4")

    # When an event is delivered
    subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    assert receiver.wait_for(1)

    # Then only the new secret verifies it
    assert receiver.events(new_secret)
    with pytest.raises(stripe.SignatureVerificationError):
        receiver.events(endpoint["secret"])


def test_held_deliveries_can_be_released_out_of_order_and_redelivered(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given held deliveries for a create and then an update
    endpoint = fake.add_webhook_endpoint(receiver.url)
    fake.add_customer("cus_Q1w2E3r4")
    fake.hold_deliveries()
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    client.v1.subscriptions.update(subscription.id, params={"metadata": {"seats": "3"}})
    assert not fake.wait_for_deliveries(0.2)  # nothing goes out while held
    assert receiver.requests == []

    # When they are released in reverse and the create is redelivered
    fake.release_deliveries(reverse=True)
    assert fake.wait_for_deliveries(5)
    created_id = fake.events("customer.subscription.created")[0]["id"]
    fake.redeliver(created_id)
    assert fake.wait_for_deliveries(5)

    # Then the update arrived before the create, and the create arrived twice
    events = receiver.events(endpoint["secret"])
    assert [event.type for event in events] == [
        "customer.subscription.updated",
        "customer.subscription.created",
        "customer.subscription.created",
    ]
    assert events[1].id == events[2].id == created_id
    assert events[0].data.previous_attributes.to_dict() == {"metadata": {}}


def test_failed_deliveries_are_retried_with_backoff_and_recorded(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given a receiver that answers 500 twice, then 200
    endpoint = fake.add_webhook_endpoint(receiver.url)
    receiver.statuses.extend([500, 500])
    fake.add_customer("cus_Q1w2E3r4")

    # When an event is emitted
    subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    assert fake.wait_for_deliveries(5)

    # Then it was attempted three times, each recorded, the same event each time
    deliveries = fake.deliveries
    assert [(d["attempt"], d["status"]) for d in deliveries] == [(1, 500), (2, 500), (3, 200)]
    assert {d["event_id"] for d in deliveries} == {
        e.id for e in receiver.events(endpoint["secret"])
    }
    assert all(d["url"] == receiver.url and d["error"] is None for d in deliveries)
    # And the waits doubled: 0.02 s, then 0.04 s (webhook_retry_seconds=0.02)
    assert deliveries[1]["at"] - deliveries[0]["at"] >= 0.019
    assert deliveries[2]["at"] - deliveries[1]["at"] >= 0.039


def test_deliveries_give_up_after_max_attempts_and_record_connection_errors(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an endpoint nobody listens on: its port held, bound but not listening, for the whole
    # test (connections to it are refused, and no other process can take it meanwhile)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        fake.add_webhook_endpoint(f"http://127.0.0.1:{held.getsockname()[1]}/hooks")
        fake.add_customer("cus_Q1w2E3r4")

        # When an event is emitted
        subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
        assert fake.wait_for_deliveries(5)

    # Then there were exactly webhook_max_attempts attempts, each with an error
    deliveries = fake.deliveries
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    assert all(d["status"] is None and d["error"] for d in deliveries)


def test_enabled_events_filter_deliveries(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given an endpoint for deletions only
    endpoint = fake.add_webhook_endpoint(receiver.url, ["customer.subscription.deleted"])
    fake.add_customer("cus_Q1w2E3r4")

    # When a subscription is created and canceled
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    client.v1.subscriptions.cancel(subscription.id)
    assert fake.wait_for_deliveries(5)

    # Then only the deletion was delivered
    assert [event.type for event in receiver.events(endpoint["secret"])] == [
        "customer.subscription.deleted"
    ]


# -- strictness -----------------------------------------------------------------------------


def test_unknown_customer_price_and_meter_are_stripe_errors(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given one real meter and price
    meter_id = fake.add_meter("ai_messages")["id"]
    price = metered_price(client, meter_id)
    fake.add_customer("cus_Q1w2E3r4")

    # When objects that do not exist are referenced
    # Then each is a 400 resource_missing naming the parameter
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.subscriptions.create(
            params={"customer": "cus_nope", "items": [{"price": price.id}]}
        )
    assert (caught.value.http_status, caught.value.code, caught.value.param) == (
        400,
        "resource_missing",
        "customer",
    )
    assert error_of(caught)["message"] == "No such customer: 'cus_nope'"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        subscribe(client, "price_nope")
    assert (caught.value.code, caught.value.param) == ("resource_missing", "items[0][price]")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        metered_price(client, "mtr_nope")
    assert (caught.value.code, caught.value.param) == ("resource_missing", "recurring[meter]")
    # And unknown ids in the URL are 404s
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.subscriptions.retrieve("sub_nope")
    assert caught.value.http_status == 404 and caught.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meters.retrieve("mtr_nope")
    assert caught.value.http_status == 404


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"items": [{"price": "PRICE", "quantity": 2}]}, "items[0][quantity]", None),
        ({"items": [{"price": "PRICE"}], "trial_days": 3}, "trial_days", "parameter_unknown"),
        ({"items": []}, "items", "parameter_missing"),
        ({"items": [{"price": "PRICE"}, {"price": "PRICE"}]}, "items", None),
        (
            {"items": [{"price": "PRICE"}], "billing_cycle_anchor": "soon"},
            "billing_cycle_anchor",
            "parameter_invalid_integer",
        ),
        (
            {"items": [{"price": "PRICE"}], "metadata": {"k": ""}, "description": ""},
            "description",
            "parameter_invalid_empty",
        ),
    ],
    ids=[
        "quantity-on-metered",
        "unknown-param",
        "no-items",
        "same-price-twice",
        "non-integer-anchor",
        "empty-description",
    ],
)
def test_invalid_subscription_params_are_refused(
    fake: FakeStripe,
    client: stripe.StripeClient,
    params: dict[str, Any],
    param: str,
    code: str | None,
) -> None:
    # Given a customer and a metered price
    fake.add_customer("cus_Q1w2E3r4")
    price = metered_price(client, fake.add_meter("ai_messages")["id"])
    filled = json.loads(json.dumps(params).replace("PRICE", price.id))

    # When a subscription is created with one thing wrong
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.subscriptions.create(params={"customer": "cus_Q1w2E3r4", **filled})

    # Then Stripe's 400 names the parameter, and nothing was made
    assert caught.value.http_status == 400
    assert (caught.value.param, caught.value.code) == (param, code)
    assert client.v1.subscriptions.list(params={"status": "all"}).data == []


def test_price_and_meter_validation(fake: FakeStripe, client: stripe.StripeClient) -> None:
    # Given an existing meter
    meter_id = fake.add_meter("ai_messages")["id"]

    # When invalid prices and a duplicate meter are created
    # Then each is refused with the offending parameter
    cases: list[tuple[dict[str, Any], str]] = [
        ({"recurring": {"interval": "month", "usage_type": "metered"}}, "recurring[meter]"),
        ({"recurring": {"interval": "fortnight"}}, "recurring[interval]"),
        ({"recurring": {"interval": "month", "meter": meter_id}}, "recurring[meter]"),
        ({"recurring": {"interval": "year", "interval_count": 4}}, "recurring[interval_count]"),
    ]
    for recurring, param in cases:
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.prices.create(
                params={"currency": "usd", "unit_amount": 1, "product_data": {"name": "x"}}
                | recurring
            )
        assert caught.value.param == param
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meters.create(
            params={
                "display_name": "again",
                "event_name": "ai_messages",
                "default_aggregation": {"formula": "sum"},
            }
        )
    assert caught.value.param == "event_name"
    with pytest.raises(ValueError):
        fake.add_meter("ai_messages")


def test_billing_endpoints_check_the_api_key(fake: FakeStripe) -> None:
    # Given a client with a publishable key
    bad = stripe.StripeClient("pk_test_123", base_addresses={"api": fake.url})

    # When it lists subscriptions
    # Then Stripe's 401 comes back
    with pytest.raises(stripe.AuthenticationError):
        bad.v1.subscriptions.list()


def test_idempotency_key_replays_a_subscription_create(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a subscription created with an Idempotency-Key
    fake.add_customer("cus_Q1w2E3r4")
    price = metered_price(client, fake.add_meter("ai_messages")["id"])
    params: Any = {"customer": "cus_Q1w2E3r4", "items": [{"price": price.id}]}
    first = client.v1.subscriptions.create(params=params, options={"idempotency_key": "k-1"})

    # When the same request is sent again with the key
    second = client.v1.subscriptions.create(params=params, options={"idempotency_key": "k-1"})

    # Then Stripe replays it: one subscription, one created event
    assert second.id == first.id
    assert second.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(fake.events("customer.subscription.created")) == 1


def test_reset_forgets_billing_objects_and_webhooks(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given a subscription, its events and an endpoint
    fake.add_webhook_endpoint(receiver.url)
    fake.add_customer("cus_Q1w2E3r4")
    subscription = subscribe(client, metered_price(client, fake.add_meter("ai_messages")["id"]).id)
    assert fake.wait_for_deliveries(5)

    # When the fake is reset over HTTP
    assert requests.post(f"{fake.url}/_fake/reset", timeout=5).status_code == 200

    # Then everything new is forgotten too
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.retrieve(subscription.id)
    assert fake.events() == [] and fake.deliveries == []
    assert client.v1.webhook_endpoints.list().data == []
    assert client.v1.billing.meters.list().data == []
    fake.add_customer("cus_Q1w2E3r4")  # the fixed id is free again


@pytest.mark.usefixtures("real_clock")
def test_cli_registers_a_webhook_endpoint_that_receives_events(receiver: Receiver) -> None:
    # Given the fake started by hand with a webhook endpoint and secret
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools.fake_stripe",
            "--port",
            "0",
            "--webhook-url",
            receiver.url,
            "--webhook-secret",
            "whsec_cli",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split(" on ")[1].split()[0]
        assert receiver.url in process.stdout.readline()

        # When a customer subscribes through it
        http_client = stripe.RequestsClient(timeout=5)
        cli_client = stripe.StripeClient(
            "sk_test_fake", base_addresses={"api": url}, http_client=http_client
        )
        customer = cli_client.v1.customers.create()
        meter = cli_client.v1.billing.meters.create(
            params={
                "display_name": "AI",
                "event_name": "ai_messages",
                "default_aggregation": {"formula": "sum"},
            }
        )
        price = metered_price(cli_client, meter.id)
        cli_client.v1.subscriptions.create(
            params={"customer": customer.id, "items": [{"price": price.id}]}
        )
        http_client.close()

        # Then the endpoint receives the event signed with the given secret
        assert receiver.wait_for(1)
        assert receiver.events("whsec_cli")[0].type == "customer.subscription.created"
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    assert process.returncode == 0
