"""The HTTP contract of DESIGN §4, through the Powertools resolver with an in-memory store."""

import base64
import json
from datetime import UTC, datetime

import pytest

from devtools.invoke import http_event, response_json
from tests.fakes import InMemoryStore
from usage_meter.api import MAX_BODY_BYTES, read_api, record_api

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
METERS = {"ai_messages": {"included": 1000}}
EVENT = {"stripe_customer_id": "cus_Q1w2E3r4", "meter": "ai_messages", "quantity": 1}


class Context:
    function_name = "test"
    aws_request_id = "req-1"


@pytest.fixture
def store():
    return InMemoryStore()


def post(store, path, body=None, **kwargs):
    app = record_api(meters=METERS, store=store, now=lambda: NOW)
    return app.resolve(http_event("POST", path, body, **kwargs), Context())


def get(store, path):
    app = read_api(included={"ai_messages": 1000}, store=store, now=lambda: NOW)
    return app.resolve(http_event("GET", path), Context())


def test_a_new_event_answers_202_with_its_id(store):
    response = post(store, "/v1/events", EVENT)
    body = response_json(response)
    assert (
        response["statusCode"] == 202
        and body["duplicate"] is False
        and body["id"].startswith("ev_")
    )
    assert response["headers"]["Content-Type"] == "application/json"


def test_a_replay_answers_200_with_the_original_id(store):
    first = response_json(post(store, "/v1/events", {**EVENT, "idempotency_key": "msg_8f2c"}))
    again = post(store, "/v1/events", {**EVENT, "idempotency_key": "msg_8f2c"})
    assert again["statusCode"] == 200 and response_json(again) == {
        "id": first["id"],
        "duplicate": True,
    }


def test_the_idempotency_key_header_works_like_the_body_field(store):
    first = response_json(post(store, "/v1/events", EVENT, headers={"Idempotency-Key": "k1"}))
    again = post(store, "/v1/events", {**EVENT, "idempotency_key": "k1"})
    assert response_json(again) == {"id": first["id"], "duplicate": True}


def test_a_header_key_that_contradicts_the_body_is_422(store):
    response = post(
        store, "/v1/events", {**EVENT, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
    )
    assert response["statusCode"] == 422 and store.events == {}


def test_the_same_key_with_another_body_answers_409(store):
    post(store, "/v1/events", {**EVENT, "idempotency_key": "k"})
    response = post(store, "/v1/events", {**EVENT, "idempotency_key": "k", "quantity": 2})
    assert response["statusCode"] == 409
    assert response_json(response)["error"]["code"] == "idempotency_conflict"


@pytest.mark.parametrize("raw", ["{", "", "[1,", '{"quantity": NaN}', '{"a": 1, "a": 2}'])
def test_unparsable_json_answers_400_and_stores_nothing(store, raw):
    response = post(store, "/v1/events", raw_body=raw)
    assert response["statusCode"] == 400
    assert response_json(response)["error"]["code"] == "invalid_json"
    assert store.events == {}


def test_a_body_over_64_kib_answers_413(store):
    response = post(
        store, "/v1/events", raw_body=json.dumps({**EVENT, "pad": "x" * MAX_BODY_BYTES})
    )
    assert response["statusCode"] == 413 and store.events == {}


def test_a_base64_encoded_body_is_decoded(store):
    assert post(store, "/v1/events", EVENT, base64_encoded=True)["statusCode"] == 202


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quantity": True}, "quantity"),
        ({"quantity": 1.0}, "quantity"),
        ({"quantity": "1"}, "quantity"),
        ({"quantity": 0}, "quantity"),
        ({"meter": "unknown"}, "meter"),
        ({"stripe_customer_id": "acct_1"}, "stripe_customer_id"),
        ({"timestamp": "2026-11-26 08:00"}, "timestamp"),
        ({"timestamp": "2026-12-26T08:00:00Z"}, "timestamp"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_events_answer_422_naming_the_field(store, change, field):
    response = post(store, "/v1/events", {**EVENT, **change})
    error = response_json(response)["error"]
    assert response["statusCode"] == 422 and error["code"] == "validation_error"
    assert [d["field"] for d in error["details"]] == [field]
    assert store.events == {}


def test_a_body_that_is_not_an_object_is_422(store):
    assert post(store, "/v1/events", [EVENT])["statusCode"] == 422


def test_a_batch_answers_202_with_results_in_request_order(store):
    post(store, "/v1/events", {**EVENT, "idempotency_key": "b"})
    events = [{**EVENT, "idempotency_key": k} for k in ("a", "b", "c")]
    response = post(store, "/v1/events/batch", {"events": events})
    assert response["statusCode"] == 202
    assert [r["duplicate"] for r in response_json(response)["results"]] == [False, True, False]


def test_one_bad_event_in_a_batch_is_422_naming_its_index(store):
    events = [EVENT, {**EVENT, "quantity": -1}, EVENT]
    response = post(store, "/v1/events/batch", {"events": events})
    assert response["statusCode"] == 422
    assert [d["field"] for d in response_json(response)["error"]["details"]] == [
        "events[1].quantity"
    ]
    assert store.events == {}


def test_a_batch_of_101_events_is_422(store):
    assert post(store, "/v1/events/batch", {"events": [EVENT] * 101})["statusCode"] == 422


def test_usage_returns_every_meter_for_the_current_period(store):
    post(store, "/v1/events", {**EVENT, "quantity": 1234})
    response = get(store, "/v1/customers/cus_Q1w2E3r4/usage")
    assert response["statusCode"] == 200
    assert response_json(response) == {
        "stripe_customer_id": "cus_Q1w2E3r4",
        "period": {
            "start": "2026-11-01T00:00:00Z",
            "end": "2026-12-01T00:00:00Z",
            "source": "calendar_month",
        },
        "meters": [
            {
                "meter": "ai_messages",
                "quantity": 1234,
                "reported": 0,
                "pending": 1234,
                "included": 1000,
                "included_remaining": 0,
                "billable": 234,
            }
        ],
        "as_of": "2026-11-26T08:00:00Z",
    }


def test_usage_for_a_malformed_customer_id_is_422(store):
    assert get(store, "/v1/customers/not-a-customer/usage")["statusCode"] == 422


def test_an_unknown_route_is_a_json_404(store):
    response = post(store, "/v1/nothing", EVENT)
    assert response["statusCode"] == 404 and response_json(response)["error"]["code"] == "not_found"


def test_an_unexpected_fault_is_a_500_that_leaks_nothing(store):
    def broken(*_):
        raise RuntimeError("secret internals at 10.0.0.1")

    store.put_events = broken
    response = post(store, "/v1/events", EVENT)
    assert response["statusCode"] == 500
    assert (
        "internals" not in response["body"]
        and response_json(response)["error"]["code"] == "internal_error"
    )


def test_a_base64_body_that_is_not_utf8_is_400(store):
    event = http_event("POST", "/v1/events", raw_body="")
    event.update(body=base64.b64encode(b"\xff\xfe{").decode(), isBase64Encoded=True)
    response = record_api(meters=METERS, store=store, now=lambda: NOW).resolve(event, Context())
    assert response["statusCode"] == 400 and store.events == {}


# -- behind the authorizer ------------------------------------------------------------------


def test_a_request_that_skipped_the_authorizer_is_401_and_stores_nothing(store):
    response = record_api(meters=METERS, store=store, now=lambda: NOW).resolve(
        http_event("POST", "/v1/events", EVENT, principal=None), Context()
    )
    assert response["statusCode"] == 401 and store.events == {}
    assert response_json(response)["error"]["code"] == "unauthorized"


def test_a_portal_principal_for_another_customer_is_403(store):
    portal = {
        "kind": "portal",
        "id": "cus_B1",
        "scopes": "read",
        "customer": "cus_B1",
        "expires_at": int(NOW.timestamp()) + 60,
    }
    app = read_api(included={"ai_messages": 1000}, store=store, now=lambda: NOW)
    event = http_event("GET", "/v1/customers/cus_Q1w2E3r4/usage", principal=portal)
    assert app.resolve(event, Context())["statusCode"] == 403


def test_a_portal_principal_whose_token_expired_since_it_was_cached_is_401(store):
    portal = {
        "kind": "portal",
        "id": "cus_Q1w2E3r4",
        "scopes": "read",
        "customer": "cus_Q1w2E3r4",
        "expires_at": int(NOW.timestamp()) - 1,
    }
    app = read_api(included={"ai_messages": 1000}, store=store, now=lambda: NOW)
    event = http_event("GET", "/v1/customers/cus_Q1w2E3r4/usage", principal=portal)
    assert app.resolve(event, Context())["statusCode"] == 401


def test_a_read_key_cannot_record(store):
    reader = {"kind": "key", "id": "0123456789ab", "scopes": "read"}
    event = http_event("POST", "/v1/events", EVENT, principal=reader)
    response = record_api(meters=METERS, store=store, now=lambda: NOW).resolve(event, Context())
    assert response["statusCode"] == 403 and store.events == {}


def test_a_portal_token_is_issued_for_a_customer_and_opens_its_usage(store):
    from usage_meter.logic.auth import verify_portal_token

    app = read_api(
        included={"ai_messages": 1000}, store=store, now=lambda: NOW, token_secret=lambda: b"s"
    )
    body = {"stripe_customer_id": "cus_Q1w2E3r4", "ttl_seconds": 600}
    response = app.resolve(http_event("POST", "/v1/portal-tokens", body), Context())
    assert response["statusCode"] == 201
    out = response_json(response)
    principal = verify_portal_token(out["token"], [b"s"], int(NOW.timestamp()))
    assert principal.customer == "cus_Q1w2E3r4" and out["expires_at"] == "2026-11-26T08:10:00Z"


@pytest.mark.parametrize("ttl", [0, 59, 86401, "600", 1.5])
def test_a_portal_token_ttl_outside_a_minute_to_a_day_is_422(store, ttl):
    app = read_api(
        included={"ai_messages": 1000}, store=store, now=lambda: NOW, token_secret=lambda: b"s"
    )
    body = {"stripe_customer_id": "cus_Q1w2E3r4", "ttl_seconds": ttl}
    assert (
        app.resolve(http_event("POST", "/v1/portal-tokens", body), Context())["statusCode"] == 422
    )


def test_the_portal_origin_gets_cors_headers_and_a_preflight_answer(store):
    app = read_api(
        included={"ai_messages": 1000},
        store=store,
        now=lambda: NOW,
        portal_origins=("https://portal.example.com",),
    )
    get = http_event(
        "GET", "/v1/customers/cus_Q1w2E3r4/usage", headers={"Origin": "https://portal.example.com"}
    )
    headers = app.resolve(get, Context())["headers"]
    assert headers["Access-Control-Allow-Origin"] == "https://portal.example.com"
    preflight = http_event(
        "OPTIONS",
        "/v1/customers/cus_Q1w2E3r4/usage",
        principal=None,
        headers={"Origin": "https://portal.example.com", "Access-Control-Request-Method": "GET"},
    )
    answer = app.resolve(preflight, Context())
    assert (
        answer["statusCode"] == 204 and "GET" in answer["headers"]["Access-Control-Allow-Methods"]
    )
    other = http_event(
        "GET", "/v1/customers/cus_Q1w2E3r4/usage", headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in app.resolve(other, Context())["headers"]
