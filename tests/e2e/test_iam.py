"""Every AWS call each function really makes, compared with its role in template.yaml.

A stack of its own runs every function in its own Lambda runtime, signing with its own
credentials, behind IAM gates that enforce each role (devtools.iam), with both secrets in a local
Secrets Manager as deployed. A tour drives every route, replay, conflict, flush (decide, send,
confirm, release, quarantine, resume) and operator command through it. Then each function's
calls must all be allowed (a missing grant is a 500 deployed), and each grant in its role must
have been used (a grant nothing uses is a privilege nobody needs).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests
import stripe

from devtools.iam import Call, Role, Statement
from devtools.local_stack import LocalStack, StackOptions, function_credentials
from tests.clock import wait_out_month_end
from usage_meter import admin
from usage_meter.logic.quarantine import REPLAY_GUARD

pytestmark = pytest.mark.slow
OPERATOR = "OperatorPolicy"  # the operators' command signs as the managed policy's holder
FUNCTIONS = (
    "RecordFunction",
    "ReadFunction",
    "FlushFunction",
    "AuthorizerFunction",
    "StripeWebhookFunction",
)


@pytest.fixture(scope="module")
def iam_stack(sam_host_build: Path, secrets_manager_url: str) -> Iterator[LocalStack]:
    options = StackOptions(
        build_dir=sam_host_build,
        api_port=0,
        table_name="usage-iam-local",
        run_schedules=False,
        secrets_manager_url=secrets_manager_url,
        function_log=lambda function, line: None,
        log=lambda line: None,
    )
    with LocalStack(options) as running:
        yield running


def operator(stack: LocalStack, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """`make admin ARGS=...` as an operator holding OperatorPolicy, through the gate."""
    assert stack.backends is not None
    for name, value in function_credentials(OPERATOR).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", stack.backends.dynamodb_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return admin.main(["--table", stack.backends.table_name, *argv])


def backdate_quarantines(stack: LocalStack, seconds: int) -> None:
    """Move every quarantine's time back, writing to DynamoDB Local directly (not through a
    gate): the test's stand-in for waiting out the replay guard."""

    assert stack.backends is not None
    engine = boto3.client(
        "dynamodb",
        endpoint_url=stack.iam_gates[0].upstream.geturl(),
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    table = stack.backends.table_name
    markers = engine.query(
        TableName=table,
        KeyConditionExpression="pk = :q",
        ExpressionAttributeValues={":q": {"S": "QUARANTINE"}},
    )["Items"]
    assert markers
    for marker in markers:
        engine.update_item(
            TableName=table,
            Key={"pk": marker["counter_pk"], "sk": marker["counter_sk"]},
            UpdateExpression="SET quarantined_at = quarantined_at - :d",
            ExpressionAttributeValues={":d": {"N": str(seconds)}},
        )


def event(customer: str, quantity: int, key: str) -> dict:
    return {
        "stripe_customer_id": customer,
        "meter": "ai_messages",
        "quantity": quantity,
        "idempotency_key": key,
    }


def subscribe(stack: LocalStack, customer: str) -> None:
    """A monthly metered subscription in the Stripe stand-in; returns once its webhook was
    delivered and answered 200."""
    assert stack.stripe is not None
    fake = stack.stripe
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": fake.url})
    meter = next(
        (m for m in client.v1.billing.meters.list().data if m["event_name"] == "ai_messages"),
        None,
    ) or fake.add_meter("ai_messages")
    price = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 1,
            "product_data": {"name": "AI messages"},
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter["id"]},
        }
    )
    fake.add_customer(customer)
    delivered = len(fake.deliveries)
    client.v1.subscriptions.create(params={"customer": customer, "items": [{"price": price.id}]})
    deadline = time.monotonic() + 30
    while not [d for d in fake.deliveries[delivered:] if d.get("status") == 200]:
        assert time.monotonic() < deadline, fake.deliveries
        time.sleep(0.05)


@pytest.fixture(scope="module")
def toured(iam_stack: LocalStack) -> list[Call]:
    """Every path the functions have, once; the calls the gates saw."""
    stack = iam_stack
    wait_out_month_end(180)  # on calendar months: the tour reads back what it recorded
    # The module's other tests may run first (random order), their refused calls included
    before = [len(gate.calls) for gate in stack.iam_gates]
    assert stack.api_url is not None and stack.stripe is not None
    api, key = stack.api_url, {"Authorization": f"Bearer {stack.server_key}"}
    expected: list[tuple[str, str, int]] = []

    def send(method: str, path: str, status: int, body: object = None, **headers: str) -> dict:
        response = requests.request(
            method, f"{api}{path}", json=body, headers={**key, **headers}, timeout=30
        )
        expected.append((method, path, status))
        assert response.status_code == status, (method, path, response.text)
        return response.json() if response.content else {}

    # record: new, replay, conflict, header key, invalid; batch: new, replay, conflict
    send("POST", "/v1/events", 202, event("cus_IamA", 2, "iam-1"))
    send("POST", "/v1/events", 200, event("cus_IamA", 2, "iam-1"))
    send("POST", "/v1/events", 409, event("cus_IamA", 5, "iam-1"))
    send("POST", "/v1/events", 202, event("cus_IamA", 1, "iam-h"), **{"Idempotency-Key": "iam-h"})
    send("POST", "/v1/events", 422, {"stripe_customer_id": "cus_IamA"})
    batch = {"events": [event("cus_IamA", 1, "iam-b1"), event("cus_IamGone", 4, "iam-b2")]}
    send("POST", "/v1/events/batch", 202, batch)
    send("POST", "/v1/events/batch", 202, batch)
    send("POST", "/v1/events/batch", 409, {"events": [event("cus_IamA", 9, "iam-b1")]})
    # read: by key, portal token issued (secret from Secrets Manager), read by token, refused
    send("GET", "/v1/customers/cus_IamA/usage", 200)
    token = send("POST", "/v1/portal-tokens", 201, {"stripe_customer_id": "cus_IamA"})["token"]
    send("GET", "/v1/customers/cus_IamA/usage", 200, Authorization=f"Bearer {token}")
    send("GET", "/v1/customers/cus_IamB/usage", 403, Authorization=f"Bearer {token}")
    send("POST", "/v1/events", 401, event("cus_IamA", 1, "x"), Authorization="Bearer umk_x")
    send("POST", "/v1/events", 401, Authorization="Bearer umk_000000000000_" + "A" * 43)
    send("OPTIONS", "/v1/customers/cus_IamA/usage", 204, Origin="http://localhost:3000")
    # Stripe: an unsigned webhook is refused; a subscription's signed one (its secret from
    # Secrets Manager) stores cus_IamA's periods and cuts its calendar month's counter
    send("POST", "/v1/stripe/webhook", 400, {"id": "evt_x"})
    send("POST", "/v1/stripe/events", 400, {"id": "evt_x"})
    subscribe(stack, "cus_IamA")
    assert send("GET", "/v1/customers/cus_IamA/usage", 200)["period"]["source"] == (
        "stripe_subscription"
    )
    # flush: Stripe refuses cus_IamGone for good, and the answer to its quarantine (a
    # transaction: the counter's update and the marker's put) is lost; the SDK retries it with
    # the same ClientRequestToken, which the table applies once
    gate = stack.iam_gates[0]
    gate.fail("FlushFunction", "TransactWriteItems", applied=True)
    stack.stripe.reject_customer("cus_IamGone")
    [run] = stack.run_schedules()
    assert run.error is None, run
    assert (run.result["sent"], run.result["quarantined"]) == (1, 1), run
    # operators: status, keys, quarantine list; a replay right after the quarantine is refused
    with pytest.MonkeyPatch.context() as env:
        assert operator(stack, env, "status") == 0
        assert operator(stack, env, "keys", "create", "--name", "ops", "--scopes", "read") == 0
        assert operator(stack, env, "keys", "list") == 0
        assert operator(stack, env, "keys", "revoke", "000000000000") == 1
        assert operator(stack, env, "quarantine", "list") == 0
        env.setenv("STRIPE_API_KEY", "sk_test_local")
        env.setenv("STRIPE_API_BASE", stack.stripe.url)
        assert operator(stack, env, "stripe", "sync") == 0
        assert operator(stack, env, "quarantine", "replay", "--all") == 1
    # The guard's 15 minutes pass: the quarantine's time is moved back in the engine itself,
    # behind the gates, so no principal's calls change. Then the replay goes through.
    backdate_quarantines(stack, REPLAY_GUARD + 60)
    with pytest.MonkeyPatch.context() as env:
        assert operator(stack, env, "quarantine", "replay", "--all") == 0
    # the next run decides again, but the answer to that decision is lost: the SDK's retry
    # finds it written and the run leaves it; the run after resumes it, same identifier
    stack.stripe.accept_customer("cus_IamGone")
    gate.fail("FlushFunction", "UpdateItem", applied=True)
    [run] = stack.run_schedules()
    assert run.error is None and (run.result["counters_read"], run.result["sent"]) == (1, 0), run
    [run] = stack.run_schedules()
    assert run.error is None and (run.result["resumed"], run.result["sent"]) == (1, 1), run
    assert stack.stripe.totals()[("cus_IamGone", "ai_messages")] == 4
    [delivered] = [e for e in stack.stripe.accepted() if e.customer == "cus_IamGone"]
    assert delivered.identifier.endswith(".2")  # decision 1 was refused: a new identifier
    # Stripe accepts cus_IamGhost's usage, then rejects it: the event destination's
    # notification takes its units back into the quarantine
    stack.stripe.async_validation = True
    try:
        send("POST", "/v1/events", 202, event("cus_IamGhost", 3, "iam-g"))
        delivered_before = len(stack.stripe.deliveries)
        [run] = stack.run_schedules()
        assert run.error is None and run.result["sent"] == 1, run
        stack.stripe.flush_error_reports()  # the report is due at once: sent now, if not yet
        deadline = time.monotonic() + 30
        while not [d for d in stack.stripe.deliveries[delivered_before:] if d.get("status") == 200]:
            assert time.monotonic() < deadline, [
                (d["target"], d["status"], d["error"]) for d in stack.stripe.deliveries
            ]
            time.sleep(0.05)
    finally:
        stack.stripe.async_validation = False
    ghost = send("GET", "/v1/customers/cus_IamGhost/usage", 200)["meters"]
    assert [(m["quantity"], m["reported"]) for m in ghost if m["meter"] == "ai_messages"] == [
        (3, 0)
    ]
    # and the operator reconciles the periods that ended since yesterday
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STRIPE_API_KEY", "sk_test_local")
        env.setenv("STRIPE_API_BASE", stack.stripe.url)
        since = time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(time.time() - 86_400))
        assert operator(stack, env, "reconcile", "--since", since) == 0
    gates = zip(stack.iam_gates, before, strict=True)
    return [call for gate, seen in gates for call in gate.calls[seen:]]


def _roles(stack: LocalStack) -> dict[str, Role]:
    return stack.iam_gates[0].roles


def test_every_call_a_function_makes_is_granted_by_its_role(toured):
    # Given every call of the tour / Then none was refused: each would be a 500 deployed
    denied = sorted(
        {(c.principal, a.action, a.resource, a.leading_keys) for c in toured for a in c.denied}
    )
    assert denied == [], "missing grants:\n" + "\n".join(map(str, denied))


def test_every_function_and_the_operator_were_seen_calling(toured):
    callers = {c.principal for c in toured}
    assert callers >= {*FUNCTIONS, OPERATOR}, callers
    assert {c.service for c in toured} == {"dynamodb", "secretsmanager"}


def test_every_grant_is_used_by_a_call(iam_stack, toured):
    # Given each role's (action, resource) grants
    unused = []
    for name, role in _roles(iam_stack).items():
        used = [a for c in toured if c.principal == name for a in c.accesses]
        for action, resource in role.grants():
            probe = Statement((action,), (resource,))
            if not any(probe.allows(access) for access in used):
                unused.append((name, action, resource))
    # Then every one was needed by a real call: nothing is granted "just in case"
    assert unused == [], "grants nothing uses:\n" + "\n".join(map(str, unused))


def test_the_authorizer_reads_only_key_items(toured):
    reads = [a for c in toured if c.principal == "AuthorizerFunction" for a in c.accesses]
    keys = [k for a in reads if a.action == "dynamodb:GetItem" for k in a.leading_keys]
    assert keys and all(k.startswith("APIKEY#") for k in keys)


def test_a_missing_grant_answers_500_as_it_would_deployed(iam_stack):
    # Given the record function's role without BatchGetItem (as it was before this was found)
    stack = iam_stack
    gate = stack.iam_gates[0]
    role = gate.roles["RecordFunction"]
    stripped = tuple(
        Statement(tuple(a for a in s.actions if a != "dynamodb:BatchGetItem"), s.resources)
        for s in role.statements
    )
    gate.roles["RecordFunction"] = Role(role.name, stripped)
    try:
        body = event("cus_IamDenied", 1, "denied-1")
        headers = {"Authorization": f"Bearer {stack.server_key}"}
        url = f"{stack.api_url}/v1/events"
        # When an event is recorded and then replayed
        first = requests.post(url, json=body, headers=headers, timeout=30)
        replay = requests.post(url, json=body, headers=headers, timeout=30)
    finally:
        gate.roles["RecordFunction"] = role
    # Then both fail, as deployed: every record reads the customer's billing periods with
    # BatchGetItem before it writes, so nothing is stored
    assert first.status_code == 500 and replay.status_code == 500
    assert replay.json()["error"]["code"] == "internal_error"
    refused = [c for c in gate.calls if c.denied and c.principal == "RecordFunction"]
    assert refused and refused[-1].denied[0].action == "dynamodb:BatchGetItem"


def test_the_gate_refuses_with_awss_error(iam_stack):
    # Given a client signing as the authorizer, which may read only APIKEY# items
    stack = iam_stack
    assert stack.backends is not None
    client = boto3.client(
        "dynamodb",
        endpoint_url=stack.backends.dynamodb_url,
        region_name="us-east-1",
        **{k.lower(): v for k, v in function_credentials("AuthorizerFunction").items()},
    )
    table = stack.backends.table_name
    # When it reads an event item / Then AWS's AccessDeniedException names the action and key
    with pytest.raises(client.exceptions.ClientError) as refused:
        client.get_item(TableName=table, Key={"pk": {"S": "EVENT#x"}, "sk": {"S": "EVENT"}})
    error = refused.value.response["Error"]
    assert error["Code"] == "AccessDeniedException"
    assert "dynamodb:GetItem" in error["Message"] and table in error["Message"]
    # And an API key item is readable
    client.get_item(TableName=table, Key={"pk": {"S": "APIKEY#x"}, "sk": {"S": "APIKEY"}})


def test_the_tour_covered_every_route_of_the_template(iam_stack, toured):
    routes = {r.route_key for r in iam_stack.routes.routes}
    assert routes == {
        "POST /v1/events",
        "POST /v1/events/batch",
        "GET /v1/customers/{stripe_customer_id}/usage",
        "OPTIONS /v1/customers/{stripe_customer_id}/usage",
        "POST /v1/portal-tokens",
        "POST /v1/stripe/webhook",
        "POST /v1/stripe/events",
    }, "a new route needs its place in the tour above"
