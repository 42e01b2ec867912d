"""The authorizer function on DynamoDB Local, the keys command, and logs free of secrets."""

import io
import json
import logging

import pytest

from devtools.invoke import LambdaContext, load_handler
from usage_meter import admin
from usage_meter.logic.auth import issue_portal_token
from usage_meter.observability import logger

SECRET = "integration-portal-secret"


@pytest.fixture
def authorizer(local_table, monkeypatch):
    monkeypatch.setenv("PORTAL_TOKEN_SECRET", SECRET)
    monkeypatch.setenv("METERS", '{"ai_messages": {}}')
    return load_handler("authorizer")


def request(authorization, route="POST /v1/events", customer=None):
    event = {"version": "2.0", "type": "REQUEST", "routeKey": route, "headers": {}}
    if authorization is not None:
        event["headers"]["authorization"] = authorization
    if customer:
        event["pathParameters"] = {"stripe_customer_id": customer}
    return event


def new_key(local_table, capsys, scopes="record") -> str:
    assert (
        admin.main(
            ["--table", local_table.name, "keys", "create", "--name", "app", "--scopes", scopes]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out)["key"]


def test_a_key_made_by_the_keys_command_is_authorized_with_its_scopes(
    local_table, authorizer, capsys
):
    key = new_key(local_table, capsys, "record,read")
    answer = authorizer.lambda_handler(request(f"Bearer {key}"), LambdaContext())
    assert answer["isAuthorized"] is True
    assert answer["context"]["kind"] == "key" and answer["context"]["scopes"] == "read record"


def anonymous(reason: str) -> dict:
    return {"isAuthorized": True, "context": {"kind": "anonymous", "reason": reason}}


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        ("Bearer umk_0123456789ab_" + "A" * 43, "unknown key"),
        ("Bearer umk_nope", "malformed key"),
        ("Basic dXNlcjpwYXNz", "send Authorization: Bearer <server key or portal token>"),
        ("Bearer upt_e30.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "portal token signature"),
    ],
)
def test_a_bad_credential_is_passed_on_as_anonymous_never_raised(authorizer, authorization, reason):
    # Given a credential that authenticates no one
    # When the authorizer runs (a raise would be a 500 on an HTTP API, and a Lambda error)
    answer = authorizer.lambda_handler(request(authorization), LambdaContext())
    # Then it lets the request on as anonymous, for the function's 401 with the reason
    assert answer["isAuthorized"] is True and answer["context"]["kind"] == "anonymous"
    assert answer["context"]["reason"].startswith(reason)


def test_the_answer_for_a_key_is_the_same_on_every_route(local_table, authorizer, capsys):
    # Given a read-only key: API Gateway caches one answer per Authorization header
    key = new_key(local_table, capsys, "read")
    # When it is asked on a route it may not use and on one it may
    on_record = authorizer.lambda_handler(request(f"Bearer {key}"), LambdaContext())
    on_usage = authorizer.lambda_handler(
        request(f"Bearer {key}", "GET /v1/customers/{stripe_customer_id}/usage", "cus_A"),
        LambdaContext(),
    )
    # Then both answers are the same identity: the function checks the scope per request
    assert on_record == on_usage and on_record["context"]["scopes"] == "read"


def test_a_revoked_key_is_refused(local_table, authorizer, capsys):
    key = new_key(local_table, capsys)
    key_id = key.split("_")[1]
    assert admin.main(["--table", local_table.name, "keys", "revoke", key_id]) == 0
    assert admin.main(["--table", local_table.name, "keys", "revoke", key_id]) == 1
    answer = authorizer.lambda_handler(request(f"Bearer {key}"), LambdaContext())
    assert answer == anonymous("revoked key")


def test_keys_list_shows_no_secret_or_hash(local_table, capsys):
    key = new_key(local_table, capsys)
    assert admin.main(["--table", local_table.name, "keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert key.split("_", 2)[2] not in listed and "secret_hash" not in listed
    assert json.loads(listed)["scopes"] == ["record"]


@pytest.fixture
def log_lines():
    """Every line the service's logger writes, formatted as in CloudWatch."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logger.registered_formatter)
    logger.addHandler(handler)
    yield stream
    logger.handlers.remove(handler)


def test_no_key_or_token_appears_in_the_logs(local_table, authorizer, capsys, log_lines):
    # Given a key, a token, and requests that succeed, are forbidden and are refused
    key = new_key(local_table, capsys)
    token, _ = issue_portal_token("cus_A", 600, secret=SECRET.encode(), now=10**10 - 10**9)
    authorizer.lambda_handler(request(f"Bearer {key}"), LambdaContext())
    authorizer.lambda_handler(
        request(f"Bearer {token}", "GET /v1/customers/{stripe_customer_id}/usage", "cus_B"),
        LambdaContext(),
    )
    authorizer.lambda_handler(request(f"Bearer {key}x"), LambdaContext())
    # When the logs are read / Then neither secret is in them
    logs = log_lines.getvalue() + "".join(capsys.readouterr())
    for secret in (key.split("_", 2)[2], token.split(".")[1], SECRET):
        assert secret not in logs
    # the logs are there, just free of secrets
    assert '"message":"authenticated"' in logs and '"message":"unauthenticated"' in logs


def test_the_flush_never_logs_the_stripe_key(local_table, monkeypatch, log_lines, capsys):
    # Given a Stripe key Stripe refuses, so its error message travels through the logs
    from devtools.fake_stripe import FakeStripe
    from devtools.invoke import http_event

    stripe_key = "rk_wrong_0123456789abcdefSECRET"
    monkeypatch.setenv("METERS", '{"ai_messages": {}}')
    monkeypatch.setenv("STRIPE_API_KEY", stripe_key)
    with FakeStripe() as stripe:
        monkeypatch.setenv("STRIPE_API_BASE", stripe.url)
        record = load_handler("record")
        body = {"stripe_customer_id": "cus_A", "meter": "ai_messages", "quantity": 1}
        assert (
            record.lambda_handler(http_event("POST", "/v1/events", body), LambdaContext())[
                "statusCode"
            ]
            == 202
        )
        # When the flush fails on it
        flush = load_handler("flush")
        with pytest.raises(flush.FlushIncomplete, match="Stripe refused the API key"):
            flush.lambda_handler({}, LambdaContext())
    # Then the key is nowhere in the logs
    logs = log_lines.getvalue() + "".join(capsys.readouterr())
    assert "Stripe refused the API key" in logs and stripe_key not in logs
