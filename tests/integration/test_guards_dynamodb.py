"""Guards on DynamoDB Local that only show when AWS answers what DynamoDB Local never does
(issue 15): each answer is injected on the store's client, as AWS's own HTTP response, with
botocore's event hooks.
- a throttled table answers 503 on the record, batch and read routes, and stores nothing;
- BatchGetItem's UnprocessedKeys are read again, so every item comes back;
- a restricted Stripe key (403) stops the flush run with nothing confirmed.
"""

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import botocore.session
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, http_event, load_handler
from usage_meter.api import read_api, record_api
from usage_meter.errors import StoreUnavailable
from usage_meter.logic.flush import FlushPolicy
from usage_meter.logic.record import record_events
from usage_meter.models.domain import CustomerBilling
from usage_meter.models.input import EventIn
from usage_meter.store import dynamodb
from usage_meter.store.dynamodb import DynamoStore

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)  # fixed: nothing here depends on the wall clock
METERS = {"ai_messages": {"included": 10}}
EVENT = {"stripe_customer_id": "cus_A1", "meter": "ai_messages", "quantity": 1}


class _Body:
    """The raw body botocore reads an HTTP answer from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any):
        yield self._data


def aws_error(request: Any, body: dict[str, Any]) -> AWSResponse:
    """DynamoDB's HTTP 400 answer with `body`, as AWS sends it."""
    headers = {"Content-Type": "application/x-amz-json-1.0"}
    return AWSResponse(request.url, 400, headers, _Body(json.dumps(body).encode()))


def client_of(local_table) -> Any:
    """A DynamoDB client as the functions make one, with a single attempt: what surfaces after
    botocore's retries is the same error, without waiting out their backoff."""
    return botocore.session.get_session().create_client(
        "dynamodb",
        endpoint_url=local_table.endpoint_url,
        config=Config(retries={"mode": "standard", "max_attempts": 1}),
    )


def stored(local_table) -> list[dict[str, Any]]:
    return local_table.client.scan(TableName=local_table.name)["Items"]


# -- a throttled table ---------------------------------------------------------------------------

# What DynamoDB answers a throttled request (HTTP 400), by error code.
THROTTLED = {
    "ProvisionedThroughputExceededException": {
        "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
        "message": "The level of configured provisioned throughput for the table was exceeded. "
        "Consider increasing your provisioning level with the UpdateTable API.",
    },
    "ThrottlingException": {
        "__type": "com.amazon.coral.availability#ThrottlingException",
        "message": "Rate of requests exceeds the allowed throughput.",
    },
    "RequestLimitExceeded": {
        "__type": "com.amazonaws.dynamodb.v20120810#RequestLimitExceeded",
        "message": "Throughput exceeds the current throughput limit for your account. Please "
        "contact AWS Support at https://aws.amazon.com/support request a limit increase",
    },
}


def cancelled_by_throttling(request: Any) -> AWSResponse:
    """A transaction DynamoDB cancelled because an index or item was throttled."""
    writes = json.loads(request.body)["TransactItems"]
    reasons = [{"Code": "None"} for _ in writes]
    reasons[-1] = {
        "Code": "ThrottlingError",
        "Message": "Throughput exceeds the current capacity for one or more global secondary "
        "indexes. DynamoDB is automatically scaling your index so please try again shortly.",
    }
    codes = ", ".join(r["Code"] for r in reasons)
    body = {
        "__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
        "CancellationReasons": reasons,
        "Message": f"Transaction cancelled, please refer cancellation reasons for specific "
        f"reasons [{codes}]",
    }
    return aws_error(request, body)


def throttle(client: Any, error: str) -> None:
    """Every request the client sends to the table gets `error` (a transaction-cancelled one:
    every TransactWriteItems)."""

    def answer(request: Any, **_: Any) -> AWSResponse:
        if error == "TransactionCanceledException":
            return cancelled_by_throttling(request)
        return aws_error(request, THROTTLED[error])

    operation = ".TransactWriteItems" if error == "TransactionCanceledException" else ""
    client.meta.events.register(f"before-send.dynamodb{operation}", answer)


def call(route: str, store: DynamoStore) -> dict[str, Any]:
    if route == "read":
        app = read_api(included={"ai_messages": 10}, store=store)
        return app.resolve(http_event("GET", "/v1/customers/cus_A1/usage"), LambdaContext())
    app = record_api(meters=METERS, store=store)
    if route == "batch":
        events = [{**EVENT, "idempotency_key": f"k{i}"} for i in range(3)]
        event = http_event("POST", "/v1/events/batch", {"events": events})
        return app.resolve(event, LambdaContext())
    return app.resolve(http_event("POST", "/v1/events", EVENT), LambdaContext())


CASES = [
    *(pytest.param(route, "TransactionCanceledException") for route in ("record", "batch")),
    *(pytest.param(route, error) for route in ("record", "batch", "read") for error in THROTTLED),
]


@pytest.mark.parametrize(("route", "error"), CASES)
def test_a_throttled_table_answers_503_and_stores_nothing(local_table, monkeypatch, route, error):
    # Given a table that throttles every request, and a short retry budget
    monkeypatch.setattr(dynamodb, "WRITE_BUDGET_SECONDS", 0.2)
    client = client_of(local_table)
    throttle(client, error)
    store = DynamoStore(local_table.name, client=client)
    # When the route is called
    response = call(route, store)
    # Then it answers the documented 503, retryable, in the API's error format
    assert response["statusCode"] == 503
    assert response["headers"]["Content-Type"] == "application/json"
    body = json.loads(response["body"])
    assert body == {
        "error": {
            "code": "temporarily_unavailable",
            "message": "the usage table is busy; retry the request",
            "details": [],
        }
    }
    # and nothing was stored, so the client's retry is safe
    assert stored(local_table) == []


# -- BatchGetItem's unprocessed keys -------------------------------------------------------------


def half(asked: int) -> int:
    return asked // 2


def one(asked: int) -> int:
    return 1


def unprocessed_keys(client: Any, table: str, read: Callable[[int], int]) -> list[int]:
    """From now on a BatchGetItem of several keys reads only `read(keys asked)` of them and
    answers the rest as UnprocessedKeys, in RequestItems' own format, as DynamoDB does under
    load (a read of one key is served). Returns how many keys each call asked for."""
    asked: list[int] = []
    left: list[dict[str, Any]] = []

    def read_some(params: dict[str, Any], **_: Any) -> None:
        request = params["RequestItems"][table]
        keys = request["Keys"]
        asked.append(len(keys))
        served = len(keys) if len(keys) == 1 else read(len(keys))
        left.append({**request, "Keys": keys[served:]})
        params["RequestItems"] = {table: {**request, "Keys": keys[:served]}}

    def answer_the_rest(parsed: dict[str, Any], **_: Any) -> None:
        rest = left.pop()
        parsed["UnprocessedKeys"] = {table: rest} if rest["Keys"] else {}

    client.meta.events.register("before-parameter-build.dynamodb.BatchGetItem", read_some)
    client.meta.events.register("after-call.dynamodb.BatchGetItem", answer_the_rest)
    return asked


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


@pytest.fixture
def db(local_table) -> Any:
    return client_of(local_table)


@pytest.fixture
def store(local_table, db) -> DynamoStore:
    return DynamoStore(local_table.name, client=db, rng=NoJitter())


def record(store: DynamoStore, customers: list[str]) -> list[str]:
    events = [
        EventIn(stripe_customer_id=c, meter="m", quantity=1, idempotency_key=f"k-{c}")
        for c in customers
    ]
    return [r.id for r in record_events(events, meters={"m"}, store=store, now=NOW, batch=True)]


CUSTOMERS = [f"cus_U{i}" for i in range(6)]


def test_a_replay_check_reads_again_the_keys_batch_get_item_left_unprocessed(
    store, db, local_table
):
    # Given six keyed events, and BatchGetItem reading half of the keys it is asked for
    ids = record(store, CUSTOMERS)
    asked = unprocessed_keys(db, local_table.name, half)
    # When a batch checks which of them were stored before
    found = store.fingerprints(ids)
    # Then it asked again for what was left each time, and found all six
    assert asked == [6, 3, 2, 1] and sorted(found) == sorted(ids)


def test_billing_periods_are_read_again_when_batch_get_item_left_them_unprocessed(
    store, db, local_table
):
    # Given four customers with known billing periods
    for customer in CUSTOMERS[:4]:
        assert store.save_billing(CustomerBilling(customer=customer), expected_version=0)
    asked = unprocessed_keys(db, local_table.name, half)
    # When a read looks them up / Then each one's saved item answers, none the empty default
    found = store.customer_billings(CUSTOMERS[:4])
    assert [found[c].version for c in CUSTOMERS[:4]] == [1, 1, 1, 1] and asked == [4, 2, 1]


def test_the_backlog_reads_again_the_keys_batch_get_item_left_unprocessed(store, db, local_table):
    # Given 40 counters in the backlog (several in some index shards), and BatchGetItem reading
    # half of the keys it is asked for
    customers = [f"cus_B{i}" for i in range(40)]
    record(store, customers)
    asked = unprocessed_keys(db, local_table.name, half)
    # When the flush reads the backlog
    counters = [c for page in store.backlog() for c in page]
    # Then every counter came back, once, after reads that left keys unprocessed
    assert sorted(c.customer for c in counters) == sorted(customers)
    assert any(n > 1 for n in asked)


def test_keys_still_unprocessed_after_ten_reads_are_a_503_not_a_partial_answer(
    store, db, local_table
):
    # Given twenty keyed events, and a table that reads one key per BatchGetItem
    ids = record(store, [f"cus_S{i}" for i in range(20)])
    asked = unprocessed_keys(db, local_table.name, one)
    # When a batch checks which were stored / Then after ten reads the store gives up with the
    # retryable error, rather than answer that ten of them were never stored
    with pytest.raises(StoreUnavailable):
        store.fingerprints(ids)
    assert asked == list(range(20, 10, -1))


# -- a restricted Stripe key stops the flush -----------------------------------------------------


def test_a_restricted_stripe_key_stops_the_flush_run_with_nothing_confirmed(
    local_table, monkeypatch, store
):
    # Given three (customer, meter) pairs to report, and a restricted key without the
    # meter-event permission, which the fake Stripe refuses with Stripe's 403
    record(store, CUSTOMERS[:3])
    fake = FakeStripe().start()
    key = "rk_test_51GuardsRestrictedKey0123456789"
    fake.restrict_api_key(key, {"billing_meter_read", "subscription_read"})
    monkeypatch.setenv("METERS", '{"m": {}}')
    monkeypatch.setenv("STRIPE_API_KEY", key)
    monkeypatch.setenv("STRIPE_API_BASE", fake.url)
    flush = load_handler("flush")
    # one pair at a time, so "no further sends" is exact
    monkeypatch.setattr(flush, "policy", FlushPolicy(reserve_seconds=60, parallel_pairs=1))
    # When the scheduled flush runs
    try:
        with pytest.raises(flush.FlushIncomplete, match="Stripe refused the API key"):
            flush.lambda_handler({}, LambdaContext())
    finally:
        fake.stop()
    # Then the first refusal stopped the run: one call, no other pair sent, nothing billed
    assert fake.calls == 1
    assert fake.accepted() == []
    # and nothing was confirmed or quarantined: every counter waits in the backlog, the one
    # sent with its decision still in flight for the next run
    counters = [c for page in store.backlog() for c in page]
    assert sorted(c.customer for c in counters) == CUSTOMERS[:3]
    assert [(c.reported, c.quarantined) for c in counters] == [(0, 0)] * 3
    assert sum(c.sending is not None for c in counters) == 1
    assert store.quarantined() == []
