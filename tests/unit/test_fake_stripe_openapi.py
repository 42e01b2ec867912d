"""The fake Stripe's answers, checked against Stripe's published OpenAPI description.

Bodies are validated with jsonschema against the schemas in
tests/fixtures/stripe/openapi-extract.json (cut from stripe/openapi, see the README there).
What OpenAPI does not pin (messages, error codes, headers, idempotent replays and how long
Stripe keeps them) is checked against tests/fixtures/stripe/documented-responses.json, where
every entry names its source. The fake is driven over plain HTTP, as a client sees it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests

from devtools.fake_stripe import IDEMPOTENCY_KEY_TTL, IDENTIFIER_WINDOW, FakeStripe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"
EXTRACT = json.loads((FIXTURES / "openapi-extract.json").read_text())
DOCUMENTED = json.loads((FIXTURES / "documented-responses.json").read_text())
NOW = 1_764_144_000  # 2025-11-26T08:00:00Z
KEY = "sk_test_openapi"


# -- OpenAPI 3.0 schemas as JSON Schema ------------------------------------------------------


def _json_schema(node: Any, *, v2: bool = False) -> Any:
    """OpenAPI 3.0's `nullable` as JSON Schema's null type.

    v2 schemas: Stripe's API reference shows their absent fields as null (its Event Destination
    example has "snapshot_api_version": null, "status_details": null; the v2 Event has
    "context": null, "reason": null) where the OpenAPI file leaves `nullable` out, so every v2
    property may be null.
    """
    if isinstance(node, list):
        return [_json_schema(item, v2=v2) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _json_schema(value, v2=v2) for key, value in node.items()}
    if v2 and isinstance(converted.get("properties"), dict):
        converted["properties"] = {
            name: {"anyOf": [schema, {"type": "null"}]}
            for name, schema in converted["properties"].items()
        }
    if converted.pop("nullable", False):
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


SCHEMAS = {
    name: _json_schema(schema, v2=name.startswith("v2."))
    for name, schema in EXTRACT["components"]["schemas"].items()
}


def schema_errors(name: str, instance: Any) -> list[str]:
    """Every way `instance` breaks the named schema, plus any top-level field it does not know."""
    document = {"components": {"schemas": SCHEMAS}, "$ref": f"#/components/schemas/{name}"}
    validator = jsonschema.Draft202012Validator(document)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    known = SCHEMAS[name].get("properties", {})
    errors += [f"unknown field {field!r}" for field in instance if field not in known]
    return errors


def list_errors(name: str, page: dict[str, Any], url: str) -> list[str]:
    """A v1 list: the envelope every list response in the spec has, then each item."""
    envelope = {"data", "has_more", "object", "url"}
    errors = [] if set(page) == envelope else [f"list fields {sorted(page)}"]
    if page.get("object") != "list" or page.get("url") != url:
        errors.append(f"list object/url {page.get('object')!r} {page.get('url')!r}")
    for item in page.get("data", []):
        errors += schema_errors(name, item)
    return errors


# -- driving the fake -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeStripe]:
    with FakeStripe(clock=clock) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {KEY}"
        yield session


def meter_event(
    fake: FakeStripe,
    http: requests.Session,
    *,
    identifier: str = "umb_1",
    timestamp: int = NOW,
    value: str = "12",
    idempotency_key: str | None = None,
) -> requests.Response:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    form = {
        "event_name": "ai_messages",
        "identifier": identifier,
        "timestamp": str(timestamp),
        "payload[stripe_customer_id]": "cus_A1",
        "payload[value]": value,
    }
    return http.post(f"{fake.url}/v1/billing/meter_events", data=form, headers=headers)


def check_documented_error(response: requests.Response, name: str) -> None:
    """The answer is an OpenAPI `error` and matches the documented fixture `name`."""
    expected = DOCUMENTED["errors"][name]
    body = response.json()
    assert schema_errors("error", body) == []
    error = body["error"]
    assert response.status_code == expected["status"]
    assert error["type"] == expected["type"]
    if "code" in expected:
        assert error.get("code") == expected["code"]
    if "param" in expected:
        assert error.get("param") == expected["param"]
    if "message" in expected:
        assert re.search(expected["message"], error["message"]), error["message"]
    for header, value in expected.get("headers", {}).items():
        assert response.headers.get(header) == value


# -- successful answers against the schemas --------------------------------------------------


def test_a_meter_event_answer_is_a_billing_meter_event(fake, http):
    response = meter_event(fake, http)
    body = response.json()
    assert response.status_code == 200
    assert schema_errors("billing.meter_event", body) == []
    assert body["payload"] == {"stripe_customer_id": "cus_A1", "value": "12"}
    assert (body["identifier"], body["timestamp"], body["livemode"]) == ("umb_1", NOW, False)


def test_meters_created_and_listed_are_billing_meters(fake, http):
    form = {
        "display_name": "AI messages",
        "event_name": "ai_messages",
        "default_aggregation[formula]": "sum",
        "customer_mapping[event_payload_key]": "stripe_customer_id",
        "customer_mapping[type]": "by_id",
        "value_settings[event_payload_key]": "value",
    }
    created = http.post(f"{fake.url}/v1/billing/meters", data=form).json()
    assert schema_errors("billing.meter", created) == []
    deactivated = http.post(f"{fake.url}/v1/billing/meters/{created['id']}/deactivate").json()
    assert schema_errors("billing.meter", deactivated) == []
    assert deactivated["status_transitions"]["deactivated_at"] == NOW
    page = http.get(f"{fake.url}/v1/billing/meters").json()
    assert list_errors("billing.meter", page, "/v1/billing/meters") == []
    assert [meter["id"] for meter in page["data"]] == [created["id"]]


def test_meter_event_summaries_are_billing_meter_event_summaries(fake, http):
    meter = fake.add_meter("ai_messages")
    fake.add_customer("cus_A1")
    meter_event(fake, http)
    url = f"/v1/billing/meters/{meter['id']}/event_summaries"
    query = {"customer": "cus_A1", "start_time": NOW - 3600, "end_time": NOW + 3600}
    page = http.get(f"{fake.url}{url}", params={**query, "value_grouping_window": "hour"}).json()
    assert list_errors("billing.meter_event_summary", page, url) == []
    assert [summary["aggregated_value"] for summary in page["data"]] == [12]


def subscribe(fake: FakeStripe, http: requests.Session) -> dict[str, Any]:
    meter = fake.add_meter("ai_messages")
    fake.add_customer("cus_A1")
    price = http.post(
        f"{fake.url}/v1/prices",
        data={
            "currency": "usd",
            "unit_amount": "2",
            "product_data[name]": "AI messages",
            "recurring[interval]": "month",
            "recurring[usage_type]": "metered",
            "recurring[meter]": meter["id"],
        },
    ).json()
    form = {"customer": "cus_A1", "items[0][price]": price["id"]}
    response = http.post(f"{fake.url}/v1/subscriptions", data=form)
    assert response.status_code == 200, response.text
    subscription: dict[str, Any] = response.json()
    return subscription


def test_a_subscription_is_a_subscription_with_periods_on_its_items(fake, http):
    subscription = subscribe(fake, http)
    fetched = http.get(f"{fake.url}/v1/subscriptions/{subscription['id']}").json()
    for body in (subscription, fetched):
        assert schema_errors("subscription", body) == []
        [item] = body["items"]["data"]
        assert schema_errors("subscription_item", item) == []
        # The fields the service reads (billing/stripe_subscriptions.py)
        assert item["current_period_start"] == NOW
        assert item["current_period_end"] > NOW
        assert (body["status"], body["billing_cycle_anchor"]) == ("active", NOW)
    page = http.get(f"{fake.url}/v1/subscriptions", params={"customer": "cus_A1"}).json()
    assert list_errors("subscription", page, "/v1/subscriptions") == []


def test_a_subscription_event_is_an_event_holding_a_subscription(fake, http):
    subscribe(fake, http)
    [event] = fake.events("customer.subscription.created")
    fetched = http.get(f"{fake.url}/v1/events/{event['id']}").json()
    assert schema_errors("event", fetched) == []
    assert schema_errors("subscription", fetched["data"]["object"]) == []


def test_event_destinations_are_v2_event_destinations(fake, http):
    body = {
        "name": "usage-meter",
        "type": "webhook_endpoint",
        "event_payload": "thin",
        "enabled_events": ["v1.billing.meter.error_report_triggered"],
        "webhook_endpoint": {"url": "http://127.0.0.1:9/hook"},
        "include": ["webhook_endpoint.signing_secret"],
    }
    created = http.post(f"{fake.url}/v2/core/event_destinations", json=body).json()
    assert schema_errors("v2.core.event_destination", created) == []
    assert created["webhook_endpoint"]["signing_secret"].startswith("whsec_")
    disabled = http.post(f"{fake.url}/v2/core/event_destinations/{created['id']}/disable").json()
    assert schema_errors("v2.core.event_destination", disabled) == []
    assert disabled["status_details"] == {"disabled": {"reason": "user"}}
    page = http.get(f"{fake.url}/v2/core/event_destinations").json()
    for destination in page["data"]:
        assert schema_errors("v2.core.event_destination", destination) == []
    deleted = http.delete(f"{fake.url}/v2/core/event_destinations/{created['id']}").json()
    assert schema_errors("v2.deleted_object", deleted) == []


def test_an_error_report_is_a_v2_event(fake, http):
    fake.async_validation = True
    meter_event(fake, http)  # no meter for ai_messages: rejected after the fact
    fake.flush_error_reports()  # unless the delivery thread reported it already
    [report] = fake.error_reports
    fetched = http.get(f"{fake.url}/v2/core/events/{report['id']}").json()
    assert schema_errors("v2.core.event", fetched) == []
    assert fetched["type"] == "v1.billing.meter.no_meter_found"


def test_the_schemas_catch_a_wrong_shape():
    # Given answers that break the spec the ways a fake could
    event = {"object": "billing.meter_event", "created": NOW, "event_name": "ai_messages"}
    item = {"object": "subscription_item", "quantity": None}
    # Then each is refused, so a passing check above means something
    assert any("identifier" in error for error in schema_errors("billing.meter_event", event))
    assert any("quantity" in error for error in schema_errors("subscription_item", item))
    assert schema_errors("error", {"error": {"type": "teapot_error"}}) != []
    extra = schema_errors("billing.meter_event", {**event, "extra": 1})
    assert extra[-1] == "unknown field 'extra'"


# -- errors against the schema and the documented answers ------------------------------------


def test_a_repeated_identifier_gets_the_documented_duplicate_answer(fake, http):
    meter_event(fake, http, identifier="umb_dup")
    check_documented_error(meter_event(fake, http, identifier="umb_dup"), "duplicate_identifier")


@pytest.mark.parametrize(
    ("timestamp", "name"),
    [
        (NOW - 35 * 24 * 3600 - 1, "timestamp_too_far_in_past"),
        (NOW + 5 * 60 + 1, "timestamp_in_future"),
    ],
)
def test_a_timestamp_outside_stripes_window_gets_the_documented_error(fake, http, timestamp, name):
    check_documented_error(meter_event(fake, http, timestamp=timestamp), name)
    assert fake.accepted() == []


def test_the_edges_of_the_timestamp_window_are_accepted(fake, http):
    for identifier, timestamp in (("old", NOW - 35 * 24 * 3600), ("ahead", NOW + 5 * 60)):
        assert meter_event(fake, http, identifier=identifier, timestamp=timestamp).ok


def test_a_rate_limit_gets_the_documented_429(fake, http):
    fake.inject("rate_limit", retry_after=1)
    response = meter_event(fake, http)
    check_documented_error(response, "rate_limited")
    assert response.headers["Retry-After"] == "1"


def test_a_second_concurrent_call_for_a_pair_gets_the_documented_429(clock, http):
    with FakeStripe(clock=clock, sleep_while_serving=0.3) as fake:
        answers: list[requests.Response] = []
        first = threading.Thread(target=lambda: answers.append(meter_event(fake, http)))
        first.start()
        while fake.calls < 1:
            pass
        with requests.Session() as other:
            other.headers["Authorization"] = f"Bearer {KEY}"
            second = meter_event(fake, other, identifier="umb_2")
        first.join()
    check_documented_error(second, "rate_limited")
    assert answers[0].ok


def test_a_reused_idempotency_key_with_other_parameters_gets_the_documented_error(fake, http):
    meter_event(fake, http, idempotency_key="key-1")
    response = meter_event(fake, http, value="13", idempotency_key="key-1")
    check_documented_error(response, "idempotency_key_reused_with_other_parameters")


def test_an_idempotency_key_in_flight_gets_the_documented_409(clock, http):
    with FakeStripe(clock=clock) as fake:
        fake.inject("delay", seconds=0.5)
        slow = threading.Thread(target=lambda: meter_event(fake, http, idempotency_key="key-1"))
        slow.start()
        while fake.calls < 1:
            pass
        with requests.Session() as other:
            other.headers["Authorization"] = f"Bearer {KEY}"
            response = meter_event(fake, other, idempotency_key="key-1")
        slow.join()
    check_documented_error(response, "idempotency_key_in_use")


def test_a_request_without_a_key_gets_the_documented_401(fake):
    response = requests.post(f"{fake.url}/v1/billing/meter_events", data={"event_name": "x"})
    check_documented_error(response, "no_api_key")


def test_a_restricted_key_without_the_permission_gets_the_documented_403(fake, http):
    key = "rk_test_51Restricted0123456789"
    fake.restrict_api_key(key, {"billing_meter_read"})
    http.headers["Authorization"] = f"Bearer {key}"
    check_documented_error(meter_event(fake, http), "restricted_key_without_permission")
    assert fake.accepted() == []


def test_an_unknown_meter_gets_the_documented_404(fake, http):
    response = http.get(f"{fake.url}/v1/billing/meters/mtr_missing")
    check_documented_error(response, "resource_missing")
    assert response.json()["error"]["doc_url"].startswith("https://stripe.com/docs/error-codes/")


def test_a_missing_parameter_gets_the_documented_error(fake, http):
    form = {"payload[stripe_customer_id]": "cus_A1", "payload[value]": "1"}
    response = http.post(f"{fake.url}/v1/billing/meter_events", data=form)
    check_documented_error(response, "parameter_missing")


# -- idempotent replays and how long Stripe keeps them ----------------------------------------


def test_a_replay_repeats_the_saved_status_and_body_and_says_so(fake, http):
    first = meter_event(fake, http, idempotency_key="key-1")
    replay = meter_event(fake, http, idempotency_key="key-1")
    assert (replay.status_code, replay.json()) == (first.status_code, first.json())
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Original-Request"] == first.headers["Request-Id"]
    assert "Idempotent-Replayed" not in first.headers
    assert len(fake.accepted()) == 1


def test_a_saved_500_is_replayed_as_it_was(fake, http):
    # Given an answer Stripe saved once the endpoint began executing: a 500
    fake.inject("saved_server_error")
    first = meter_event(fake, http, idempotency_key="key-1")
    replay = meter_event(fake, http, idempotency_key="key-1")
    assert first.status_code == 500 and schema_errors("error", first.json()) == []
    assert (replay.status_code, replay.json()) == (500, first.json())
    assert replay.headers["Idempotent-Replayed"] == "true" and fake.accepted() == []


@pytest.mark.parametrize("refusal", ["rate_limit", "invalid"])
def test_answers_given_before_the_endpoint_runs_are_not_saved(fake, http, refusal):
    # Given a first attempt refused by the rate limiter, or by validation
    if refusal == "rate_limit":
        fake.inject("rate_limit")
        first = meter_event(fake, http, idempotency_key="key-1")
    else:
        first = meter_event(fake, http, timestamp=NOW + 3600, idempotency_key="key-1")
    assert first.status_code in (400, 429)
    # When it is retried with the same key (a corrected one, after a validation error)
    retried = meter_event(fake, http, idempotency_key="key-1")
    # Then the retry runs: nothing was saved under the key to replay or to compare with
    assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers
    assert len(fake.accepted()) == 1


def test_a_saved_answer_is_forgotten_after_24_hours(fake, http, clock):
    assert DOCUMENTED["idempotency"]["saved_for_seconds"] == IDEMPOTENCY_KEY_TTL
    first = meter_event(fake, http, identifier="umb_a", idempotency_key="key-1")
    # Just inside 24 hours the key still pins its parameters
    clock.now = NOW + IDEMPOTENCY_KEY_TTL - 1
    refused = meter_event(fake, http, identifier="umb_b", idempotency_key="key-1")
    check_documented_error(refused, "idempotency_key_reused_with_other_parameters")
    # After 24 hours the key was pruned: the same key makes a new request
    clock.now = NOW + IDEMPOTENCY_KEY_TTL
    fresh = meter_event(fake, http, identifier="umb_b", idempotency_key="key-1")
    assert fresh.ok and "Idempotent-Replayed" not in fresh.headers
    assert [e.identifier for e in fake.accepted()] == ["umb_a", "umb_b"]
    assert first.ok


def test_an_identifier_is_unique_for_24_hours_and_no_longer(fake, http, clock):
    meter_event(fake, http, identifier="umb_dup")
    clock.now = NOW + IDENTIFIER_WINDOW - 1
    check_documented_error(meter_event(fake, http, identifier="umb_dup"), "duplicate_identifier")
    # Stripe promises "at least 24 hours": the fake gives exactly that, the worst case
    clock.now = NOW + IDENTIFIER_WINDOW
    assert meter_event(fake, http, identifier="umb_dup", timestamp=int(clock.now)).ok
    assert [e.identifier for e in fake.accepted()] == ["umb_dup", "umb_dup"]


def test_the_documented_fixtures_name_their_sources():
    entries = [*DOCUMENTED["errors"].values(), DOCUMENTED["idempotency"]]
    assert all(entry["sources"] for entry in entries)
    assert EXTRACT["source"]["repository"] == "stripe/openapi"
    assert re.fullmatch(r"[0-9a-f]{40}", EXTRACT["source"]["commit"])
