"""Who may do what, and what a refused caller is told (logic/auth.py; issue 15, mutation
testing): each route's scope, a portal token's read-only reach, the 24 hour token limit, the
function's own re-check of the authorizer's context, and the Authorization header's spacing.
A Forbidden or Unauthenticated message is the message of the API's 403/401 body."""

from datetime import UTC, datetime

import pytest

from devtools.invoke import http_event, response_json
from tests.fakes import InMemoryStore
from tests.unit.test_auth import Keys
from usage_meter.api import read_api, record_api
from usage_meter.logic.auth import (
    MAX_TOKEN_TTL,
    USAGE_ROUTE,
    Forbidden,
    Unauthenticated,
    authenticate,
    authorize,
    bearer,
    create_api_key,
    from_context,
    issue_portal_token,
    to_context,
    verify_portal_token,
)
from usage_meter.models.auth import Principal, Scope

NOW = 1_795_680_000
SECRET = b"unit-test-secret"


def _now() -> datetime:
    return datetime.fromtimestamp(NOW, UTC)


EVENT = {"stripe_customer_id": "cus_Q1w2E3r4", "meter": "ai_messages", "quantity": 1}


class Context:
    function_name = "test"
    aws_request_id = "req-1"


def key(*scopes: Scope) -> Principal:
    return Principal(kind="key", id="0123456789ab", scopes=frozenset(scopes))


def forbidden(principal: Principal, route: str, customer: str | None = None) -> str:
    with pytest.raises(Forbidden) as refused:
        authorize(principal, route, customer)
    return refused.value.message


def unauthenticated(context: dict | None) -> str:
    with pytest.raises(Unauthenticated) as refused:
        from_context(context, NOW)
    return refused.value.message


# -- each route's scope ----------------------------------------------------------------------------


def test_a_read_key_cannot_record_a_batch_and_is_told_the_missing_scope():
    assert forbidden(key(Scope.READ), "POST /v1/events/batch") == "this key lacks the record scope"


def test_a_record_key_cannot_mint_portal_tokens_and_a_read_key_can():
    assert forbidden(key(Scope.RECORD), "POST /v1/portal-tokens") == "this key lacks the read scope"
    authorize(key(Scope.READ), "POST /v1/portal-tokens", None)


def test_an_unknown_route_is_told_so():
    assert forbidden(key(Scope.ADMIN), "DELETE /v1/events") == "no such route"


@pytest.mark.parametrize(
    ("scopes", "status"), [("read", 403), ("record", 202)], ids=["read key", "record key"]
)
def test_only_a_record_key_records_a_batch_through_the_api(scopes, status):
    # Given a key with one scope behind the authorizer
    store = InMemoryStore()
    principal = {"kind": "key", "id": "0123456789ab", "scopes": scopes}
    app = record_api(meters={"ai_messages": {}}, store=store, now=_now)
    # When it posts a batch
    event = http_event("POST", "/v1/events/batch", {"events": [EVENT]}, principal=principal)
    # Then only the record key gets it stored
    assert app.resolve(event, Context())["statusCode"] == status
    assert len(store.events) == (1 if status == 202 else 0)


@pytest.mark.parametrize(
    ("scopes", "status"), [("record", 403), ("read", 201)], ids=["record key", "read key"]
)
def test_only_a_read_key_mints_portal_tokens_through_the_api(scopes, status):
    principal = {"kind": "key", "id": "0123456789ab", "scopes": scopes}
    app = read_api(included={}, store=InMemoryStore(), now=_now, token_secret=lambda: SECRET)
    body = {"stripe_customer_id": "cus_Q1w2E3r4"}
    response = app.resolve(
        http_event("POST", "/v1/portal-tokens", body, principal=principal), Context()
    )
    assert response["statusCode"] == status
    if status == 403:
        assert response_json(response)["error"] == {
            "code": "forbidden",
            "message": "this key lacks the read scope",
            "details": [],
        }


# -- portal tokens ---------------------------------------------------------------------------------


def portal() -> Principal:
    token, _ = issue_portal_token("cus_A", 600, secret=SECRET, now=NOW)
    return verify_portal_token(token, [SECRET], NOW)


def test_a_portal_token_is_read_only():
    principal = portal()
    assert principal.allows(Scope.READ) and not principal.allows(Scope.RECORD)
    assert to_context(principal)["scopes"] == "read"


def test_a_portal_token_elsewhere_is_told_its_reach():
    message = "a portal token reads its own customer's usage only"
    assert forbidden(portal(), "POST /v1/events") == message
    assert forbidden(portal(), USAGE_ROUTE, "cus_B") == message


def test_no_token_is_issued_for_longer_than_24_hours():
    # Given the longest life a token may have, it is issued
    _, expires_at = issue_portal_token("cus_A", MAX_TOKEN_TTL, secret=SECRET, now=NOW)
    assert expires_at == NOW + 24 * 3600
    # And one second longer is refused
    with pytest.raises(ValueError, match="ttl_seconds must be 1 to 86400"):
        issue_portal_token("cus_A", 24 * 3600 + 1, secret=SECRET, now=NOW)


def test_a_token_for_the_longest_customer_id_round_trips():
    # Given a customer id of the longest length the API accepts (255 characters)
    customer = "cus_" + "a" * 251
    token, _ = issue_portal_token(customer, 600, secret=SECRET, now=NOW)
    # Then its token verifies for that customer
    assert verify_portal_token(token, [SECRET], NOW).customer == customer


# -- the function's re-check of the authorizer's context ------------------------------------------


def test_a_context_missing_its_fields_is_told_no_caller():
    assert unauthenticated({"kind": "key"}) == "no authenticated caller"
    assert unauthenticated({"kind": "key", "id": "x", "scopes": "superuser"}) == (
        "no authenticated caller"
    )


def test_a_cached_context_whose_token_expired_is_told_so():
    context = to_context(portal())
    with pytest.raises(Unauthenticated) as refused:
        from_context(context, NOW + 600)
    assert refused.value.message == "portal token expired"
    # one second earlier it is still let in
    assert from_context(context, NOW + 599).customer == "cus_A"


# -- the Authorization header ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", ["  Bearer abc", "Bearer abc  ", "bearer abc", "BEARER   abc"]
)
def test_the_credential_is_found_whatever_the_spacing_and_scheme_case(authorization):
    assert bearer(authorization) == "abc"


# -- server keys and tokens: exactly their format --------------------------------------------------


def test_a_new_key_is_stored_with_its_name_scopes_and_creation_time():
    keys = Keys()
    _, created = create_api_key("billing app", {Scope.RECORD}, keys=keys, now=NOW)
    stored = keys.get_api_key(created.key_id)
    assert stored is not None
    assert (stored.name, stored.scopes, stored.created_at, stored.revoked_at) == (
        "billing app",
        frozenset({Scope.RECORD}),
        NOW,
        None,
    )


def test_a_key_with_anything_after_its_secret_is_refused_as_malformed():
    # Given a valid key
    keys = Keys()
    full, _ = create_api_key("app", {Scope.RECORD}, keys=keys, now=NOW)
    assert authenticate(full, keys=keys, token_secrets=[], now=NOW).kind == "key"
    # When something is appended to it, Then it is not that key
    with pytest.raises(Unauthenticated) as refused:
        authenticate(full + "x", keys=keys, token_secrets=[], now=NOW)
    assert refused.value.message == "malformed key"


def test_a_token_with_anything_after_its_signature_is_refused_as_malformed():
    token, _ = issue_portal_token("cus_A", 600, secret=SECRET, now=NOW)
    with pytest.raises(Unauthenticated) as refused:
        verify_portal_token(token + "x", [SECRET], NOW)
    assert refused.value.message == "malformed portal token"
