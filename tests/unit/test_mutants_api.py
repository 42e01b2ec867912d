"""The HTTP API at its edges (issue 15, mutation testing: what a changed line of api.py would get
wrong that tests/unit/test_api.py and the property tests do not see): the metrics a request
publishes, answers for routes that do not exist and for browsers' preflights, and the error
details a caller is given."""

from datetime import UTC

import pytest

from devtools.invoke import http_event, response_json
from tests.fakes import InMemoryStore
from tests.unit.test_api import EVENT, METERS, NOW, Context
from usage_meter.api import HttpRouter, read_api, record_api, utc_now
from usage_meter.observability import metrics

PORTAL = "https://portal.example.com"


@pytest.fixture
def published():
    """The metrics this test's requests add, as Powertools will publish them."""
    metrics.clear_metrics()
    yield metrics.metric_set
    metrics.clear_metrics()


def test_a_batch_publishes_its_accepted_and_duplicate_events(published):
    store = InMemoryStore()
    app = record_api(meters=METERS, store=store, now=lambda: NOW)
    app.resolve(http_event("POST", "/v1/events", {**EVENT, "idempotency_key": "k1"}), Context())
    events = [{**EVENT, "idempotency_key": k} for k in ("k1", "k2", "k3")]
    published.clear()
    app.resolve(http_event("POST", "/v1/events/batch", {"events": events}), Context())
    assert published == {
        "EventsAccepted": {"Unit": "Count", "StorageResolution": 60, "Value": [2.0]},
        "EventsDuplicate": {"Unit": "Count", "StorageResolution": 60, "Value": [1.0]},
    }


def read_app():
    store = InMemoryStore()
    return read_api(
        included={"ai_messages": 1000}, store=store, now=lambda: NOW, portal_origins=[PORTAL]
    )


def test_a_browsers_preflight_gets_the_functions_methods_and_no_body():
    response = read_app().resolve(
        http_event("OPTIONS", "/v1/customers/cus_A/usage", headers={"Origin": PORTAL}), Context()
    )
    assert (response["statusCode"], response["body"]) == (204, "")
    assert response["headers"]["Access-Control-Allow-Methods"] == "GET,OPTIONS,POST"
    assert "Content-Type" not in response["headers"]


def test_an_unknown_route_of_a_portal_function_is_404_not_a_preflight():
    response = read_app().resolve(http_event("GET", "/v1/nothing"), Context())
    assert response["statusCode"] == 404
    assert response_json(response)["error"]["code"] == "not_found"


def test_a_router_without_a_not_found_answer_gives_a_plain_404():
    response = HttpRouter().resolve(http_event("OPTIONS", "/v1/nothing"), Context())
    assert (response["statusCode"], response["body"]) == (404, '{"message":"Not found"}')


def post(body=None, **kwargs):
    app = record_api(meters=METERS, store=InMemoryStore(), now=lambda: NOW)
    return response_json(app.resolve(http_event("POST", "/v1/events", body, **kwargs), Context()))


def test_a_constant_json_does_not_allow_is_named_in_the_answer():
    error = post(raw_body='{"quantity": NaN}')["error"]
    assert error["message"] == "the body is not valid JSON: NaN is not valid JSON"


def test_a_body_that_is_not_an_object_is_named_as_the_body():
    assert post([1])["error"]["details"] == [
        {"field": "body", "message": "Input should be a JSON object", "type": "model_type"}
    ]


def test_a_field_error_carries_pydantics_message_where_it_happened():
    assert post({**EVENT, "quantity": 0})["error"]["message"] == "the request is not valid"
    assert post({**EVENT, "quantity": 0})["error"]["details"] == [
        {
            "field": "quantity",
            "message": "Input should be greater than or equal to 1",
            "type": "greater_than_equal",
        }
    ]


def usage_from(origin: str | None, origins=(PORTAL,)) -> dict:
    app = read_api(
        included={"ai_messages": 1000},
        store=InMemoryStore(),
        now=lambda: NOW,
        portal_origins=origins,
    )
    headers = {"Origin": origin} if origin is not None else {}
    event = http_event("GET", "/v1/customers/cus_A/usage", headers=headers, principal=PORTAL_TOKEN)
    return app.resolve(event, Context())["headers"]


PORTAL_TOKEN = {"kind": "portal", "id": "cus_A", "scopes": "read", "customer": "cus_A",
                "expires_at": int(NOW.timestamp()) + 600}  # fmt: skip
CORS_HEADERS = "Authorization,Content-Type,X-Amz-Date,X-Amz-Security-Token,X-Api-Key"


def test_a_portal_origin_is_allowed_to_read_with_the_headers_a_browser_may_send():
    headers = usage_from(f"{PORTAL}, https://proxy.example.com")  # the first value counts
    assert {k: v for k, v in headers.items() if k.startswith("Access-Control-")} == {
        "Access-Control-Allow-Origin": PORTAL,
        "Access-Control-Allow-Headers": CORS_HEADERS,
        "Access-Control-Max-Age": "600",
    }


def test_another_origin_or_none_gets_no_cors_headers():
    for origin in ("https://evil.example.com", None):
        assert not [k for k in usage_from(origin) if k.startswith("Access-Control-")]


def test_a_wildcard_allows_every_origin_as_a_wildcard():
    assert (
        usage_from("https://any.example.com", origins=("*",))["Access-Control-Allow-Origin"] == "*"
    )


def test_without_portal_origins_there_are_no_cors_answers():
    app = read_api(included={"ai_messages": 1000}, store=InMemoryStore(), now=lambda: NOW)
    event = http_event("GET", "/v1/customers/cus_A/usage", headers={"Origin": PORTAL},
                       principal=PORTAL_TOKEN)  # fmt: skip
    assert "Access-Control-Allow-Origin" not in app.resolve(event, Context())["headers"]
    preflight = http_event("OPTIONS", "/v1/customers/cus_A/usage", headers={"Origin": PORTAL})
    assert app.resolve(preflight, Context())["statusCode"] == 404


def test_a_usage_read_for_a_malformed_customer_id_says_what_an_id_looks_like():
    app = read_api(included={"ai_messages": 1000}, store=InMemoryStore(), now=lambda: NOW)
    response = app.resolve(http_event("GET", "/v1/customers/cus_A!/usage"), Context())
    assert response["statusCode"] == 422
    assert response_json(response)["error"] == {
        "code": "validation_error",
        "message": "not a Stripe customer id",
        "details": [
            {
                "field": "stripe_customer_id",
                "message": "must be cus_ followed by letters and digits",
            }
        ],
    }


def test_the_api_clock_is_utc():
    assert utc_now().tzinfo is UTC


def test_repeated_keys_are_named_in_the_answer():
    error = post(raw_body='{"a": 1, "a": 2, "b": 3}')["error"]
    assert error["message"] == "the body is not valid JSON: duplicate keys: a"


@pytest.mark.parametrize(
    ("principal", "path", "message"),
    [
        (
            PORTAL_TOKEN,
            "/v1/customers/cus_B/usage",
            "a portal token reads its own customer's usage only",
        ),
    ],
)
def test_a_forbidden_caller_is_told_why(principal, path, message):
    app = read_api(included={"ai_messages": 1000}, store=InMemoryStore(), now=lambda: NOW)
    response = app.resolve(http_event("GET", path, principal=principal), Context())
    assert response["statusCode"] == 403
    assert response_json(response)["error"]["message"] == message


def test_an_error_no_handler_takes_reaches_the_caller_as_it_is():
    router = HttpRouter()

    @router.get("/boom")
    def boom():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        router.resolve(http_event("GET", "/boom"), Context())
