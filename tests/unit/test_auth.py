"""Server keys and portal tokens: who is let in, to what."""

import json

import pytest

from usage_meter.logic.auth import (
    MAX_TOKEN_TTL,
    USAGE_ROUTE,
    Forbidden,
    Unauthenticated,
    _b64,
    _sign,
    anonymous_context,
    authorize,
    bearer,
    create_api_key,
    from_context,
    identify,
    issue_portal_token,
    to_context,
    verify_portal_token,
)
from usage_meter.models.auth import ApiKey, Scope

NOW = 1_795_680_000
SECRET = b"unit-test-secret"


class Keys:
    def __init__(self) -> None:
        self.items: dict[str, ApiKey] = {}

    def get_api_key(self, key_id):
        return self.items.get(key_id)

    def put_api_key(self, key):
        self.items[key.key_id] = key

    def list_api_keys(self):
        return list(self.items.values())

    def revoke_api_key(self, key_id, at):
        self.items[key_id] = self.items[key_id].model_copy(update={"revoked_at": at})
        return True


def decide_for(authorization, route=USAGE_ROUTE, customer="cus_A", keys=None):
    """What a request meets: the authorizer identifies the caller, the function authorizes it."""
    principal = identify(authorization, keys=keys or Keys(), token_secrets=[SECRET], now=NOW)
    authorize(principal, route, customer)
    return principal


def test_a_new_key_is_shown_once_and_stored_only_as_a_hash():
    keys = Keys()
    full, stored = create_api_key("app", {Scope.RECORD}, keys=keys, now=NOW)
    assert full.startswith(f"umk_{stored.key_id}_")
    secret = full.split("_", 2)[2]
    assert secret not in stored.model_dump_json() and stored.secret_hash != secret


def test_a_key_opens_the_routes_of_its_scopes_only():
    keys = Keys()
    full, _ = create_api_key("app", {Scope.RECORD}, keys=keys, now=NOW)
    assert decide_for(f"Bearer {full}", "POST /v1/events", None, keys).id
    with pytest.raises(Forbidden):
        decide_for(f"Bearer {full}", USAGE_ROUTE, "cus_A", keys)


def test_the_admin_scope_opens_every_route():
    keys = Keys()
    full, _ = create_api_key("ops", {Scope.ADMIN}, keys=keys, now=NOW)
    for route in (
        "POST /v1/events",
        "POST /v1/events/batch",
        USAGE_ROUTE,
        "POST /v1/portal-tokens",
    ):
        decide_for(f"Bearer {full}", route, "cus_A", keys)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic abc",
        "bearer  ",
        "Token umk_x",
        "Bearer umk_short",
        "Bearer umk_0123456789ab_" + "x" * 42,
        "Bearer somethingelse",
        "Bearer upt_",
        "Bearer upt_a.b",
    ],
)
def test_missing_or_malformed_credentials_are_unauthenticated(authorization):
    with pytest.raises(Unauthenticated):
        decide_for(authorization)


def test_a_key_with_a_wrong_secret_or_revoked_is_unauthenticated():
    keys = Keys()
    full, stored = create_api_key("app", {Scope.READ}, keys=keys, now=NOW)
    wrong = full[:-1] + ("A" if full[-1] != "A" else "B")
    with pytest.raises(Unauthenticated):
        decide_for(f"Bearer {wrong}", keys=keys)
    keys.revoke_api_key(stored.key_id, NOW)
    with pytest.raises(Unauthenticated):
        decide_for(f"Bearer {full}", keys=keys)


def test_a_portal_token_reads_only_its_customers_usage():
    token, _ = issue_portal_token("cus_A", 3600, secret=SECRET, now=NOW)
    principal = decide_for(f"Bearer {token}", USAGE_ROUTE, "cus_A")
    assert (principal.kind, principal.customer) == ("portal", "cus_A")
    with pytest.raises(Forbidden):
        decide_for(f"Bearer {token}", USAGE_ROUTE, "cus_B")
    for route in ("POST /v1/events", "POST /v1/events/batch", "POST /v1/portal-tokens"):
        with pytest.raises(Forbidden):
            decide_for(f"Bearer {token}", route, None)


def test_an_expired_or_tampered_token_is_unauthenticated():
    token, expires = issue_portal_token("cus_A", 60, secret=SECRET, now=NOW)
    with pytest.raises(Unauthenticated):
        verify_portal_token(token, [SECRET], expires)
    with pytest.raises(Unauthenticated):
        verify_portal_token(token, [b"another secret"], NOW)
    forged, _ = issue_portal_token("cus_B", 60, secret=SECRET, now=NOW)
    payload_b = forged.split(".")[0]
    with pytest.raises(Unauthenticated):
        verify_portal_token(f"{payload_b}.{token.split('.')[1]}", [SECRET], NOW)


@pytest.mark.parametrize("ttl", [0, -1, MAX_TOKEN_TTL + 1])
def test_a_token_lives_at_most_24_hours(ttl):
    with pytest.raises(ValueError):
        issue_portal_token("cus_A", ttl, secret=SECRET, now=NOW)


def test_the_context_round_trips_and_expiry_is_checked_again_behind_the_cache():
    token, expires = issue_portal_token("cus_A", 600, secret=SECRET, now=NOW)
    principal = verify_portal_token(token, [SECRET], NOW)
    context = to_context(principal)
    assert from_context(dict(context), NOW) == principal
    with pytest.raises(Unauthenticated):
        from_context(dict(context), expires)


@pytest.mark.parametrize(
    "context", [None, {}, {"kind": "key"}, {"kind": "key", "id": "k", "scopes": "root"}]
)
def test_a_missing_or_broken_context_is_unauthenticated(context):
    with pytest.raises(Unauthenticated):
        from_context(context, NOW)


def test_an_unknown_route_is_forbidden_even_for_admin():
    keys = Keys()
    full, _ = create_api_key("ops", {Scope.ADMIN}, keys=keys, now=NOW)
    principal = decide_for(f"Bearer {full}", "POST /v1/events", None, keys)
    with pytest.raises(Forbidden):
        authorize(principal, "DELETE /v1/everything", None)


def test_bearer_takes_the_credential_after_the_scheme():
    assert bearer("Bearer  umk_abc ") == "umk_abc"


def test_an_anonymous_context_is_unauthenticated_with_the_authorizers_reason():
    # Given the context the authorizer passes on for a refused credential
    context = anonymous_context("portal token expired")
    # When the function reads it / Then it refuses the caller, saying why
    with pytest.raises(Unauthenticated, match=r"^portal token expired$"):
        from_context(dict(context), NOW)


def test_the_identity_does_not_depend_on_the_route_or_customer():
    # Given a portal token: API Gateway caches the authorizer's answer per Authorization header
    token, _ = issue_portal_token("cus_A", 600, secret=SECRET, now=NOW)
    principal = identify(f"Bearer {token}", keys=Keys(), token_secrets=[SECRET], now=NOW)
    # When the same answer meets a request for another customer, then its own
    with pytest.raises(Forbidden):
        authorize(principal, USAGE_ROUTE, "cus_B")
    # Then the refusal did not stick to the token: its own customer is still allowed
    authorize(principal, USAGE_ROUTE, "cus_A")


def test_a_token_claiming_a_longer_life_than_any_issued_is_refused():
    # Given a correctly signed token whose expiry lies beyond the 24-hour maximum
    payload = _b64(json.dumps({"sub": "cus_A", "exp": NOW + MAX_TOKEN_TTL + 3600}).encode())
    token = f"upt_{payload}.{_sign(payload, SECRET)}"
    # When / Then it is refused, so a leaked secret cannot mint everlasting tokens
    with pytest.raises(Unauthenticated, match="longer"):
        verify_portal_token(token, [SECRET], NOW)


def test_a_token_signed_with_any_of_the_given_secrets_is_verified():
    # Given a token signed with the secret a rotation just replaced
    previous, current = b"previous secret", b"current secret"
    token, _ = issue_portal_token("cus_A", 600, secret=previous, now=NOW)
    # When it is verified against the current secret and the previous one
    principal = verify_portal_token(token, [current, previous], NOW)
    # Then it is accepted; against the current secret alone it is not
    assert principal.customer == "cus_A"
    with pytest.raises(Unauthenticated, match="signature"):
        verify_portal_token(token, [current], NOW)
