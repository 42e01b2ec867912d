"""Who is let in, at the edges, and what a refused caller is told (issue 15, mutation testing:
what a changed line of logic/auth.py would get wrong that tests/unit/test_auth.py does not see).

A refusal's reason is the message of the API's 401 body: the caller learns whether its key is
unknown, revoked or malformed, or its token expired.
"""

import json

import pytest

from tests.unit.test_auth import NOW, SECRET, Keys
from usage_meter.logic.auth import (
    MAX_TOKEN_TTL,
    Forbidden,
    Unauthenticated,
    _b64,
    _sign,
    _unb64,
    authenticate,
    authorize,
    create_api_key,
    from_context,
    identify,
    issue_portal_token,
    to_context,
    verify_portal_token,
)
from usage_meter.models.auth import Principal, Scope


def token_expiring(at: int, customer: str = "cus_A") -> str:
    payload = _b64(json.dumps({"sub": customer, "exp": at}).encode())
    return f"upt_{payload}.{_sign(payload, SECRET)}"


def refusal(authorization: str | None, keys: Keys | None = None) -> str:
    with pytest.raises(Unauthenticated) as refused:
        identify(authorization, keys=keys or Keys(), token_secrets=[SECRET], now=NOW)
    return refused.value.message


BEARER = "send Authorization: Bearer <server key or portal token>"


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, BEARER),
        ("Basic dXNlcjpwYXNz", BEARER),
        ("Bearer   ", BEARER),
        ("Bearer sk_live_abc", "not a usage-meter key or portal token"),
        ("Bearer umk_short", "malformed key"),
        ("Bearer umk_0123456789ab_" + "x" * 43, "unknown key"),
        ("Bearer upt_not-a-token", "malformed portal token"),
        (f"Bearer {token_expiring(NOW)}", "portal token expired"),
        (
            f"Bearer {token_expiring(NOW + MAX_TOKEN_TTL + 301)}",
            "portal token lives longer than tokens are issued for",
        ),
    ],
)
def test_a_refused_credential_is_told_why(authorization, reason):
    assert refusal(authorization) == reason


def test_a_forged_or_unreadable_token_is_told_why():
    good = token_expiring(NOW + 60)
    payload, _ = good.removeprefix("upt_").split(".")
    assert refusal(f"Bearer upt_{payload}.{'A' * 43}") == "portal token signature does not match"
    unreadable = _b64(b"not json")
    assert refusal(f"Bearer upt_{unreadable}.{_sign(unreadable, SECRET)}") == (
        "malformed portal token"
    )


def test_a_revoked_key_is_told_so_and_a_live_one_is_the_key_principal():
    keys = Keys()
    full, stored = create_api_key("app", {Scope.READ, Scope.RECORD}, keys=keys, now=NOW)
    principal = identify(f"Bearer {full}", keys=keys, token_secrets=[SECRET], now=NOW)
    assert principal == Principal(kind="key", id=stored.key_id, scopes={Scope.READ, Scope.RECORD})
    keys.revoke_api_key(stored.key_id, NOW)
    assert refusal(f"Bearer {full}", keys) == "revoked key"


def test_a_key_needs_a_scope():
    with pytest.raises(ValueError, match=r"^a key needs at least one scope$"):
        create_api_key("app", set(), keys=Keys(), now=NOW)


def test_a_server_key_never_fetches_the_token_secrets_a_portal_token_does():
    keys = Keys()
    full, _ = create_api_key("app", {Scope.READ}, keys=keys, now=NOW)
    fetched = []

    def token_secrets():
        fetched.append(1)
        return [SECRET]

    authenticate(full, keys=keys, token_secrets=token_secrets, now=NOW)
    assert fetched == []
    token, _ = issue_portal_token("cus_A", 60, secret=SECRET, now=NOW)
    assert authenticate(token, keys=keys, token_secrets=token_secrets, now=NOW).customer == "cus_A"
    assert fetched == [1]


@pytest.mark.parametrize("ttl", [1, MAX_TOKEN_TTL])
def test_a_token_may_live_from_one_second_to_24_hours(ttl):
    token, expires_at = issue_portal_token("cus_A", ttl, secret=SECRET, now=NOW)
    assert expires_at == NOW + ttl
    assert verify_portal_token(token, [SECRET], NOW).expires_at == NOW + ttl


@pytest.mark.parametrize("ttl", [0, MAX_TOKEN_TTL + 1])
def test_a_longer_or_empty_life_is_refused_saying_the_range(ttl):
    with pytest.raises(ValueError, match=rf"^ttl_seconds must be 1 to {MAX_TOKEN_TTL}$"):
        issue_portal_token("cus_A", ttl, secret=SECRET, now=NOW)


def test_a_token_from_a_container_whose_clock_runs_five_minutes_ahead_is_accepted():
    for ahead in (1, 300):
        token = token_expiring(NOW + MAX_TOKEN_TTL + ahead)
        assert verify_portal_token(token, [SECRET], NOW).customer == "cus_A"


def test_token_encoding_round_trips_whatever_its_length_and_last_character():
    for raw in [b"", b"a", b"ab", b"abc", b"abcd", b"abcdefg", b"\x00\x00\x17", b"\xff\xff\xfe"]:
        assert _unb64(_b64(raw)) == raw
    assert _b64(b"\x00\x00\x17") == "AAAX"


def test_a_key_with_several_scopes_round_trips_through_the_authorizers_context():
    principal = Principal(kind="key", id="0123456789ab", scopes={Scope.READ, Scope.RECORD})
    context = to_context(principal)
    assert context == {"kind": "key", "id": "0123456789ab", "scopes": "read record"}
    assert from_context(dict(context), NOW) == principal


def test_a_route_no_scope_opens_is_forbidden_saying_so():
    principal = Principal(kind="key", id="0123456789ab", scopes={Scope.ADMIN})
    with pytest.raises(Forbidden, match=r"^no such route$"):
        authorize(principal, "DELETE /v1/everything", None)


def test_an_authorizer_refusal_without_a_reason_says_no_caller_is_authenticated():
    with pytest.raises(Unauthenticated, match=r"^no authenticated caller$"):
        from_context({"kind": "anonymous"}, NOW)
