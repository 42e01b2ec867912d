"""Who is calling: server keys for apps, portal tokens for one customer's usage page."""

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class Scope(StrEnum):
    RECORD = "record"
    READ = "read"
    ADMIN = "admin"  # every scope


class ApiKey(BaseModel):
    """A server key as stored: the secret itself is never kept, only its hash."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    key_id: str
    name: str
    scopes: frozenset[Scope]
    secret_hash: str
    created_at: int
    revoked_at: int | None = None


class Principal(BaseModel):
    """An authenticated caller, as the authorizer hands it to the functions."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    kind: str  # "key" or "portal"
    id: str  # key id, or the customer a portal token is for
    scopes: frozenset[Scope]
    customer: str | None = None  # portal tokens only: the one customer they may read
    expires_at: int | None = None

    def allows(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes
