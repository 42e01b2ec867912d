"""The Stripe adapters through the real SDK, with Stripe's answers given per test (issue 15,
mutation testing: what a changed line of billing/ would get wrong).

Each test answers the SDK's HTTP requests itself (Stripe's documented bodies and statuses), so it
can give every answer the flush has to tell apart: delivered, a repeated identifier, clock skew,
a refusal with or without Stripe's code, a rate limit with or without Retry-After, a bad or
restricted key, an idempotency mismatch, a 5xx; and the subscriptions and summaries Stripe
serves to the webhook and to reconciliation.
"""

import hashlib
import hmac
import json
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
import stripe

from usage_meter.billing import (
    BillingAuthError,
    PermanentBillingError,
    RateLimited,
    SendOutcome,
    TransientBillingError,
    stripe_meter,
)
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.billing.stripe_subscriptions import (
    InvalidSignature,
    StripeSubscriptions,
    verify_webhook,
)
from usage_meter.billing.stripe_summaries import StripeSummaries
from usage_meter.models.domain import ItemPeriods, MeterEventRequest

API = "http://127.0.0.1:9"
REQUEST = MeterEventRequest(
    identifier="umc_x.1",
    event_name="ai_messages",
    customer="cus_A",
    value=12,
    timestamp=1_800_000_000,
)
Answer = tuple[int, dict[str, Any], dict[str, str]]


class Stripe:
    """Stripe's side of the SDK's requests: `answer(method, path, params)` gives each answer;
    `requests` keeps (method, URL, form or query, timeout) of every request."""

    def __init__(self) -> None:
        self.answer: Callable[[str, str, str], Answer] = lambda *_: (200, {}, {})
        self.requests: list[tuple[str, str, str, float]] = []


@pytest.fixture
def fake_stripe(monkeypatch) -> Stripe:
    server = Stripe()

    def request(client, method, url, headers, post_data=None):
        path, _, query = url.partition("?")
        server.requests.append((method, path, post_data or query, client._timeout))
        status, body, extra = server.answer(method, path.removeprefix(API), post_data or query)
        headers = {"Content-Type": "application/json", "Request-Id": "req_1", **extra}
        return json.dumps(body).encode(), status, headers

    monkeypatch.setattr(stripe.RequestsClient, "request", request)
    monkeypatch.setattr(stripe._http_client.HTTPClient, "INITIAL_DELAY", 0.001)
    monkeypatch.setattr(stripe._http_client.HTTPClient, "MAX_DELAY", 0.002)
    return server


def error(type_: str, message: str, code: str | None = None) -> dict[str, Any]:
    body = {"type": type_, "message": message}
    return {"error": body | ({"code": code} if code else {})}


def billing(key: str = "sk_test_x", **options: Any) -> StripeMeterBilling:
    options = {"api_base": API, "max_requests_per_second": 10_000} | options
    return StripeMeterBilling(key, **options)


# -- sending a meter event ---------------------------------------------------------------------


def test_an_event_goes_to_stripes_meter_events_form_encoded(fake_stripe):
    assert billing(api_base=None).send(REQUEST) == SendOutcome.DELIVERED
    [(method, url, form, timeout)] = fake_stripe.requests
    assert (method, url, timeout) == (
        "post",
        "https://api.stripe.com/v1/billing/meter_events",
        20.0,
    )
    assert sorted(form.split("&")) == [
        "event_name=ai_messages",
        "identifier=umc_x.1",
        "payload[stripe_customer_id]=cus_A",
        "payload[value]=12",
        "timestamp=1800000000",
    ]


def test_a_repeated_identifier_is_already_delivered(fake_stripe):
    message = "An event already exists with identifier umc_x.1."
    fake_stripe.answer = lambda *_: (400, error("invalid_request_error", message), {})
    assert billing().send(REQUEST) == SendOutcome.ALREADY_DELIVERED


def test_a_timestamp_ahead_of_stripes_clock_is_transient(fake_stripe):
    body = error("invalid_request_error", "Timestamp is in the future", "timestamp_in_future")
    fake_stripe.answer = lambda *_: (400, body, {})
    with pytest.raises(TransientBillingError, match=r"^Timestamp is in the future$"):
        billing().send(REQUEST)


def test_a_refusal_carries_stripes_message_and_code(fake_stripe):
    body = error("invalid_request_error", "No such customer: 'cus_A'", "resource_missing")
    fake_stripe.answer = lambda *_: (400, body, {})
    with pytest.raises(PermanentBillingError) as raised:
        billing().send(REQUEST)
    assert (str(raised.value), raised.value.code) == (
        "No such customer: 'cus_A'",
        "resource_missing",
    )


def test_a_refusal_for_a_card_is_permanent_with_its_code(fake_stripe):
    fake_stripe.answer = lambda *_: (402, error("card_error", "Declined", "card_declined"), {})
    with pytest.raises(PermanentBillingError) as raised:
        billing().send(REQUEST)
    assert (str(raised.value), raised.value.code) == ("Declined", "card_declined")


@pytest.mark.parametrize(("header", "retry_after"), [("3", 3.0), ("soon", None), (None, None)])
def test_a_rate_limit_carries_stripes_retry_after_when_it_is_a_number(
    fake_stripe, header, retry_after
):
    extra = {"Retry-After": header} if header else {}
    fake_stripe.answer = lambda *_: (429, error("invalid_request_error", "Too many"), extra)
    with pytest.raises(RateLimited) as raised:
        billing().send(REQUEST)
    assert (str(raised.value), raised.value.retry_after) == ("Too many", retry_after)
    assert len(fake_stripe.requests) == 1  # the SDK does not retry a 429: the flush does


@pytest.mark.parametrize("status", [401, 403])
def test_a_bad_or_restricted_key_is_an_auth_error(fake_stripe, status):
    fake_stripe.answer = lambda *_: (status, error("invalid_request_error", "Bad key"), {})
    with pytest.raises(BillingAuthError, match=r"^Bad key$"):
        billing().send(REQUEST)


def test_an_idempotency_mismatch_is_permanent_and_says_so(fake_stripe):
    body = error("idempotency_error", "Keys for idempotent requests can only be used once")
    fake_stripe.answer = lambda *_: (400, body, {})
    with pytest.raises(PermanentBillingError) as raised:
        billing().send(REQUEST)
    assert str(raised.value) == "Keys for idempotent requests can only be used once"
    assert raised.value.code == "idempotency_error"


def test_a_server_error_is_retried_twice_by_default_then_transient(fake_stripe):
    fake_stripe.answer = lambda *_: (500, error("api_error", "Something went wrong"), {})
    with pytest.raises(TransientBillingError, match=r"^Something went wrong$"):
        StripeMeterBilling("sk_test_x", api_base=API).send(REQUEST)
    assert len(fake_stripe.requests) == 3


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


@pytest.mark.parametrize(("key", "spacing"), [("sk_test_x", 0.05), ("sk_live_x", 0.002)])
def test_calls_are_spaced_under_stripes_rate_for_the_keys_mode(
    fake_stripe, monkeypatch, key, spacing
):
    # Given Stripe's limits: 25 calls/s in test mode, 1,000 live (the adapter keeps 20 and 500)
    clock = FakeTime()
    monkeypatch.setattr(stripe_meter, "time", clock)
    sender = StripeMeterBilling(key, api_base=API)
    # When four calls go at once, then one after a pause longer than the spacing
    for _ in range(4):
        sender.send(REQUEST)
    clock.now += 1
    sender.send(REQUEST)
    # Then the first goes at once and each next one waits its turn; after the pause, none waits
    assert clock.sleeps == [spacing, spacing, spacing]


# -- subscriptions and their periods -----------------------------------------------------------

ANCHOR, START, END = 1_790_000_000, 1_795_000_000, 1_797_600_000


def subscription(status: str = "active", **fields: Any) -> dict[str, Any]:
    items = fields.pop("items", [metered_item()])
    return {
        "id": "sub_1",
        "object": "subscription",
        "customer": "cus_A",
        "status": status,
        "billing_cycle_anchor": ANCHOR,
        "start_date": ANCHOR - 100,
        "cancel_at_period_end": False,
        "cancel_at": None,
        "ended_at": None,
        "items": {"object": "list", "data": items, "has_more": False, "url": "/v1/x"},
    } | fields


def metered_item(item: str = "si_1", meter: str | None = "mtr_1", **recurring: Any) -> dict:
    usage = {"usage_type": "metered", "meter": meter} if meter else {"usage_type": "licensed"}
    return {
        "id": item,
        "object": "subscription_item",
        "current_period_start": START,
        "current_period_end": END,
        "price": {
            "id": "price_1",
            "object": "price",
            "recurring": {"interval": "month", "interval_count": 1} | usage | recurring,
        },
    }


def meters(*pairs: tuple[str, str], status: str = "active") -> dict[str, Any]:
    data = [
        {"id": i, "object": "billing.meter", "event_name": n, "status": status} for i, n in pairs
    ]
    return {"object": "list", "data": data, "has_more": False, "url": "/v1/billing/meters"}


def serve(fake_stripe: Stripe, *, subscription_body: dict, meter_list: dict | None = None) -> None:
    def answer(method: str, path: str, params: str) -> Answer:
        if path == "/v1/billing/meters":
            return 200, meter_list or meters(("mtr_1", "ai_messages")), {}
        if path.startswith("/v1/subscriptions"):
            return 200, subscription_body, {}
        return 404, error("invalid_request_error", "Unknown"), {}

    fake_stripe.answer = answer


def subscriptions() -> StripeSubscriptions:
    return StripeSubscriptions("sk_test_x", api_base=API)


def test_a_subscription_is_read_with_each_items_current_period_and_meter(fake_stripe):
    serve(fake_stripe, subscription_body=subscription(ended_at=None))
    read = subscriptions().read("sub_1")
    assert (read.id, read.customer, read.status, read.start_date, read.ended_at) == (
        "sub_1",
        "cus_A",
        "active",
        ANCHOR - 100,
        None,
    )
    assert read.items == (
        ItemPeriods(
            item="si_1",
            meter="ai_messages",
            anchor=ANCHOR,
            interval="month",
            interval_count=1,
            periods=((START, END),),
            renews=True,
        ),
    )
    [(method, url, _, timeout)] = [r for r in fake_stripe.requests if "subscriptions" in r[1]]
    assert (method, url, timeout) == ("get", f"{API}/v1/subscriptions/sub_1", 20.0)


def test_an_expanded_customer_is_read_by_its_id(fake_stripe):
    body = subscription(customer={"id": "cus_A", "object": "customer"})
    serve(fake_stripe, subscription_body=body)
    assert subscriptions().read("sub_1").customer == "cus_A"


def test_a_licensed_item_marks_the_cycle_without_a_meter_and_a_one_off_price_none(fake_stripe):
    # Given a one-off price, then a licensed one (no usage type given), on a subscription with
    # no cancel_at nor ended_at field
    one_off = metered_item("si_3") | {
        "price": {"id": "price_3", "object": "price", "recurring": None}
    }
    licensed = metered_item("si_2", meter=None, interval="year", interval_count=2)
    del licensed["price"]["recurring"]["usage_type"]
    body = subscription(items=[one_off, licensed])
    del body["cancel_at"], body["ended_at"]
    serve(fake_stripe, subscription_body=body)
    # Then the licensed item marks the cycle, billing no meter, and no meter is looked up
    read = subscriptions().read("sub_1")
    [item] = read.items
    assert (item.item, item.meter, item.interval, item.interval_count) == ("si_2", "", "year", 2)
    assert (item.renews, read.ended_at) == (True, None)
    assert not [r for r in fake_stripe.requests if r[1].endswith("/billing/meters")]


def test_an_item_without_an_interval_count_counts_one(fake_stripe):
    item = metered_item()
    del item["price"]["recurring"]["interval_count"]
    serve(fake_stripe, subscription_body=subscription(items=[item]))
    assert subscriptions().read("sub_1").items[0].interval_count == 1


@pytest.mark.parametrize(
    ("fields", "renews"),
    [
        ({"status": "canceled", "ended_at": END - 5}, False),
        ({"cancel_at_period_end": True}, False),
        ({"cancel_at": END}, False),
        ({"status": "past_due"}, True),
    ],
)
def test_a_subscription_set_to_end_predicts_no_renewal(fake_stripe, fields, renews):
    serve(fake_stripe, subscription_body=subscription(**fields))
    read = subscriptions().read("sub_1")
    assert read.items[0].renews is renews
    assert read.ended_at == fields.get("ended_at")


def test_an_incomplete_subscription_never_billed_and_is_not_read(fake_stripe):
    serve(fake_stripe, subscription_body=subscription(status="incomplete"))
    assert subscriptions().read("sub_1") is None


def test_meters_are_listed_once_per_adapter(fake_stripe):
    serve(fake_stripe, subscription_body=subscription())
    adapter = subscriptions()
    adapter.read("sub_1")
    adapter.read("sub_1")
    [listed] = [r for r in fake_stripe.requests if r[1].endswith("/billing/meters")]
    assert listed[2] == "limit=100"


def test_an_item_on_a_meter_stripe_no_longer_lists_bills_no_meter(fake_stripe):
    items = [metered_item("si_1", meter="mtr_1"), metered_item("si_2", meter="mtr_gone")]
    serve(fake_stripe, subscription_body=subscription(items=items))
    assert [i.meter for i in subscriptions().read("sub_1").items] == ["ai_messages", ""]


def test_every_subscription_is_listed_canceled_ones_included_incomplete_ones_left_out(
    fake_stripe,
):
    page = {
        "object": "list",
        "url": "/v1/subscriptions",
        "has_more": False,
        "data": [subscription(), subscription(status="incomplete", id="sub_2")],
    }
    serve(fake_stripe, subscription_body=page)
    assert [s.id for s in subscriptions().all()] == ["sub_1"]
    [listed] = [r for r in fake_stripe.requests if r[1].endswith("/v1/subscriptions")]
    assert sorted(listed[2].split("&")) == ["limit=100", "status=all"]


def test_an_error_report_gives_each_sampled_identifier_with_stripes_code_and_message():
    def sample(identifier: str | None, message: str | None = None) -> types.SimpleNamespace:
        """A sample as Stripe sends it: a field it has no value for is absent."""
        request = types.SimpleNamespace(**({"identifier": identifier} if identifier else {}))
        found = types.SimpleNamespace(request=request)
        if message is not None:
            found.error_message = message
        return found

    error_types = [
        types.SimpleNamespace(code="no_meter", sample_errors=[sample("umc_a.1", "No meter")]),
        types.SimpleNamespace(
            code="archived_meter",
            sample_errors=[sample("umc_b.2"), sample(None, "no identifier")],
        ),
    ]
    event = types.SimpleNamespace(
        data=types.SimpleNamespace(reason=types.SimpleNamespace(error_types=error_types))
    )
    notification = types.SimpleNamespace(fetch_event=lambda: event)
    found = StripeSubscriptions.rejections(notification)
    assert [(r.identifier, r.code, r.message) for r in found] == [
        ("umc_a.1", "no_meter", "No meter"),
        ("umc_b.2", "archived_meter", ""),
    ]


# -- meter event summaries ---------------------------------------------------------------------


def test_summaries_sum_stripes_windows_for_the_active_meter(fake_stripe):
    def answer(method: str, path: str, params: str) -> Answer:
        if path == "/v1/billing/meters":
            return 200, meters(("mtr_1", "ai_messages")), {}
        windows = [
            {"object": "billing.meter_event_summary", "aggregated_value": value}
            for value in (3, 4.0)
        ]
        return 200, {"object": "list", "data": windows, "has_more": False, "url": path}, {}

    fake_stripe.answer = answer
    summaries = StripeSummaries("sk_test_x", api_base=API)
    assert summaries.meter_id("ai_messages") == "mtr_1" and summaries.meter_id("other") is None
    assert summaries.total("mtr_1", "cus_A", 1_800_000_000, 1_800_003_600) == 7
    [meter_list] = [r for r in fake_stripe.requests if r[1].endswith("/billing/meters")]
    assert sorted(meter_list[2].split("&")) == ["limit=100", "status=active"]
    [summary] = [r for r in fake_stripe.requests if "event_summaries" in r[1]]
    assert summary[3] == 20.0  # the timeout, well under the Lambda's
    assert summary[1] == f"{API}/v1/billing/meters/mtr_1/event_summaries"
    assert sorted(summary[2].split("&")) == [
        "customer=cus_A",
        "end_time=1800003600",
        "start_time=1800000000",
    ]


# -- signatures ----------------------------------------------------------------------------------

SECRET = "whsec_test_secret"


def signed(payload: bytes, secret: str = SECRET, age: int = 0) -> str:
    stamp = int(time.time()) - age
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256)
    return f"t={stamp},v1={digest.hexdigest()}"


THIN = json.dumps(
    {
        "id": "evt_thin_1",
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "livemode": False,
        "created": "2026-11-26T08:00:00.000Z",
        "related_object": {
            "id": "mtr_1",
            "type": "billing.meter",
            "url": "/v1/billing/meters/mtr_1",
        },
    }
).encode()
TOO_OLD = "no valid signature for this endpoint's secret, or it is too old"


def test_a_thin_notification_verified_with_any_of_the_secrets_is_parsed():
    notification = subscriptions().notification(THIN, signed(THIN), ["whsec_other", SECRET])
    assert (notification.id, notification.type) == (
        "evt_thin_1",
        "v1.billing.meter.error_report_triggered",
    )


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "no Stripe-Signature header"),
        (signed(THIN, "whsec_other"), TOO_OLD),
        (signed(THIN, age=301), TOO_OLD),
    ],
)
def test_a_notification_without_a_fresh_signature_is_refused_saying_why(header, message):
    with pytest.raises(InvalidSignature) as refused:
        subscriptions().notification(THIN, header, [SECRET])
    assert str(refused.value) == message


def test_a_signed_webhook_that_is_not_an_event_is_refused_saying_so():
    payload = b"not json"
    with pytest.raises(InvalidSignature, match=r"^the payload is not a Stripe event: "):
        verify_webhook(payload, signed(payload), [SECRET])


def test_reconciliation_retries_a_failing_summary_twice(fake_stripe):
    fake_stripe.answer = lambda *_: (500, error("api_error", "Something went wrong"), {})
    with pytest.raises(stripe.APIError):
        StripeSummaries("sk_test_x", api_base=API).total("mtr_1", "cus_A", 0, 60)
    assert len(fake_stripe.requests) == 3
