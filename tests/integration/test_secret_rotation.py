"""Rotating secrets in a loopback Secrets Manager while the functions stay warm (issue 8).

The functions are loaded in-process as at a cold start and read their secrets over HTTP, as
deployed; each test moves the clock of a function's secret cache instead of waiting.
"""

import time
import uuid
from types import ModuleType

import pytest

from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, http_event, load_handler, response_json
from usage_meter.logic.auth import MAX_TOKEN_TTL, issue_portal_token, verify_portal_token
from usage_meter.secrets import CURRENT, PREVIOUS, SIGNING_DELAY, SecretsManagerFetch

USAGE_ROUTE = "GET /v1/customers/{stripe_customer_id}/usage"
MAX_AGE = 120


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def warm(function: str, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> ModuleType:
    """functions/<function>/app.py loaded as at a cold start, its secret cache on `clock`."""
    module = load_handler(function)
    monkeypatch.setattr(module.secrets.cache, "clock", clock)
    return module


def created(secrets_manager, secret_id: str) -> float:
    """When Secrets Manager says the secret's current version was made (its own clock)."""
    return secrets_manager.get_secret_value(SecretId=secret_id)["CreatedDate"].timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture
def env(local_table, secrets_manager, monkeypatch):
    monkeypatch.setenv("METERS", '{"ai_messages": {}}')
    monkeypatch.setenv("SECRETS_MAX_AGE_SECONDS", str(MAX_AGE))
    monkeypatch.delenv("PORTAL_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    return secrets_manager


# -- the Stripe key ---------------------------------------------------------------------------

OLD_KEY, NEW_KEY = "sk_test_old0123456789abcdef", "sk_test_new0123456789abcdef"


@pytest.fixture
def stripe(env, monkeypatch):
    name = f"usage-meter/stripe-{uuid.uuid4().hex[:8]}"
    env.create_secret(Name=name, SecretString=OLD_KEY)
    monkeypatch.setenv("STRIPE_API_KEY_SECRET", name)
    with FakeStripe() as fake:
        monkeypatch.setenv("STRIPE_API_BASE", fake.url)
        yield fake, name


def record(customer: str) -> None:
    body = {"stripe_customer_id": customer, "meter": "ai_messages", "quantity": 1}
    answer = load_handler("record").lambda_handler(
        http_event("POST", "/v1/events", body), LambdaContext()
    )
    assert answer["statusCode"] == 202


def test_a_warm_flush_uses_a_rotated_stripe_key_once_max_age_has_passed(
    stripe, env, monkeypatch, clock
):
    # Given a warm flush that reported with the old key
    fake, name = stripe
    flush = warm("flush", monkeypatch, clock)
    record("cus_A")
    assert flush.lambda_handler({}, LambdaContext())["units_reported"] == 1
    # When the key is rotated (and the old one expires), and max_age passes
    env.put_secret_value(SecretId=name, SecretString=NEW_KEY)
    fake.expire_api_key(OLD_KEY)
    clock.advance(MAX_AGE)
    record("cus_B")
    summary = flush.lambda_handler({}, LambdaContext())
    # Then the same container reports with the new key, without a failed run
    assert summary["units_reported"] == 1 and summary["errors"] == []
    assert {event.customer for event in fake.accepted()} == {"cus_A", "cus_B"}


def test_a_flush_whose_key_stripe_refuses_fetches_the_key_again_for_the_next_run(
    stripe, env, monkeypatch, clock
):
    # Given a warm flush, and its key rotated and expired at once (a leaked key) within max_age
    fake, name = stripe
    flush = warm("flush", monkeypatch, clock)
    record("cus_A")
    flush.lambda_handler({}, LambdaContext())
    env.put_secret_value(SecretId=name, SecretString=NEW_KEY)
    fake.expire_api_key(OLD_KEY)
    record("cus_B")
    # When a run meets Stripe's 401
    with pytest.raises(flush.FlushIncomplete, match="Stripe refused the API key"):
        flush.lambda_handler({}, LambdaContext())
    # Then the next run, still within max_age, fetches the new key and reports
    summary = flush.lambda_handler({}, LambdaContext())
    assert summary["units_reported"] == 1 and summary["errors"] == []


def test_warm_runs_share_one_stripe_client_until_the_key_changes(stripe, env, monkeypatch, clock):
    # Given a warm flush's Stripe client
    _, name = stripe
    flush = warm("flush", monkeypatch, clock)
    first = flush.billing()
    # When it is asked for again, then after a rotation and max_age
    again = flush.billing()
    env.put_secret_value(SecretId=name, SecretString=NEW_KEY)
    clock.advance(MAX_AGE)
    rotated = flush.billing()
    # Then the same client serves until the key changes, and a new one after
    assert again is first and rotated is not first


# -- the portal token secret ------------------------------------------------------------------


@pytest.fixture
def portal_secret(env, monkeypatch) -> str:
    arn = env.create_secret(
        Name=f"usage-meter/portal-{uuid.uuid4().hex[:8]}", SecretString="portal-secret-v1"
    )["ARN"]
    monkeypatch.setenv("PORTAL_TOKEN_SECRET_NAME", arn)
    return arn


def authorize(authorizer: ModuleType, token: str) -> dict:
    event = {
        "version": "2.0",
        "type": "REQUEST",
        "routeKey": USAGE_ROUTE,
        "headers": {"authorization": f"Bearer {token}"},
    }
    return authorizer.lambda_handler(event, LambdaContext())["context"]


def token_signed_with(secret: str, customer: str = "cus_A") -> str:
    token, _ = issue_portal_token(customer, 600, secret=secret.encode(), now=int(time.time()))
    return token


def test_a_warm_authorizer_accepts_a_token_signed_with_a_just_rotated_secret(
    portal_secret, env, monkeypatch, clock
):
    # Given a warm authorizer that fetched the portal secret before a rotation
    authorizer = warm("authorizer", monkeypatch, clock)
    assert authorize(authorizer, token_signed_with("portal-secret-v1"))["kind"] == "portal"
    env.put_secret_value(SecretId=portal_secret, SecretString="portal-secret-v2")
    # When a read function started after the rotation issues a token, as soon as it signs
    # with the new secret (well within the authorizer's max_age)
    clock.now = created(env, portal_secret) + SIGNING_DELAY
    read = warm("read", monkeypatch, clock)
    body = {"stripe_customer_id": "cus_B", "ttl_seconds": 600}
    issued = response_json(
        read.lambda_handler(http_event("POST", "/v1/portal-tokens", body), LambdaContext())
    )["token"]
    assert verify_portal_token(issued, [b"portal-secret-v2"], int(time.time()))
    # Then the warm authorizer accepts it at once, instead of a refusal API Gateway caches
    context = authorize(authorizer, issued)
    assert context["kind"] == "portal" and context["customer"] == "cus_B"


def test_a_token_signed_with_the_previous_portal_secret_still_authenticates(
    portal_secret, env, monkeypatch, clock
):
    # Given a token signed before a rotation
    token = token_signed_with("portal-secret-v1")
    env.put_secret_value(SecretId=portal_secret, SecretString="portal-secret-v2")
    # When an authorizer started after the rotation checks it
    authorizer = warm("authorizer", monkeypatch, clock)
    context = authorize(authorizer, token)
    # Then it is accepted until it expires
    assert context["kind"] == "portal" and context["customer"] == "cus_A"


def test_the_previous_portal_secret_stops_working_a_day_after_the_rotation(
    portal_secret, env, monkeypatch, clock
):
    # Given a warm authorizer that fetched the portal secret before a rotation
    authorizer = warm("authorizer", monkeypatch, clock)
    assert authorize(authorizer, token_signed_with("portal-secret-v1"))["kind"] == "portal"
    env.put_secret_value(SecretId=portal_secret, SecretString="portal-secret-v2")
    # When the new version is older than the longest token life plus max_age and the margin
    clock.now = created(env, portal_secret) + MAX_TOKEN_TTL + MAX_AGE + 300
    # Then a fresh token signed with the previous secret (it leaked) is refused
    context = authorize(authorizer, token_signed_with("portal-secret-v1"))
    assert context == {"kind": "anonymous", "reason": "portal token signature does not match"}
    assert authorize(authorizer, token_signed_with("portal-secret-v2"))["kind"] == "portal"


# -- the adapter ------------------------------------------------------------------------------


def test_secrets_manager_answers_the_current_and_previous_versions(portal_secret, env):
    # Given a secret rotated once
    fetch = SecretsManagerFetch()
    before = fetch(portal_secret, PREVIOUS)
    env.put_secret_value(SecretId=portal_secret, SecretString="portal-secret-v2")
    # When both stages are fetched / Then each has its value and Secrets Manager's date
    current, previous = fetch(portal_secret, CURRENT), fetch(portal_secret, PREVIOUS)
    assert before is None
    assert current is not None and current.value == "portal-secret-v2"
    assert previous is not None and previous.value == "portal-secret-v1"
    assert current.created == created(env, portal_secret) >= previous.created
