"""The HTTP API (api.py) at the edges a client sees (issue 15, mutation testing): the
Idempotency-Key header, body size and decoding, each error's status, code, message and details,
the response envelope, stages, and CORS answers for portal origins."""

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from devtools.invoke import http_event, response_json
from tests.fakes import InMemoryStore
from usage_meter.api import MAX_BODY_BYTES, read_api, record_api
from usage_meter.errors import StoreUnavailable
from usage_meter.logic.quarantine import ReplayRefused
from usage_meter.logic.record import LateUsage
from usage_meter.logic.subscriptions import sync
from usage_meter.models.domain import ItemPeriods, SubscriptionRead
from usage_meter.observability import metrics

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
METERS = {"ai_messages": {"included": 1000}}
EVENT = {"stripe_customer_id": "cus_Q1w2E3r4", "meter": "ai_messages", "quantity": 1}
PORTAL = "https://portal.example.com"


class Context:
    function_name = "test"
    aws_request_id = "req-1"


@pytest.fixture
def store():
    return InMemoryStore()


def send(app, event):
    return app.resolve(event, Context())


def recorder(store, **kwargs):
    return record_api(meters=METERS, store=store, now=lambda: NOW, **kwargs)


def post(store, path, body=None, **kwargs):
    return send(recorder(store), http_event("POST", path, body, **kwargs))


def reader(store, **kwargs):
    return read_api(included={"ai_messages": 1000}, store=store, now=lambda: NOW, **kwargs)


def error_of(response):
    return response["statusCode"], response_json(response)["error"]


# -- the Idempotency-Key header --------------------------------------------------------------------


def test_a_batch_with_an_idempotency_key_header_is_422_naming_the_header(store):
    # Given a valid batch sent with an Idempotency-Key header
    # When it is posted
    response = post(
        store, "/v1/events/batch", {"events": [EVENT]}, headers={"Idempotency-Key": "k"}
    )
    # Then it is refused, the header named, and nothing stored
    status, error = error_of(response)
    assert (status, error["code"]) == (422, "validation_error")
    assert error["message"] == (
        "a batch takes an idempotency_key per event, not an Idempotency-Key header"
    )
    assert error["details"] == [
        {"field": "Idempotency-Key", "message": "not accepted on the batch route"}
    ]
    assert store.events == {}


def test_a_header_that_differs_from_the_body_key_is_told_which_field(store):
    response = post(
        store, "/v1/events", {**EVENT, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
    )
    status, error = error_of(response)
    assert (status, error["code"]) == (422, "validation_error")
    assert error["message"] == "the Idempotency-Key header and the body's idempotency_key differ"
    assert error["details"] == [
        {"field": "idempotency_key", "message": "differs from the Idempotency-Key header"}
    ]


def test_a_header_equal_to_the_body_key_is_accepted_and_keys_the_event(store):
    # Given an event sent with the same key in the header and the body
    first = post(
        store, "/v1/events", {**EVENT, "idempotency_key": "k"}, headers={"Idempotency-Key": "k"}
    )
    # When it is replayed with the body key only
    again = post(store, "/v1/events", {**EVENT, "idempotency_key": "k"})
    # Then the first was accepted and the second is its replay
    assert first["statusCode"] == 202
    assert (again["statusCode"], response_json(again)["id"]) == (200, response_json(first)["id"])


def test_the_header_is_found_whatever_its_case(store):
    # Given a local run that passes the header as the client spelled it
    event = http_event("POST", "/v1/events", EVENT)
    event["headers"]["Idempotency-Key"] = "k1"
    first = send(recorder(store), event)
    # When the same event is replayed with the key in the body
    again = post(store, "/v1/events", {**EVENT, "idempotency_key": "k1"})
    # Then it is the same event
    assert response_json(again) == {"id": response_json(first)["id"], "duplicate": True}


def test_a_header_with_a_body_that_is_not_an_object_is_422_not_a_fault(store):
    response = post(store, "/v1/events", [EVENT], headers={"Idempotency-Key": "k"})
    status, error = error_of(response)
    assert status == 422
    assert error["details"] == [
        {"field": "body", "message": "Input should be a JSON object", "type": "model_type"}
    ]


# -- the body: size, encoding, JSON ----------------------------------------------------------------


def padded(size: int, pad: str = "x") -> str:
    """A JSON body of exactly `size` bytes: the event plus an unknown `pad` field."""
    base = json.dumps({**EVENT, "pad": ""})
    count = (size - len(base.encode())) // len(pad.encode())
    return json.dumps({**EVENT, "pad": pad * count}, ensure_ascii=False)


def test_a_body_of_exactly_64_kib_is_read_not_refused_as_too_large(store):
    raw = padded(MAX_BODY_BYTES)
    assert len(raw.encode()) == MAX_BODY_BYTES
    status, error = error_of(post(store, "/v1/events", raw_body=raw))
    # read, and refused for its unknown field rather than its size
    assert (status, error["code"]) == (422, "validation_error")


def test_a_body_one_byte_over_64_kib_is_413_saying_the_limit(store):
    raw = padded(MAX_BODY_BYTES + 1)
    assert len(raw.encode()) == MAX_BODY_BYTES + 1
    status, error = error_of(post(store, "/v1/events", raw_body=raw))
    assert (status, error["code"]) == (413, "payload_too_large")
    assert error["message"] == "the body is larger than 65536 bytes"


def test_the_size_limit_counts_bytes_not_characters(store):
    # Given a body under 64 Ki characters but over 64 KiB in UTF-8
    raw = padded(MAX_BODY_BYTES + 2, pad="é")
    assert len(raw) < MAX_BODY_BYTES < len(raw.encode())
    # Then it is too large
    assert post(store, "/v1/events", raw_body=raw)["statusCode"] == 413


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"a": 1, "b": 2, "a": 3, "b": 4}', "the body is not valid JSON: duplicate keys: a, b"),
        ('{"quantity": Infinity}', "the body is not valid JSON: Infinity is not valid JSON"),
        ("[" * 30_000 + "]" * 30_000, "the body is not valid JSON: nested too deeply"),
    ],
    ids=["repeated keys", "infinity", "deep nesting"],
)
def test_an_unacceptable_json_body_is_400_saying_why(store, raw, message):
    status, error = error_of(post(store, "/v1/events", raw_body=raw))
    assert (status, error["code"], error["message"]) == (400, "invalid_json", message)
    assert store.events == {}


def test_an_empty_body_is_400_invalid_json(store):
    status, error = error_of(post(store, "/v1/events", raw_body=""))
    assert (status, error["code"]) == (400, "invalid_json")
    assert error["message"].startswith("the body is not valid JSON: ")


def test_a_base64_body_that_is_not_utf8_is_told_so(store):
    event = http_event("POST", "/v1/events", raw_body="")
    event.update(body=base64.b64encode(b"\xff\xfe{").decode(), isBase64Encoded=True)
    status, error = error_of(send(recorder(store), event))
    assert (status, error["code"], error["message"]) == (
        400,
        "invalid_json",
        "the body is not UTF-8 JSON",
    )


def test_a_body_that_is_not_base64_though_flagged_so_is_400(store):
    event = http_event("POST", "/v1/events", raw_body="")
    event.update(body="not*base64", isBase64Encoded=True)
    status, error = error_of(send(recorder(store), event))
    assert (status, error["code"]) == (400, "invalid_json")


# -- answers: envelope, errors ---------------------------------------------------------------------


def test_every_answer_has_api_gateways_envelope(store):
    response = post(store, "/v1/events", EVENT)
    assert response["isBase64Encoded"] is False and response["cookies"] == []
    assert response["headers"] == {"Content-Type": "application/json"}


def test_a_route_under_a_named_stage_is_found(store):
    # Given a request through a stage other than $default
    event = http_event("POST", "/v1/events", EVENT)
    event["rawPath"] = "/prod/v1/events"
    event["requestContext"]["stage"] = "prod"
    # Then the stage prefix is not part of the route
    assert send(recorder(store), event)["statusCode"] == 202


def test_an_unknown_route_names_no_route(store):
    status, error = error_of(post(store, "/v1/nothing", EVENT))
    assert (status, error) == (
        404,
        {"code": "not_found", "message": "no such route", "details": []},
    )


def test_a_method_not_routed_is_404(store):
    assert send(recorder(store), http_event("GET", "/v1/events"))["statusCode"] == 404


def test_a_fault_is_500_inviting_a_retry(store):
    def broken(*_):
        raise RuntimeError("boom")

    store.put_events = broken
    status, error = error_of(post(store, "/v1/events", EVENT))
    assert (status, error["message"]) == (500, "internal error; the request may be retried")


def test_a_table_that_refuses_the_write_is_503_and_retryable(store):
    def throttled(*_):
        raise StoreUnavailable("the table is busy; retry")

    store.put_events = throttled
    status, error = error_of(post(store, "/v1/events", EVENT))
    assert (status, error["code"]) == (503, "temporarily_unavailable")


def test_a_request_without_a_principal_is_told_no_caller(store):
    response = post(store, "/v1/events", EVENT, principal=None)
    status, error = error_of(response)
    assert (status, error["code"], error["message"]) == (
        401,
        "unauthorized",
        "no authenticated caller",
    )


def test_a_record_key_cannot_record_a_batch(store):
    reader_key = {"kind": "key", "id": "0123456789ab", "scopes": "read"}
    response = post(store, "/v1/events/batch", {"events": [EVENT]}, principal=reader_key)
    status, error = error_of(response)
    assert (status, error["code"]) == (403, "forbidden")
    assert store.events == {}


def test_a_batch_of_exactly_100_events_is_accepted(store):
    events = [{**EVENT, "idempotency_key": f"k{i}"} for i in range(100)]
    response = post(store, "/v1/events/batch", {"events": events})
    assert response["statusCode"] == 202 and len(response_json(response)["results"]) == 100


def test_an_empty_batch_is_422_naming_events(store):
    status, error = error_of(post(store, "/v1/events/batch", {"events": []}))
    assert status == 422 and [d["field"] for d in error["details"]] == ["events"]


def test_a_batch_answers_each_events_id_in_request_order(store):
    first = response_json(post(store, "/v1/events", {**EVENT, "idempotency_key": "b"}))
    events = [{**EVENT, "idempotency_key": k} for k in ("a", "b")]
    results = response_json(post(store, "/v1/events/batch", {"events": events}))["results"]
    assert results[1] == {"id": first["id"], "duplicate": True}
    assert results[0]["duplicate"] is False and results[0]["id"] != first["id"]


# -- late usage through the API --------------------------------------------------------------------

START = int(datetime(2026, 10, 13, 13, 37, 12, tzinfo=UTC).timestamp())
RENEWAL = int(datetime(2026, 11, 13, 13, 37, 12, tzinfo=UTC).timestamp())
AFTER_CLOSE = datetime(2026, 11, 13, 14, 22, 12, tzinfo=UTC)


def subscribed(store: InMemoryStore) -> InMemoryStore:
    item = ItemPeriods(
        item="si_1",
        meter="ai_messages",
        anchor=START,
        interval="month",
        periods=((START, RENEWAL),),
        renews=True,
    )
    read = SubscriptionRead(
        id="sub_1",
        customer=EVENT["stripe_customer_id"],
        status="active",
        read_at=1,
        start_date=START,
        ended_at=None,
        items=(item,),
    )
    sync(read, store, now=START)
    return store


LATE = {**EVENT, "timestamp": "2026-11-13T13:00:00Z"}


def test_late_usage_is_422_period_closed_by_default(store):
    app = record_api(meters=METERS, store=subscribed(store), now=lambda: AFTER_CLOSE)
    status, error = error_of(send(app, http_event("POST", "/v1/events", LATE)))
    assert (status, error["code"]) == (422, "period_closed")
    assert error["details"][0]["field"] == "timestamp"
    assert store.events == {}


def test_late_usage_is_accepted_when_the_api_bills_it_in_the_current_period(store):
    app = record_api(
        meters=METERS,
        store=subscribed(store),
        now=lambda: AFTER_CLOSE,
        late=LateUsage(policy="current_period"),
    )
    assert send(app, http_event("POST", "/v1/events", LATE))["statusCode"] == 202


def test_the_api_uses_the_clock_it_is_given_for_the_window(store):
    # Given an API whose clock is a day behind the event's own timestamp plus 5 minutes
    app = record_api(meters=METERS, store=store, now=lambda: NOW - timedelta(days=1))
    # Then an event stamped NOW is in the future for it
    response = send(
        app, http_event("POST", "/v1/events", {**EVENT, "timestamp": "2026-11-26T08:00:00Z"})
    )
    assert response["statusCode"] == 422


# -- the read function: customer ids, portal tokens, CORS ------------------------------------------


def test_a_malformed_customer_id_in_the_path_is_told_the_format(store):
    status, error = error_of(send(reader(store), http_event("GET", "/v1/customers/acct_1/usage")))
    assert (status, error["message"]) == (422, "not a Stripe customer id")
    assert error["details"] == [
        {"field": "stripe_customer_id", "message": "must be cus_ followed by letters and digits"}
    ]


def test_a_portal_principal_reads_its_own_customers_usage(store):
    portal = {
        "kind": "portal",
        "id": "cus_Q1w2E3r4",
        "scopes": "read",
        "customer": "cus_Q1w2E3r4",
        "expires_at": int(NOW.timestamp()) + 60,
    }
    event = http_event("GET", "/v1/customers/cus_Q1w2E3r4/usage", principal=portal)
    assert send(reader(store), event)["statusCode"] == 200


def test_a_portal_principal_cannot_mint_portal_tokens(store):
    portal = {
        "kind": "portal",
        "id": "cus_Q1w2E3r4",
        "scopes": "read",
        "customer": "cus_Q1w2E3r4",
        "expires_at": int(NOW.timestamp()) + 60,
    }
    body = {"stripe_customer_id": "cus_Q1w2E3r4"}
    app = reader(store, token_secret=lambda: b"s")
    response = send(app, http_event("POST", "/v1/portal-tokens", body, principal=portal))
    assert response["statusCode"] == 403


def test_a_portal_token_lives_an_hour_unless_asked_otherwise(store):
    app = reader(store, token_secret=lambda: b"s")
    body = {"stripe_customer_id": "cus_Q1w2E3r4"}
    response = send(app, http_event("POST", "/v1/portal-tokens", body))
    assert response["statusCode"] == 201
    assert response_json(response)["expires_at"] == "2026-11-26T09:00:00Z"


def test_portal_tokens_without_a_configured_secret_are_a_500(store):
    body = {"stripe_customer_id": "cus_Q1w2E3r4"}
    status, error = error_of(send(reader(store), http_event("POST", "/v1/portal-tokens", body)))
    assert (status, error["code"]) == (500, "internal_error")


def usage_from(origin_header: str, origins=(PORTAL,)):
    app = reader(InMemoryStore(), portal_origins=origins)
    event = http_event("GET", "/v1/customers/cus_Q1w2E3r4/usage", headers={"Origin": origin_header})
    return send(app, event)["headers"]


def test_a_portal_origin_gets_the_allowed_headers_and_a_ten_minute_max_age():
    headers = usage_from(PORTAL)
    assert headers["Access-Control-Allow-Origin"] == PORTAL
    assert headers["Access-Control-Allow-Headers"] == (
        "Authorization,Content-Type,X-Amz-Date,X-Amz-Security-Token,X-Api-Key"
    )
    assert headers["Access-Control-Max-Age"] == "600"


def test_an_origin_header_joined_with_commas_counts_by_its_first_value():
    assert usage_from(f"{PORTAL},https://evil.example")["Access-Control-Allow-Origin"] == PORTAL
    assert "Access-Control-Allow-Origin" not in usage_from(f"https://evil.example,{PORTAL}")


def test_a_wildcard_allows_any_origin_as_star():
    assert usage_from("https://any.example", origins=("*",))["Access-Control-Allow-Origin"] == "*"


def test_a_wildcard_answers_an_empty_origin_with_star_as_powertools_did():
    assert usage_from("", origins=("*",))["Access-Control-Allow-Origin"] == "*"


def test_without_portal_origins_no_cors_headers_are_sent(store):
    event = http_event("GET", "/v1/customers/cus_Q1w2E3r4/usage", headers={"Origin": PORTAL})
    assert send(reader(store), event)["headers"] == {"Content-Type": "application/json"}


def test_a_preflight_needs_no_credential_and_lists_only_the_read_functions_methods():
    app = reader(InMemoryStore(), portal_origins=(PORTAL,))
    preflight = http_event(
        "OPTIONS", "/v1/portal-tokens", principal=None, headers={"Origin": PORTAL}
    )
    response = send(app, preflight)
    assert response["statusCode"] == 204
    assert response["headers"]["Access-Control-Allow-Methods"] == "GET,OPTIONS,POST"
    assert response["headers"]["Access-Control-Allow-Origin"] == PORTAL


def test_a_domain_error_without_a_status_of_its_own_is_a_400_not_a_500(store):
    # Given a domain error that api.py maps to no particular status
    def refused(*_):
        raise ReplayRefused("not now", [{"field": "x", "message": "y"}])

    store.put_events = refused
    # When a request meets it, Then the client gets its code, message and details with a 400
    status, error = error_of(post(store, "/v1/events", EVENT))
    assert (status, error) == (
        400,
        {
            "code": "replay_refused",
            "message": "not now",
            "details": [{"field": "x", "message": "y"}],
        },
    )


def test_a_method_sent_in_lower_case_is_routed(store):
    # Given a local run whose event spells the method in lower case
    event = http_event("POST", "/v1/events", EVENT)
    event["requestContext"]["http"]["method"] = "post"
    # Then it reaches the route
    assert send(recorder(store), event)["statusCode"] == 202


def test_a_base64_flagged_request_without_a_body_is_400_not_a_fault(store):
    event = http_event("POST", "/v1/events")
    event.update(body=None, isBase64Encoded=True)
    status, error = error_of(send(recorder(store), event))
    assert (status, error["code"]) == (400, "invalid_json")


def test_a_wildcard_sends_no_cors_headers_to_a_request_without_an_origin(store):
    app = reader(store, portal_origins=("*",))
    headers = send(app, http_event("GET", "/v1/customers/cus_Q1w2E3r4/usage"))["headers"]
    assert headers == {"Content-Type": "application/json"}


@pytest.fixture
def published():
    """The metrics this test's requests add, as Powertools will publish them."""
    metrics.clear_metrics()
    yield metrics.metric_set
    metrics.clear_metrics()


def test_a_single_event_and_its_replay_are_each_counted_once(store, published):
    # Given a new keyed event
    post(store, "/v1/events", {**EVENT, "idempotency_key": "k"})
    # Then it is counted as accepted, not as a duplicate
    assert published["EventsAccepted"]["Value"] == [1.0]
    assert published["EventsDuplicate"]["Value"] == [0.0]
    # When it is replayed, Then the replay is counted as a duplicate
    published.clear()
    post(store, "/v1/events", {**EVENT, "idempotency_key": "k"})
    assert published["EventsAccepted"]["Value"] == [0.0]
    assert published["EventsDuplicate"]["Value"] == [1.0]


def test_an_event_without_a_stage_is_routed_as_the_default_stage(store):
    # Given a hand-written event (a local run) whose request context names no stage
    event = http_event("POST", "/v1/events", EVENT)
    del event["requestContext"]["stage"]
    # Then its path is the route's
    assert send(recorder(store), event)["statusCode"] == 202
