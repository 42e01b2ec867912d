"""Authentication and authorization: server keys (hashed, scoped, revocable) and portal tokens
(signed, expiring, one customer, read-only). No HTTP and no boto3 here."""

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Protocol

from usage_meter.errors import UsageMeterError
from usage_meter.models.auth import ApiKey, Principal, Scope

KEY_PREFIX, TOKEN_PREFIX = "umk_", "upt_"
ANONYMOUS = "anonymous"  # the authorizer's context kind for a credential it refused
MAX_TOKEN_TTL = 24 * 3600
_CLOCK_SKEW = 300  # containers' clocks differ by far less; a longer life was never issued
USAGE_ROUTE = "GET /v1/customers/{stripe_customer_id}/usage"
ROUTE_SCOPES = {
    "POST /v1/events": Scope.RECORD,
    "POST /v1/events/batch": Scope.RECORD,
    USAGE_ROUTE: Scope.READ,
    "POST /v1/portal-tokens": Scope.READ,
}
_KEY = re.compile(r"^umk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_TOKEN = re.compile(r"^upt_([A-Za-z0-9_-]{1,400})\.([A-Za-z0-9_-]{43})$")


class Unauthenticated(UsageMeterError):
    code = "unauthorized"


class Forbidden(UsageMeterError):
    code = "forbidden"


class KeyStore(Protocol):
    def get_api_key(self, key_id: str) -> ApiKey | None: ...

    def put_api_key(self, key: ApiKey) -> None: ...

    def list_api_keys(self) -> Sequence[ApiKey]: ...

    def revoke_api_key(self, key_id: str, at: int) -> bool: ...


def _hash(secret: str) -> str:
    # The secret is 256 random bits: a plain hash is as strong as a slow one here.
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(
    name: str, scopes: set[Scope], *, keys: KeyStore, now: int
) -> tuple[str, ApiKey]:
    """A new key: the full key is returned once and never stored."""
    if not scopes:
        raise ValueError("a key needs at least one scope")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    key = ApiKey(
        key_id=key_id,
        name=name,
        scopes=frozenset(scopes),
        secret_hash=_hash(secret),
        created_at=now,
    )
    keys.put_api_key(key)
    return f"{KEY_PREFIX}{key_id}_{secret}", key


def bearer(authorization: str | None) -> str:
    scheme, _, credential = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated("send Authorization: Bearer <server key or portal token>")
    return credential.strip()


# The portal token secrets, or how to get them: fetched only for a portal token, so a server key
# never waits for Secrets Manager (nor does the authorizer's first request after a cold start).
TokenSecrets = Sequence[bytes] | Callable[[], Sequence[bytes]]


def authenticate(
    credential: str, *, keys: KeyStore, token_secrets: TokenSecrets, now: int
) -> Principal:
    if credential.startswith(KEY_PREFIX):
        return _server_key(credential, keys)
    if credential.startswith(TOKEN_PREFIX):
        found = token_secrets() if callable(token_secrets) else token_secrets
        return verify_portal_token(credential, found, now)
    raise Unauthenticated("not a usage-meter key or portal token")


def _server_key(credential: str, keys: KeyStore) -> Principal:
    match = _KEY.match(credential)
    if not match:
        raise Unauthenticated("malformed key")
    key_id, secret = match.groups()
    key = keys.get_api_key(key_id)
    if key is None or not hmac.compare_digest(key.secret_hash, _hash(secret)):
        raise Unauthenticated("unknown key")
    if key.revoked_at is not None:
        raise Unauthenticated("revoked key")
    return Principal(kind="key", id=key_id, scopes=key.scopes)


def authorize(principal: Principal, route_key: str, customer: str | None) -> None:
    """May this caller use this route (for this customer)? Raises Forbidden if not."""
    scope = ROUTE_SCOPES.get(route_key)
    if scope is None:
        raise Forbidden("no such route")
    if principal.kind == "portal":
        if route_key != USAGE_ROUTE or customer != principal.customer:
            raise Forbidden("a portal token reads its own customer's usage only")
    elif not principal.allows(scope):
        raise Forbidden(f"this key lacks the {scope} scope")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(payload: str, secret: bytes) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def issue_portal_token(
    customer: str, ttl_seconds: int, *, secret: bytes, now: int
) -> tuple[str, int]:
    if not 1 <= ttl_seconds <= MAX_TOKEN_TTL:
        raise ValueError(f"ttl_seconds must be 1 to {MAX_TOKEN_TTL}")
    expires_at = now + ttl_seconds
    payload = _b64(json.dumps({"sub": customer, "exp": expires_at}, separators=(",", ":")).encode())
    return f"{TOKEN_PREFIX}{payload}.{_sign(payload, secret)}", expires_at


def verify_portal_token(token: str, token_secrets: Sequence[bytes], now: int) -> Principal:
    """A token signed with any of `token_secrets` (more than one while tokens signed with a
    rotated secret are still out there)."""
    match = _TOKEN.match(token)
    if not match:
        raise Unauthenticated("malformed portal token")
    payload, signature = match.groups()
    if not any(hmac.compare_digest(signature, _sign(payload, secret)) for secret in token_secrets):
        raise Unauthenticated("portal token signature does not match")
    try:
        claims = json.loads(_unb64(payload))
        customer, expires_at = str(claims["sub"]), int(claims["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise Unauthenticated("malformed portal token") from None
    if expires_at <= now:
        raise Unauthenticated("portal token expired")
    if expires_at > now + MAX_TOKEN_TTL + _CLOCK_SKEW:
        raise Unauthenticated("portal token lives longer than tokens are issued for")
    return Principal(
        kind="portal",
        id=customer,
        scopes=frozenset({Scope.READ}),
        customer=customer,
        expires_at=expires_at,
    )


def identify(
    authorization: str | None, *, keys: KeyStore, token_secrets: TokenSecrets, now: int
) -> Principal:
    """The authorizer's whole decision: who is calling. It depends on the credential alone, so
    API Gateway may cache it per Authorization header; what the caller may do on a route, and
    for which customer, the function decides (`authorize`)."""
    return authenticate(bearer(authorization), keys=keys, token_secrets=token_secrets, now=now)


def anonymous_context(reason: str) -> dict[str, str | int]:
    """What the authorizer passes on for a credential it could not authenticate: the function
    answers 401 with this reason in the API's own error format."""
    return {"kind": ANONYMOUS, "reason": reason}


def to_context(principal: Principal) -> dict[str, str | int]:
    """The principal as API Gateway passes it on: flat strings and numbers."""
    context: dict[str, str | int] = {
        "kind": principal.kind,
        "id": principal.id,
        "scopes": " ".join(sorted(principal.scopes)),
    }
    if principal.customer is not None:
        context["customer"] = principal.customer
    if principal.expires_at is not None:
        context["expires_at"] = principal.expires_at
    return context


def from_context(context: dict[str, object] | None, now: int) -> Principal:
    """The principal the authorizer let through, checked again where it is used: a cached
    authorization must not outlive the token it was made for."""
    if not context or "kind" not in context:
        raise Unauthenticated("no authenticated caller")
    if context["kind"] == ANONYMOUS:
        raise Unauthenticated(str(context.get("reason") or "no authenticated caller"))
    try:
        expires_at = int(str(context["expires_at"])) if "expires_at" in context else None
        principal = Principal(
            kind=str(context["kind"]),
            id=str(context["id"]),
            scopes=frozenset(Scope(s) for s in str(context["scopes"]).split()),
            customer=str(context["customer"]) if "customer" in context else None,
            expires_at=expires_at,
        )
    except (KeyError, ValueError):
        raise Unauthenticated("no authenticated caller") from None
    if principal.expires_at is not None and principal.expires_at <= now:
        raise Unauthenticated("portal token expired")
    return principal
