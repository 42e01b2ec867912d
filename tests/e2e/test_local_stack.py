"""The local stack `make dev` runs, driven over real HTTP: built functions in AWS's Runtime
Interface Emulator behind the template's routes, DynamoDB Local in memory, the Stripe stand-in.
The sample events run through the same runtime path `make invoke` uses."""

import json
import os
import time
from pathlib import Path

import boto3
import pytest
import requests

from devtools.local_lambda import child_pids
from devtools.local_stack import LOCAL_PORTAL_TOKEN_SECRET, LocalStack, StackOptions
from devtools.sam_app import function_for_event
from tests.clock import wait_out_month_end
from usage_meter.logic.auth import create_api_key, issue_portal_token
from usage_meter.models.auth import Scope
from usage_meter.store.dynamodb import DynamoStore

EVENTS = Path(__file__).resolve().parents[2] / "events"
pytestmark = pytest.mark.slow
# What the app sends: a server key, made by the stack for its run (admin scope).
http = requests.Session()


@pytest.fixture(scope="module", autouse=True)
def server_key(stack: LocalStack) -> None:
    http.headers["Authorization"] = f"Bearer {stack.server_key}"


@pytest.fixture
def api(stack: LocalStack) -> str:
    assert stack.api_url is not None
    return stack.api_url


def event(customer: str, quantity: int, key: str, meter: str = "ai_messages") -> dict:
    return {
        "stripe_customer_id": customer,
        "meter": meter,
        "quantity": quantity,
        "idempotency_key": key,
    }


def test_an_event_is_accepted_and_its_replay_is_a_duplicate(api):
    body = event("cus_LocalReplay", 3, "replay-1")

    first = http.post(f"{api}/v1/events", json=body, timeout=30)
    again = http.post(f"{api}/v1/events", json=body, timeout=30)

    assert first.status_code == 202 and first.json()["duplicate"] is False
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "duplicate": True}


def test_a_body_that_is_not_json_answers_400(api):
    response = http.post(
        f"{api}/v1/events", data="{oops", headers={"content-type": "application/json"}, timeout=30
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_an_invalid_event_answers_422_naming_the_field(api):
    response = http.post(f"{api}/v1/events", json=event("cus_LocalBad", 0, "bad"), timeout=30)

    assert response.status_code == 422
    assert [d["field"] for d in response.json()["error"]["details"]] == ["quantity"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("DELETE", "/v1/events")])
def test_an_unknown_route_answers_404_like_api_gateway(api, method, path):
    response = http.request(method, f"{api}{path}", timeout=30)

    assert response.status_code == 404
    assert response.json() == {"message": "Not Found"}


def test_a_binary_body_arrives_base64_encoded_and_is_decoded(api):
    raw = json.dumps(event("cus_LocalBinary", 1, "binary-1")).encode()

    response = http.post(
        f"{api}/v1/events",
        data=raw,
        headers={"content-type": "application/octet-stream"},
        timeout=30,
    )

    assert response.status_code == 202


def test_a_batch_is_accepted_with_results_in_request_order(api):
    events = [event("cus_LocalBatch", n, f"batch-{n}") for n in (1, 2, 3)]

    response = http.post(f"{api}/v1/events/batch", json={"events": events}, timeout=30)
    replay = http.post(f"{api}/v1/events", json=events[1], timeout=30)

    assert response.status_code == 202
    results = response.json()["results"]
    assert [r["duplicate"] for r in results] == [False, False, False]
    assert replay.json()["id"] == results[1]["id"]


def test_a_flush_reports_to_the_stand_in_and_the_usage_shows_it(api, stack):
    # The functions stamp and read on their own clock: recorded and read in one month
    wait_out_month_end(60)
    # Given usage recorded over HTTP, one event alone and two in a batch
    customer = "cus_LocalFlush"
    one = event(customer, 5, "flush-1")
    batch = [event(customer, 7, "flush-2"), event(customer, 40, "flush-3", meter="api_calls")]
    assert http.post(f"{api}/v1/events", json=one, timeout=30).status_code == 202
    sent = http.post(f"{api}/v1/events/batch", json={"events": batch}, timeout=30)
    assert sent.status_code == 202

    # When the flush runs now
    flushed = http.post(f"{api}/_local/flush", timeout=330)

    # Then Stripe received the totals and the portal's usage shows them reported
    assert flushed.status_code == 200
    assert flushed.json()["FlushFunction"]["errors"] == []
    assert stack.stripe is not None
    totals = stack.stripe.totals()
    assert totals[(customer, "ai_messages")] == 12 and totals[(customer, "api_calls")] == 40
    usage = http.get(f"{api}/v1/customers/{customer}/usage", timeout=30)
    assert usage.status_code == 200
    meters = {m["meter"]: m for m in usage.json()["meters"]}
    assert (meters["ai_messages"]["quantity"], meters["ai_messages"]["reported"]) == (12, 12)
    assert (meters["api_calls"]["reported"], meters["api_calls"]["pending"]) == (40, 0)


SAMPLE_RESULTS = {
    "record-event.json": 202,
    "record-batch.json": 202,
    "read-usage.json": 200,
    "issue-portal-token.json": 201,
    # Signed with the local secret long ago: past Stripe's 300 s tolerance, so refused.
    "stripe-webhook.json": 400,
    "stripe-event-notification.json": 400,
}


@pytest.mark.parametrize("sample", sorted(p.name for p in EVENTS.glob("*.json")))
def test_every_sample_event_runs_in_its_function_like_make_invoke(stack, sample):
    payload = json.loads((EVENTS / sample).read_text())
    function = function_for_event(payload, stack.routes, stack.schedules)

    result = stack.invoke(function, payload)

    if sample in SAMPLE_RESULTS:
        assert result["statusCode"] == SAMPLE_RESULTS[sample], result
    else:
        assert function == "FlushFunction" and result["errors"] == []


def _alive(pid: int) -> bool:
    """Running, not merely an unreaped zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_stopping_a_stack_leaves_no_emulator_or_runtime_running(stack, sam_host_build):
    # Given a second stack on the first one's DynamoDB and Stripe, its runtime warmed up
    options = StackOptions(
        build_dir=sam_host_build,
        api_port=0,
        functions=["ReadFunction", "AuthorizerFunction"],
        attach=stack.backends,
        run_schedules=False,
        function_log=lambda function, line: None,
        log=lambda line: None,
    )
    second = LocalStack(options).start()
    try:
        answer = http.get(f"{second.api_url}/v1/customers/cus_LocalStop/usage", timeout=30)
        assert answer.status_code == 200
        [runtime] = second.pools["ReadFunction"].runtimes
        assert runtime.pid is not None
        pids = [runtime.pid, *child_pids(runtime.pid)]
        assert len(pids) == 2  # the emulator and the Python runtime it started
    finally:
        # When it stops
        second.stop()

    # Then neither process is left
    assert [pid for pid in pids if _alive(pid)] == []


# -- who may call what (through the template's authorizer, in its own runtime) ------------------

ROUTES = [
    ("POST", "/v1/events"),
    ("POST", "/v1/events/batch"),
    ("GET", "/v1/customers/cus_AuthA/usage"),
    ("POST", "/v1/portal-tokens"),
]
BAD_CREDENTIALS = [
    None,
    "Bearer",
    "Basic dXNlcjpwYXNz",
    "Bearer umk_000000000000_" + "x" * 43,  # well-formed, unknown
    "Bearer upt_eyJzdWIiOiJjdXNfQXV0aEEiLCJleHAiOjk5OTk5OTk5OTl9." + "A" * 43,  # forged
    "Bearer 🔑\u202e".encode(),  # raw UTF-8 bytes: odd unicode on the wire
]


def keys(stack: LocalStack) -> DynamoStore:
    assert stack.backends is not None
    client = boto3.client(
        "dynamodb",
        endpoint_url=stack.backends.dynamodb_url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    return DynamoStore(stack.backends.table_name, client=client)


def call(
    api: str, method: str, path: str, authorization: str | bytes | None, body: object = None
) -> requests.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return requests.request(method, f"{api}{path}", json=body or {}, headers=headers, timeout=30)


@pytest.mark.parametrize("authorization", BAD_CREDENTIALS)
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_refuses_a_missing_malformed_or_unknown_credential(
    api, method, path, authorization
):
    response = call(api, method, path, authorization)
    assert response.status_code == 401, response.text
    if authorization is None:  # refused by API Gateway itself: the identity source is missing
        assert response.json() == {"message": "Unauthorized"}
    else:  # let through as anonymous by the authorizer, refused by the function
        assert response.json()["error"]["code"] == "unauthorized"


def test_a_refused_customer_does_not_lock_a_portal_token_out_of_its_own(api):
    # Given a portal token for customer A, and API Gateway's cache of one authorizer answer per
    # Authorization header for 300 s
    issued = http.post(
        f"{api}/v1/portal-tokens",
        json={"stripe_customer_id": "cus_CacheA", "ttl_seconds": 600},
        timeout=30,
    )
    token = f"Bearer {issued.json()['token']}"
    # When its first request is for another customer's usage
    refused = call(api, "GET", "/v1/customers/cus_CacheB/usage", token)
    # Then that one is forbidden, and the token still reads its own customer right after
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert call(api, "GET", "/v1/customers/cus_CacheA/usage", token).status_code == 200


def test_a_portal_token_reads_its_own_customer_and_nothing_else(api):
    # Given a portal token for customer A, issued with the server key
    issued = http.post(
        f"{api}/v1/portal-tokens",
        json={"stripe_customer_id": "cus_AuthA", "ttl_seconds": 600},
        timeout=30,
    )
    assert issued.status_code == 201, issued.text
    token = f"Bearer {issued.json()['token']}"
    # Then it reads A, and is refused B and every other route
    assert call(api, "GET", "/v1/customers/cus_AuthA/usage", token).status_code == 200
    assert call(api, "GET", "/v1/customers/cus_AuthB/usage", token).status_code == 403
    for method, path in ROUTES:
        if method != "GET":
            assert call(api, method, path, token).status_code == 403


def test_an_expired_portal_token_is_refused(api):
    token, _ = issue_portal_token(
        "cus_AuthA", 60, secret=LOCAL_PORTAL_TOKEN_SECRET.encode(), now=int(time.time()) - 3600
    )
    assert call(api, "GET", "/v1/customers/cus_AuthA/usage", f"Bearer {token}").status_code == 401


def test_a_key_without_the_scope_is_forbidden_and_a_revoked_key_is_unknown(api, stack):
    store = keys(stack)
    reader, _ = create_api_key("portal backend", {Scope.READ}, keys=store, now=int(time.time()))
    recorder, recorder_key = create_api_key("app", {Scope.RECORD}, keys=store, now=int(time.time()))
    body = event("cus_AuthA", 1, "scoped")

    def record_with(key: str) -> int:
        return call(api, "POST", "/v1/events", f"Bearer {key}", body).status_code

    assert record_with(reader) == 403
    assert record_with(recorder) == 202
    store.revoke_api_key(recorder_key.key_id, int(time.time()))
    # A revoked key works until API Gateway's cached answer for it expires, as on AWS (200: the
    # same event again, answered as a replay)
    assert record_with(recorder) == 200
    assert stack.api is not None
    stack.api.authorizer_cache.expire()
    assert record_with(recorder) == 401
