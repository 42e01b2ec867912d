"""Guards that only show when they fail (issue 15), each made to fail here on purpose:
- every route the template puts behind the authorizer checks the caller again in its function;
- a restricted Stripe key (403) is an auth error that stops a run, not a refused event;
- the Secrets Manager path, against moto's Secrets Manager: what tests/unit/test_secrets.py
  (a fake fetch) and tests/integration/test_secret_rotation.py leave out;
- the test double that records overlapping Stripe calls does see an overlap;
- the bounds `make bench` holds the published benchmark figures to.
"""

import functools
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, http_event, load_handler
from devtools.template import load_template
from tests.fakes import FakeBilling
from usage_meter import aws
from usage_meter.billing import BillingAuthError
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.config import ConfigError, Settings
from usage_meter.models.domain import MeterEventRequest
from usage_meter.secrets import (
    REFRESH_INTERVAL,
    RETRY_AFTER_ERROR,
    WEBHOOK_SECRET_OVERLAP,
    SecretCache,
    Secrets,
    SecretsManagerFetch,
)

CUSTOMER, OTHER = "cus_Q1w2E3r4", "cus_Other1"
EVENT = {"stripe_customer_id": CUSTOMER, "meter": "ai_messages", "quantity": 1}


# -- the template's routes ---------------------------------------------------------------------


@functools.cache
def routes() -> dict[str, tuple[str, bool]]:
    """Every HTTP API route of template.yaml: route key → (its function's folder under
    functions/, whether the API's authorizer runs before it)."""
    found = {}
    for resource in load_template()["Resources"].values():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        function = resource["Properties"]["CodeUri"].strip("/").split("/")[-1]
        for trigger in (resource["Properties"].get("Events") or {}).values():
            if trigger["Type"] != "HttpApi":
                continue
            properties = trigger["Properties"]
            authorizer = (properties.get("Auth") or {}).get("Authorizer")
            route = f"{str(properties['Method']).upper()} {properties['Path']}"
            found[route] = (function, authorizer != "NONE")
    return found


def behind_the_authorizer() -> list[str]:
    return sorted(route for route, (_, checked) in routes().items() if checked)


def public() -> list[str]:
    return sorted(route for route, (_, checked) in routes().items() if not checked)


def key(*scopes: str) -> dict[str, Any]:
    """The authorizer's context for a server key."""
    return {"kind": "key", "id": "0123456789ab", "scopes": " ".join(scopes)}


def portal(customer: str, expires_in: int = 600) -> dict[str, Any]:
    """The authorizer's context for a portal token (cached by API Gateway up to 5 minutes)."""
    expires_at = int(time.time()) + expires_in
    return {"kind": "portal", "id": customer, "scopes": "read", "customer": customer,
            "expires_at": expires_at}  # fmt: skip


@dataclass(frozen=True)
class Route:
    """A request on one route, the callers it must refuse with 403, and one it serves."""

    path: str
    body: Any
    forbidden: tuple[dict[str, Any], ...]
    allowed: dict[str, Any]
    served: int


def route_cases() -> dict[str, Route]:
    """One case per route behind the authorizer; a route the template gains fails the tests
    below until it has one here. Made when a test runs: portal tokens expire."""
    return {
        "POST /v1/events": Route(
            "/v1/events", EVENT, (key("read"), portal(CUSTOMER)), key("record"), 202
        ),
        "POST /v1/events/batch": Route(
            "/v1/events/batch",
            {"events": [EVENT]},
            (key("read"), portal(CUSTOMER)),
            key("record"),
            202,
        ),
        "GET /v1/customers/{stripe_customer_id}/usage": Route(
            f"/v1/customers/{CUSTOMER}/usage",
            None,
            (key("record"), portal(OTHER)),
            portal(CUSTOMER),
            200,
        ),
        "POST /v1/portal-tokens": Route(
            "/v1/portal-tokens",
            {"stripe_customer_id": CUSTOMER, "ttl_seconds": 600},
            (key("record"), portal(CUSTOMER)),
            key("read"),
            201,
        ),
    }


# Callers every route behind the authorizer answers 401, whatever its scope.
UNAUTHENTICATED = {
    "no authorizer ran": None,
    "the authorizer refused the credential": {"kind": "anonymous", "reason": "unknown key"},
    "a context without scopes": {"kind": "key", "id": "0123456789ab"},
    "a portal token expired since it was cached": portal(CUSTOMER, expires_in=-1),
}


@pytest.fixture
def functions(moto_table, monkeypatch):
    """Load a function of the template, as at a cold start, on a moto table."""
    monkeypatch.setenv("METERS", '{"ai_messages": {"included": 10}}')
    monkeypatch.setenv("PORTAL_TOKEN_SECRET", "portal-secret-for-tests")
    monkeypatch.setenv("PORTAL_ORIGINS", "https://portal.example.com")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_guards")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_guards")
    monkeypatch.delenv("STRIPE_API_BASE", raising=False)

    def call(route: str, path: str, body: Any, principal: dict[str, Any] | None, **kw: Any):
        function, _ = routes()[route]
        method = route.split(" ", 1)[0]
        event = http_event(method, path, body, principal=principal, **kw)
        return load_handler(function).lambda_handler(event, LambdaContext())

    return call


def stored(table) -> list[dict[str, Any]]:
    return table.client.scan(TableName=table.name)["Items"]


def error_of(response: dict[str, Any]) -> dict[str, Any]:
    assert response["headers"]["Content-Type"] == "application/json"
    body = json.loads(response["body"])
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


def test_every_route_behind_the_authorizer_has_a_case_and_every_other_route_a_reason():
    assert sorted(route_cases()) == behind_the_authorizer()
    assert sorted(PUBLIC) == public()


@pytest.mark.parametrize("caller", list(UNAUTHENTICATED))
@pytest.mark.parametrize("route", behind_the_authorizer())
def test_a_route_behind_the_authorizer_answers_401_to_an_unauthenticated_caller(
    functions, moto_table, route, caller
):
    # Given a request that reaches the function without an authenticated caller
    case = route_cases()[route]
    # When the function gets it
    response = functions(route, case.path, case.body, UNAUTHENTICATED[caller])
    # Then it answers the documented 401 and stores nothing
    assert response["statusCode"] == 401
    assert error_of(response)["code"] == "unauthorized"
    assert stored(moto_table) == []


@pytest.mark.parametrize("route", behind_the_authorizer())
def test_a_route_behind_the_authorizer_answers_403_to_a_caller_without_its_scope(
    functions, moto_table, route
):
    # Given callers the authorizer authenticated, none of them with this route's permission
    case = route_cases()[route]
    for caller in case.forbidden:
        # When each one calls the route
        response = functions(route, case.path, case.body, caller)
        # Then the function refuses it with the documented 403, and stores nothing
        assert response["statusCode"] == 403, caller
        assert error_of(response)["code"] == "forbidden"
        assert "token" not in json.loads(response["body"])
        assert stored(moto_table) == []


@pytest.mark.parametrize("route", behind_the_authorizer())
def test_a_route_behind_the_authorizer_serves_a_caller_with_its_scope(functions, route):
    # The control for the refusals above: the same request with the right caller is served
    case = route_cases()[route]
    assert functions(route, case.path, case.body, case.allowed)["statusCode"] == case.served


# Routes the API's authorizer does not run before: what guards each instead, and its answer to a
# caller with no credential and no signature. A route the template opens fails the test above
# until it is listed here.
PUBLIC = {
    "OPTIONS /v1/customers/{stripe_customer_id}/usage": ("a CORS preflight: no data", 204, None),
    "POST /v1/stripe/webhook": ("Stripe's signature on the raw body", 400, "invalid_signature"),
    "POST /v1/stripe/events": ("Stripe's signature on the raw body", 400, "invalid_signature"),
}


def error_code(response: dict[str, Any]) -> str | None:
    return json.loads(response["body"])["error"]["code"] if response["body"] else None


@pytest.mark.parametrize("route", public())
def test_a_route_without_the_authorizer_gives_an_unauthenticated_caller_nothing(
    functions, moto_table, route
):
    # Given a caller with no credential and no signature
    path = route.split(" ", 1)[1].replace("{stripe_customer_id}", CUSTOMER)
    body = {"id": "evt_1", "type": "customer.subscription.updated"}
    # When it calls the route
    response = functions(route, path, body, None, headers={"Origin": "https://portal.example.com"})
    # Then it gets the route's answer (a preflight's headers, a Stripe route's refusal), and
    # nothing is stored
    _, status, code = PUBLIC[route]
    assert (response["statusCode"], error_code(response)) == (status, code)
    assert stored(moto_table) == []


# -- a restricted Stripe key --------------------------------------------------------------------

RESTRICTED_KEY = "rk_test_51GuardsRestrictedKey0123456789"


def test_a_restricted_key_without_the_meter_event_permission_is_an_auth_error():
    # Given a restricted key that may read subscriptions but not write meter events, on the
    # fake Stripe, which answers Stripe's 403 for it
    with FakeStripe() as fake:
        fake.restrict_api_key(RESTRICTED_KEY, {"subscription_read", "billing_meter_read"})
        billing = StripeMeterBilling(RESTRICTED_KEY, api_base=fake.url, max_network_retries=2)
        request = MeterEventRequest(
            identifier="umb_x.1", event_name="ai_messages", customer=CUSTOMER, value=1,
            timestamp=int(time.time()),
        )  # fmt: skip
        # When an event is sent / Then it is the error that stops a run, asked once (no
        # retry), and Stripe has no event
        with pytest.raises(BillingAuthError, match="'rak_billing_meter_event_write' permission"):
            billing.send(request)
        assert fake.calls == 1
        assert fake.accepted() == []


# -- Secrets Manager (moto) ---------------------------------------------------------------------

# AWS's answer when the function's role may not read the secret (Secrets Manager: HTTP 400).
ACCESS_DENIED = {
    "__type": "AccessDeniedException",
    "Message": "User: arn:aws:sts::123456789012:assumed-role/usage-meter-FlushFunctionRole/"
    "usage-meter-flush is not authorized to perform: secretsmanager:GetSecretValue on resource: "
    "usage-meter/stripe because no identity-based policy allows the "
    "secretsmanager:GetSecretValue action",
}


class _Body:
    """The raw body botocore reads an HTTP answer from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any):
        yield self._data


@dataclass
class Access:
    denied: bool = False


@pytest.fixture
def access(secrets_manager, monkeypatch) -> Access:
    """Switch the function's read access to its secrets: while denied, every GetSecretValue
    gets AWS's AccessDeniedException (each client the code makes answers it)."""
    gate = Access()
    make_client = aws.client

    def answer(request, **_):
        if not gate.denied:
            return None
        headers = {"Content-Type": "application/x-amz-json-1.1"}
        return AWSResponse(request.url, 400, headers, _Body(json.dumps(ACCESS_DENIED).encode()))

    def gated_client(service: str, config: Any = None) -> Any:
        client = make_client(service, config)
        client.meta.events.register("before-send.secrets-manager.GetSecretValue", answer)
        return client

    monkeypatch.setattr(aws, "client", gated_client)
    return gate


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountedFetch:
    """The real GetSecretValue fetch, counting its calls."""

    def __init__(self) -> None:
        self._fetch = SecretsManagerFetch()
        self.calls = 0

    def __call__(self, secret_id: str, stage: str):
        self.calls += 1
        return self._fetch(secret_id, stage)


def deployed(**names: str) -> Settings:
    return Settings.from_env({"TABLE_NAME": "usage", "METERS": '{"m": {}}', **names})


def new_secret(secrets_manager, value: str) -> str:
    name = f"usage-meter/guards-{uuid.uuid4().hex[:8]}"
    secrets_manager.create_secret(Name=name, SecretString=value)
    return name


def created(secrets_manager, name: str) -> float:
    return secrets_manager.get_secret_value(SecretId=name)["CreatedDate"].timestamp()


def test_the_stripe_key_is_fetched_once_per_max_age_and_used_without_surrounding_space(
    secrets_manager,
):
    # Given the key stored with a trailing newline (as `aws secretsmanager` from a file stores it)
    name = new_secret(secrets_manager, "sk_test_first\n")
    fetch, clock = CountedFetch(), Clock(time.time())
    secrets = Secrets(deployed(STRIPE_API_KEY_SECRET=name), SecretCache(fetch, clock=clock))
    # When a warm container asks for it twice, then rotated, just before and at max_age
    first, again = secrets.stripe_api_key(), secrets.stripe_api_key()
    secrets_manager.put_secret_value(SecretId=name, SecretString="sk_test_second")
    clock.now += secrets.cache.max_age - 1
    before_max_age = secrets.stripe_api_key()
    clock.now += 1
    after_max_age = secrets.stripe_api_key()
    # Then Secrets Manager was asked once per max_age, and the key has no newline
    assert (first, again, before_max_age) == ("sk_test_first",) * 3
    assert after_max_age == "sk_test_second" and fetch.calls == 2


def test_a_secret_that_does_not_exist_is_a_config_error_naming_it(secrets_manager):
    name = f"usage-meter/missing-{uuid.uuid4().hex[:8]}"
    secrets = Secrets(deployed(STRIPE_API_KEY_SECRET=name, STRIPE_WEBHOOK_SECRET_NAME=name))
    with pytest.raises(ConfigError, match=f"secret {name} has no AWSCURRENT version"):
        secrets.stripe_api_key()
    with pytest.raises(ConfigError, match=name):
        secrets.stripe_webhook_secrets()


def test_access_denied_on_a_cold_container_raises_aws_error_not_a_missing_secret(
    secrets_manager, access
):
    # Given a secret the function's role may not read
    name = new_secret(secrets_manager, "sk_test_first")
    access.denied = True
    # When a cold container asks for the key / Then AWS's error surfaces as it is
    with pytest.raises(ClientError) as raised:
        Secrets(deployed(STRIPE_API_KEY_SECRET=name)).stripe_api_key()
    assert raised.value.response["Error"]["Code"] == "AccessDeniedException"


def test_access_denied_after_a_fetch_keeps_the_fetched_key_until_it_is_allowed_again(
    secrets_manager, access
):
    # Given a warm container that fetched the key, then lost access to it, past max_age
    name = new_secret(secrets_manager, "sk_test_first")
    fetch, clock = CountedFetch(), Clock(time.time())
    secrets = Secrets(deployed(STRIPE_API_KEY_SECRET=name), SecretCache(fetch, clock=clock))
    assert secrets.stripe_api_key() == "sk_test_first"
    secrets_manager.put_secret_value(SecretId=name, SecretString="sk_test_second")
    access.denied = True
    clock.now += secrets.cache.max_age
    # When it asks for the key, and again before RETRY_AFTER_ERROR passed
    denied = secrets.stripe_api_key()
    clock.now += RETRY_AFTER_ERROR - 1
    still = secrets.stripe_api_key()
    # Then the key it had answers, and it tried Secrets Manager once more, not on every call
    assert (denied, still) == ("sk_test_first", "sk_test_first") and fetch.calls == 2
    # and once access is back and RETRY_AFTER_ERROR passed, the rotated key answers
    access.denied = False
    clock.now += 1
    assert secrets.stripe_api_key() == "sk_test_second" and fetch.calls == 3


def test_webhook_secrets_accept_the_previous_version_for_a_day_after_a_rotation(secrets_manager):
    # Given the endpoint's secret (two while Stripe rolls it), rotated to a new one
    name = new_secret(secrets_manager, "whsec_a, whsec_b")
    secrets_manager.put_secret_value(SecretId=name, SecretString="whsec_c")
    rotated = created(secrets_manager, name)
    settings = deployed(STRIPE_WEBHOOK_SECRET_NAME=name)
    # When containers look at the secrets just before, and after, a day since the rotation
    within = Secrets(settings, SecretCache(clock=Clock(rotated + WEBHOOK_SECRET_OVERLAP - 1)))
    after = Secrets(settings, SecretCache(clock=Clock(rotated + WEBHOOK_SECRET_OVERLAP)))
    # Then the previous version's secrets are accepted within the day, and not after it
    assert within.stripe_webhook_secrets() == ["whsec_c", "whsec_a", "whsec_b"]
    assert after.stripe_webhook_secrets() == ["whsec_c"]


def test_a_refused_delivery_fetches_rotated_webhook_secrets_at_most_every_30_seconds(
    secrets_manager,
):
    # Given a warm container that fetched the webhook secret, then a rotation
    name = new_secret(secrets_manager, "whsec_old")
    fetch, clock = CountedFetch(), Clock(time.time())
    secrets = Secrets(deployed(STRIPE_WEBHOOK_SECRET_NAME=name), SecretCache(fetch, clock=clock))
    assert secrets.stripe_webhook_secrets() == ["whsec_old"]
    secrets_manager.put_secret_value(SecretId=name, SecretString="whsec_new")
    # When a delivery matches none of its secrets, too soon and then REFRESH_INTERVAL later
    clock.now += REFRESH_INTERVAL - 1
    too_soon, calls = secrets.refreshed_stripe_webhook_secrets(), fetch.calls
    clock.now += 1
    refreshed = secrets.refreshed_stripe_webhook_secrets()
    # Then only the second fetches, and it returns the new secret with the previous one
    assert too_soon is None and calls == 2  # AWSCURRENT, then AWSPREVIOUS (none yet at first)
    assert refreshed == ["whsec_new", "whsec_old"]


# -- the overlap detector -----------------------------------------------------------------------


def _send_at_once(billing: FakeBilling, requests: list[MeterEventRequest]) -> None:
    """Each request sent by its own thread, all of them in flight at once."""
    together = threading.Barrier(len(requests), timeout=5)
    billing.on_call = lambda _: together.wait()
    threads = [threading.Thread(target=billing.send, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def request_for(customer: str, n: int) -> MeterEventRequest:
    return MeterEventRequest(
        identifier=f"umb_{customer}.{n}", event_name="m", customer=customer, value=1, timestamp=1
    )


def test_the_fake_stripe_records_calls_of_one_pair_that_overlap():
    # Given eight calls for one (customer, meter) in flight at the same moment
    billing = FakeBilling()
    _send_at_once(billing, [request_for("cus_A", n) for n in range(8)])
    # Then the detector the flush tests rely on saw all of them overlap, and none is lost
    assert billing.max_in_flight_per_pair == 8 and billing.max_in_flight == 8
    assert len(billing.calls) == 8 and billing.in_flight == {("cus_A", "m"): 0}


def test_the_fake_stripe_records_no_pair_overlap_for_calls_of_different_pairs():
    billing = FakeBilling()
    _send_at_once(billing, [request_for(f"cus_{c}", 1) for c in "ABCD"])
    assert billing.max_in_flight_per_pair == 1 and billing.max_in_flight == 4


# -- the benchmarks' published ratios ---------------------------------------------------------

# The figures the README publishes (the compare tables' "before" and "now" columns), as
# benchmarks.compare.derive makes them.
HOT_PAIRS = {  # engine: (p99 hot ÷ p99 spread, the hot pair's counter items)
    "local": (0.96, 1),
    "emulated": (1.04, 16),
}
NOW_FIGURES = {
    "single": 4.010,
    "batch": 2.410,
    "flush": 0.040,
    "total_single": 4.05,
    "total_batch": 2.45,
    "drain_pairs": 20,
    "drain_stripe_calls": 20,
    "drain_units": 30_020,
    "drain_stripe_units": 30_020,
    "drain_second_flush_calls": 0,
    "drain_errors": [],
    "drain_flush_seconds": 0.27,
    "drain_record_seconds": 5.4,
    "drain_events_per_second": 37_092,
}
for engine, (ratio, items) in HOT_PAIRS.items():
    NOW_FIGURES |= {
        f"{engine}_ratio": ratio,
        f"{engine}_hot_errors_5xx": 0,
        f"{engine}_spread_errors_5xx": 0,
        f"{engine}_hot_billed_units": 480,
        f"{engine}_hot_stored_units": 480,
        f"{engine}_hot_counter_items": items,
        f"{engine}_hot_flush_stripe_calls": items,
    }
BEFORE_FIGURES = {"total_single": 7.20, "total_batch": 5.60, "drain_events_per_second": 537}


def test_the_published_benchmark_figures_are_within_their_bounds():
    from benchmarks import compare

    assert compare.check(NOW_FIGURES, BEFORE_FIGURES) == []


@pytest.mark.parametrize(
    ("change", "broken"),
    [
        ({"single": 5.0}, "write units, single-event request ≤ 4.05"),
        ({"flush": 2.2}, "write units, flush ≤ 0.1"),
        ({"drain_stripe_calls": 26}, "Stripe calls = pairs"),
        ({"drain_stripe_units": 30_019}, "units billed = recorded"),
        ({"drain_flush_seconds": 1.2}, "flush run ≤ 1/5 of recording the same backlog"),
        ({"emulated_ratio": 20.44}, "emulated: p99 hot ÷ p99 spread < 3.0"),
        ({"local_hot_errors_5xx": 1}, "local: no 5xx, hot or spread"),
        ({"emulated_hot_flush_stripe_calls": 17},
         "emulated: one Stripe call per counter item of the hot pair"),
        ({"total_batch": 5.0}, "write units, record + flush, now ≤ 0.75 of before"),
        ({"drain_events_per_second": 5_000},
         "drain: events covered per second, now ≥ 10 times before"),
    ],
)  # fmt: skip
def test_a_benchmark_figure_that_regresses_breaks_its_bound(change, broken):
    from benchmarks import compare

    assert compare.check({**NOW_FIGURES, **change}, BEFORE_FIGURES) == [broken]


X = "\u00d7"  # the multiplication sign of the cold-start tables


def cold_starts(**init_and_first: tuple[float, float]) -> dict[str, Any]:
    """coldstart's results: one cold start per function, (init ms, init + first request ms)."""
    published = {
        "RecordFunction": (240, 286),
        "ReadFunction": (248, 306),
        "AuthorizerFunction": (244, 265),
        "FlushFunction": (274, 1625),
        "StripeWebhookFunction": (274, 286),
        **init_and_first,
    }
    before = {"RecordFunction": (531, 576), "ReadFunction": (532, 578),
              "AuthorizerFunction": (434, 450), "FlushFunction": (560, 2019),
              "StripeWebhookFunction": (526, 530)}  # fmt: skip

    def samples(figures: dict[str, tuple[float, float]]) -> dict[str, Any]:
        return {n: [{"init_ms": i, "first_ms": f, "warm_ms": 5.0}] for n, (i, f) in figures.items()}

    return {"bare": samples({"BareHandler": (196, 205)}), "now": samples(published),
            "before": samples(before)}  # fmt: skip


def test_the_published_cold_start_ratios_are_within_their_bounds():
    from benchmarks import coldstart

    assert coldstart.check(cold_starts()) == []


@pytest.mark.parametrize(
    ("change", "broken"),
    [
        ({"RecordFunction": (400, 420)}, f"record (`POST /v1/events`): init_ms {X}2.04 > {X}1.7"),
        ({"ReadFunction": (248, 450)}, f"read (`GET .../usage`): first_ms {X}2.20 > {X}2.0"),
        ({"AuthorizerFunction": (360, 380)},
         "authorizer (server key): init now > 0.8 of before"),
    ],
)  # fmt: skip
def test_a_cold_start_that_regresses_breaks_its_bound(change, broken):
    from benchmarks import coldstart

    assert broken in coldstart.check(cold_starts(**change))
