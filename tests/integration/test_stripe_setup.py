"""`stripe setup` and `stripe check` through the operators' command and the real SDK, against the
fake Stripe: setup on an empty account then again duplicates nothing; check passes on what setup
made and names each problem on its own line otherwise."""

import json
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from devtools.fake_stripe import FakeStripe
from usage_meter import admin
from usage_meter.logic.stripe_setup import METER_ERROR_EVENTS, SUBSCRIPTION_EVENTS

KEY = "sk_test_setup"
WEBHOOK_URL = "http://127.0.0.1:9/v1/stripe/webhook"  # nothing here emits events to deliver
DESTINATION_URL = "http://127.0.0.1:9/v1/stripe/events"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStripe]:
    with FakeStripe() as running:
        monkeypatch.setenv("STRIPE_API_KEY", KEY)
        monkeypatch.setenv("STRIPE_API_BASE", running.url)
        monkeypatch.delenv("METERS", raising=False)  # the template's default: two meters
        yield running


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(KEY, base_addresses={"api": fake.url})


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]]]:
    code = admin.main(["stripe", *argv])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def meters(client: stripe.StripeClient) -> list[Any]:
    return list(client.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter())


def prices(client: stripe.StripeClient) -> list[Any]:
    return list(client.v1.prices.list(params={"limit": 100}).auto_paging_iter())


def endpoints(client: stripe.StripeClient) -> list[Any]:
    return list(client.v1.webhook_endpoints.list(params={"limit": 100}).auto_paging_iter())


def register_destination(client: stripe.StripeClient) -> None:
    """An event destination for the meter error events (the fake serves Stripe's v2 route)."""
    client.v2.core.event_destinations.create(
        params={
            "name": "usage-meter rejections",
            "type": "webhook_endpoint",
            "event_payload": "thin",
            "enabled_events": list(METER_ERROR_EVENTS),
            "webhook_endpoint": {"url": DESTINATION_URL},
        }
    )


def meter_of(client: stripe.StripeClient, event_name: str) -> Any:
    [meter] = [m for m in meters(client) if m.event_name == event_name and m.status == "active"]
    return meter


def good_account(client: stripe.StripeClient, capsys: pytest.CaptureFixture[str]) -> None:
    """What setup makes, and the event destination."""
    code, _ = run(capsys, "setup", "--webhook-url", WEBHOOK_URL)
    assert code == 0
    register_destination(client)


def problems(lines: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(line["problem"], line.get("meter")) for line in lines if "problem" in line]


def test_setup_on_an_empty_account_then_again_duplicates_nothing(client, capsys):
    argv = ("setup", "--price-amount", "3", "--currency", "USD", "--webhook-url", WEBHOOK_URL)
    assert admin.main(["stripe", *argv]) == 0
    out, err = capsys.readouterr()
    assert "Store the signing secret now" in err
    lines = [json.loads(line) for line in out.splitlines()]
    [ai, api, webhook, total] = lines
    assert (ai["meter"], ai["status"], ai["price"]) == ("ai_messages", "created", "created")
    assert (api["meter"], api["status"], api["price"]) == ("api_calls", "created", "created")
    assert ai["lookup_key"] == "usage-meter:ai_messages:usd:3"
    assert webhook["webhook_endpoint"] == "created"
    assert webhook["secret"].startswith("whsec_")
    assert total == {
        "meters": 2,
        "exists": 0,
        "created": 2,
        "misconfigured": 0,
        "prices_created": 2,
        "prices_existing": 0,
        "webhook_endpoint": "created",
    }

    meter = meter_of(client, "ai_messages")
    assert meter.id == ai["meter_id"]
    assert meter.default_aggregation.formula == "sum"
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.customer_mapping.type == "by_id"
    assert meter.value_settings.event_payload_key == "value"
    price = client.v1.prices.retrieve(ai["price_id"])
    assert (price.unit_amount, price.currency, price.lookup_key) == (3, "usd", ai["lookup_key"])
    assert price.recurring.usage_type == "metered"
    assert (price.recurring.interval, price.recurring.meter) == ("month", meter.id)
    [endpoint] = endpoints(client)
    assert endpoint.url == WEBHOOK_URL
    assert sorted(endpoint.enabled_events) == sorted(SUBSCRIPTION_EVENTS)

    code, again = run(capsys, *argv)
    assert code == 0
    assert [(line["status"], line["price"]) for line in again[:2]] == [("exists", "exists")] * 2
    assert [line["meter_id"] for line in again[:2]] == [ai["meter_id"], api["meter_id"]]
    assert [line["price_id"] for line in again[:2]] == [ai["price_id"], api["price_id"]]
    assert again[2] == {"webhook_endpoint": "exists", "id": webhook["id"], "url": WEBHOOK_URL}
    assert "secret" not in again[2]
    assert again[3]["exists"] == 2 and again[3]["prices_existing"] == 2
    assert (len(meters(client)), len(prices(client)), len(endpoints(client))) == (2, 2, 1)

    # Another amount is another price; the meters stay.
    code, other = run(capsys, "setup", "--price-amount", "5")
    assert code == 0
    assert [line["price"] for line in other[:2]] == ["created", "created"]
    assert (len(meters(client)), len(prices(client))) == (2, 4)


def test_setup_reports_a_misconfigured_meter_and_leaves_it(client, capsys):
    counting = client.v1.billing.meters.create(
        params={
            "display_name": "AI messages",
            "event_name": "ai_messages",
            "default_aggregation": {"formula": "count"},
            "customer_mapping": {"event_payload_key": "customer", "type": "by_id"},
        }
    )
    code, lines = run(capsys, "setup", "--price-amount", "3")
    assert code == 1
    [ai, api, total] = lines
    assert (ai["status"], ai["meter_id"], ai["price"]) == ("misconfigured", counting.id, "skipped")
    assert ai["problems"] == [
        "default_aggregation.formula is 'count', expected 'sum'",
        "customer_mapping.event_payload_key is 'customer', expected 'stripe_customer_id'",
    ]
    assert (api["status"], api["price"]) == ("created", "created")
    assert (total["misconfigured"], total["created"], total["prices_created"]) == (1, 1, 1)
    assert meter_of(client, "ai_messages").default_aggregation.formula == "count"  # untouched
    assert len(meters(client)) == 2
    assert [p.recurring.meter for p in prices(client)] == [api["meter_id"]]


def test_setup_creates_a_meter_whose_only_one_is_inactive(client, capsys):
    old = client.v1.billing.meters.create(
        params={
            "display_name": "ai_messages",
            "event_name": "ai_messages",
            "default_aggregation": {"formula": "sum"},
        }
    )
    client.v1.billing.meters.deactivate(old.id)
    code, lines = run(capsys, "setup", "--meters", '{"ai_messages": {"included": 5}}')
    assert code == 0
    assert lines[0]["status"] == "created"
    assert lines[0]["inactive_meter_ids"] == [old.id]
    assert meter_of(client, "ai_messages").id == lines[0]["meter_id"] != old.id


def test_check_passes_on_what_setup_made(client, capsys):
    good_account(client, capsys)
    code, lines = run(capsys, "check", "--webhook-url", WEBHOOK_URL)
    assert code == 0
    [endpoint] = endpoints(client)
    summary = {
        "ok": True,
        "problems": 0,
        "meters": 2,
        "webhook_endpoint": endpoint.id,
        "event_destinations": "ok",
    }
    assert lines[-1] == summary
    assert problems(lines) == []
    assert [line for line in lines if "warning" in line] == []
    code, lines = run(capsys, "check")  # any endpoint with the events will do
    assert code == 0 and lines[-1]["ok"] is True


def _deactivate(client: stripe.StripeClient) -> None:
    client.v1.billing.meters.deactivate(meter_of(client, "ai_messages").id)


def _count_meter(client: stripe.StripeClient) -> None:
    _deactivate(client)
    client.v1.billing.meters.create(
        params={
            "display_name": "ai_messages",
            "event_name": "ai_messages",
            "default_aggregation": {"formula": "count"},
        }
    )


def _delete_endpoint(client: stripe.StripeClient) -> None:
    [endpoint] = endpoints(client)
    client.v1.webhook_endpoints.delete(endpoint.id)


def _narrow_endpoint(client: stripe.StripeClient) -> None:
    _delete_endpoint(client)
    client.v1.webhook_endpoints.create(
        params={"url": WEBHOOK_URL, "enabled_events": list(SUBSCRIPTION_EVENTS[:2])}
    )


@pytest.mark.parametrize(
    ("break_it", "extra", "expected", "named"),
    [
        (_deactivate, (), ("meter_inactive", "ai_messages"), "inactive"),
        (_count_meter, (), ("meter_misconfigured", "ai_messages"), "'count', expected 'sum'"),
        (
            None,
            ("--meters", '{"ai_messages": {}, "api_calls": {}, "tokens": {"included": 9}}'),
            ("meter_missing", "tokens"),
            "no Stripe meter has event_name 'tokens'",
        ),
        (_delete_endpoint, (), ("webhook_endpoint_missing", None), WEBHOOK_URL),
        (
            None,
            ("--webhook-url", "http://127.0.0.1:9/elsewhere"),
            ("webhook_endpoint_missing", None),
            "http://127.0.0.1:9/elsewhere",
        ),
        (
            _narrow_endpoint,
            (),
            ("webhook_endpoint_events", None),
            "customer.subscription.deleted, customer.subscription.paused, "
            "customer.subscription.resumed",
        ),
    ],
    ids=["inactive", "count", "missing", "no-endpoint", "other-url", "endpoint-events"],
)
def test_check_names_each_problem_on_its_own_line(client, capsys, break_it, extra, expected, named):
    good_account(client, capsys)
    if break_it is not None:
        break_it(client)
    argv = ("--webhook-url", WEBHOOK_URL) if "--webhook-url" not in extra else ()
    code, lines = run(capsys, "check", *argv, *extra)
    assert code == 1
    assert problems(lines) == [expected]
    [line] = [line for line in lines if "problem" in line]
    assert named in line["message"]
    assert lines[-1]["ok"] is False and lines[-1]["problems"] == 1


def test_check_reports_every_problem_at_once(client, capsys):
    """A deactivated meter, one counting, one missing, no webhook endpoint, no destination."""
    code, _ = run(capsys, "setup", "--meters", '{"ai_messages": {}}')
    assert code == 0
    _deactivate(client)
    client.v1.billing.meters.create(
        params={
            "display_name": "api_calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "count"},
        }
    )
    meters_json = '{"ai_messages": {}, "api_calls": {}, "tokens": {}}'
    code, lines = run(capsys, "check", "--meters", meters_json, "--webhook-url", WEBHOOK_URL)
    assert code == 1
    found = problems(lines)
    assert found[:4] == [
        ("meter_inactive", "ai_messages"),
        ("meter_misconfigured", "api_calls"),
        ("meter_missing", "tokens"),
        ("webhook_endpoint_missing", None),
    ]
    destination_lines = [line for line in lines if line.get("problem", "").startswith("event_d")]
    assert [line["event_type"] for line in destination_lines] == list(METER_ERROR_EVENTS)
    assert {line["problem"] for line in destination_lines} == {"event_destination_missing"}
    assert lines[-1]["event_destinations"] == "problems"
    assert lines[-1]["problems"] == len(found) == 4 + len(METER_ERROR_EVENTS)
    assert all(line["message"] for line in lines if "problem" in line)


def test_stripe_setup_needs_no_table_and_a_key(monkeypatch, capsys):
    monkeypatch.delenv("TABLE_NAME", raising=False)
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    assert admin.main(["stripe", "check"]) == 2
    assert "STRIPE_API_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        admin.main(["stripe", "setup", "--meters", "{not json"])
    with pytest.raises(SystemExit):
        admin.main(["stripe", "setup", "--currency", "usd"])


def destinations(client: stripe.StripeClient) -> list[Any]:
    return list(
        client.v2.core.event_destinations.list(
            params={"include": ["webhook_endpoint.url"]}
        ).auto_paging_iter()
    )


def test_setup_registers_the_event_destination_once_and_check_then_passes(client, capsys):
    # When setup runs with the stack's event-destination URL, twice
    args = ("setup", "--webhook-url", WEBHOOK_URL, "--event-destination-url", DESTINATION_URL)
    code, lines = run(capsys, *args)
    assert code == 0
    [created] = [line for line in lines if "event_destination" in line and "id" in line]
    assert created["event_destination"] == "created" and created["secret"].startswith("whsec_")
    assert sorted(created["enabled_events"]) == [
        "v1.billing.meter.error_report_triggered",
        "v1.billing.meter.no_meter_found",
    ]
    code, lines = run(capsys, *args)
    assert code == 0 and lines[-1]["event_destination"] == "exists"
    # Then one thin destination for that URL exists, and check finds nothing missing
    [destination] = destinations(client)
    assert destination.event_payload == "thin" and destination.webhook_endpoint.url == (
        DESTINATION_URL
    )
    code, lines = run(capsys, "check", "--webhook-url", WEBHOOK_URL)
    assert code == 0 and lines[-1]["event_destinations"] == "ok"
