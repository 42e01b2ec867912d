"""Secrets: from the environment locally (no rotation), from Secrets Manager deployed.

Deployed, each container keeps what it fetched for `SECRETS_MAX_AGE_SECONDS` (default 5 min)
and then fetches it again, so a rotated secret reaches warm containers without a cold start.
The only Secrets Manager action used is GetSecretValue, the one the functions are granted.
Nothing here logs a secret's value.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError

from usage_meter import aws
from usage_meter.config import ConfigError, Settings
from usage_meter.logic.auth import MAX_TOKEN_TTL
from usage_meter.observability import logger

CURRENT, PREVIOUS = "AWSCURRENT", "AWSPREVIOUS"
# A verifier fetches the portal secret again on a token it refuses at most this often, so
# forged tokens cannot make every request call Secrets Manager.
REFRESH_INTERVAL = 30.0
# Issuers sign with a new portal secret only once it is this old: by then every verifier's
# copy of the old one is older than REFRESH_INTERVAL, so the first such token refreshes it.
SIGNING_DELAY = 60.0
# When Secrets Manager cannot be reached, the value fetched before keeps answering this long.
RETRY_AFTER_ERROR = 30.0
# Stripe signs with both secrets while a roll overlaps (up to a day): the previous version
# stays accepted that long after a rotation.
WEBHOOK_SECRET_OVERLAP = 24 * 3600.0
# Covers SIGNING_DELAY and clock differences between containers and Secrets Manager.
_GRACE_MARGIN = 300.0
# The authorizer has 5 s: give up on a slow Secrets Manager rather than time out.
_CLIENT_CONFIG = Config(
    connect_timeout=2, read_timeout=2, retries={"mode": "standard", "max_attempts": 2}
)


@dataclass(frozen=True)
class SecretVersion:
    value: str = field(repr=False)
    created: float  # the version's CreatedDate, Unix seconds


# (secret id, stage) → that version, or None when no version has that stage
Fetch = Callable[[str, str], SecretVersion | None]


class SecretsManagerFetch:
    """GetSecretValue through one botocore client, created on first use (the cache's lock
    makes that once)."""

    def __init__(self) -> None:
        self._client: Any = None

    def __call__(self, secret_id: str, stage: str) -> SecretVersion | None:
        if self._client is None:
            self._client = aws.client("secretsmanager", _CLIENT_CONFIG)
        try:
            answer = self._client.get_secret_value(SecretId=secret_id, VersionStage=stage)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return None  # no version has this stage (AWSPREVIOUS before any rotation)
            raise
        return SecretVersion(str(answer["SecretString"]).strip(), answer["CreatedDate"].timestamp())


@dataclass
class _Entry:
    """One secret's stages, fetched within one max_age and expiring together, so a cached
    AWSPREVIOUS is never older than the AWSCURRENT beside it."""

    fetched_at: float
    expires_at: float
    versions: dict[str, SecretVersion | None] = field(default_factory=dict)


class SecretCache:
    """Secret versions by (secret id, stage), fetched again once `max_age` seconds passed.

    Thread-safe; fetches happen under the lock, so a container never fetches a secret twice
    at once. `clock` (Unix seconds) is injectable for tests.
    """

    def __init__(
        self,
        fetch: Fetch | None = None,
        *,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_age = max_age
        self.clock = clock
        self._fetch = fetch or SecretsManagerFetch()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, secret_id: str, stage: str = CURRENT) -> SecretVersion | None:
        with self._lock:
            now = self.clock()
            cached = self._entries.get(secret_id)
            live = cached if cached is not None and now < cached.expires_at else None
            if live is not None and stage in live.versions:
                return live.versions[stage]
            entry = live or _Entry(fetched_at=now, expires_at=now + self.max_age)
            try:
                version = self._fetch(secret_id, stage)
            except Exception as error:
                if live is not None or cached is None or stage not in cached.versions:
                    raise
                # An outage should not take down what worked a moment ago: keep the old
                # value a little longer and try again then.
                logger.warning(
                    "secret unreachable; using the version fetched before",
                    extra={"secret_id": secret_id, "stage": stage, "error": type(error).__name__},
                )
                cached.fetched_at, cached.expires_at = now, now + RETRY_AFTER_ERROR
                return cached.versions[stage]
            entry.versions[stage] = version
            self._entries[secret_id] = entry
            return version

    def expire(self, secret_id: str, *, unless_younger_than: float = 0.0) -> bool:
        """Make the next `get` fetch `secret_id` again, unless it was fetched less than
        `unless_younger_than` seconds ago (a rate limit). Whether it did. The old versions
        still answer if that fetch fails."""
        with self._lock:
            now = self.clock()
            cached = self._entries.get(secret_id)
            if cached is None or now - cached.fetched_at < unless_younger_than:
                return False
            cached.expires_at = now
            return True


class Secrets:
    """The service's secrets, as one container sees them."""

    def __init__(self, settings: Settings, cache: SecretCache | None = None) -> None:
        self._settings = settings
        self.cache = cache or SecretCache(max_age=settings.secrets_max_age_seconds)

    # -- Stripe ------------------------------------------------------------------------------

    def stripe_api_key(self) -> str:
        if self._settings.stripe_api_key is not None:
            return self._settings.stripe_api_key.get_secret_value()
        if self._settings.stripe_api_key_secret is None:
            raise ConfigError("set STRIPE_API_KEY or STRIPE_API_KEY_SECRET")
        return self._current(self._settings.stripe_api_key_secret).value

    def stripe_api_key_refused(self) -> None:
        """Stripe refused the key: fetch it again next time, it may have been rotated."""
        if self._settings.stripe_api_key is None and self._settings.stripe_api_key_secret:
            self.cache.expire(self._settings.stripe_api_key_secret)

    # -- Stripe webhooks ---------------------------------------------------------------------

    def stripe_webhook_secrets(self) -> list[str]:
        """The endpoint's signing secrets: AWSCURRENT (it may list several, comma-separated,
        while a roll overlaps), and AWSPREVIOUS for a day after a rotation."""
        if self._settings.stripe_webhook_secret is not None:
            return _split(self._settings.stripe_webhook_secret.get_secret_value())
        name = self._webhook_secret_name()
        current = self._current(name)
        accepted = _split(current.value)
        if self._age(current) < WEBHOOK_SECRET_OVERLAP:
            previous = self.cache.get(name, PREVIOUS)
            if previous is not None:
                accepted += [s for s in _split(previous.value) if s not in accepted]
        return accepted

    def refreshed_stripe_webhook_secrets(self) -> list[str] | None:
        """After a delivery matched none of the secrets: the secrets fetched again, if they
        changed; None if not, or if fetched less than REFRESH_INTERVAL seconds ago."""
        if self._settings.stripe_webhook_secret is not None:
            return None
        before = self.stripe_webhook_secrets()
        if not self.cache.expire(self._webhook_secret_name(), unless_younger_than=REFRESH_INTERVAL):
            return None
        after = self.stripe_webhook_secrets()
        return after if after != before else None

    def _webhook_secret_name(self) -> str:
        if self._settings.stripe_webhook_secret_name is None:
            raise ConfigError("set STRIPE_WEBHOOK_SECRET or STRIPE_WEBHOOK_SECRET_NAME")
        return self._settings.stripe_webhook_secret_name

    # -- portal tokens -----------------------------------------------------------------------

    def portal_token_signing_secret(self) -> bytes:
        """The secret new portal tokens are signed with: AWSCURRENT, or AWSPREVIOUS for the
        first SIGNING_DELAY seconds after a rotation (see there)."""
        if self._settings.portal_token_secret is not None:
            return self._settings.portal_token_secret.get_secret_value().encode()
        name = self._portal_token_secret_name()
        current = self._current(name)
        if self._age(current) < SIGNING_DELAY:
            previous = self.cache.get(name, PREVIOUS)
            if previous is not None:
                return previous.value.encode()
        return current.value.encode()

    def portal_token_secrets(self) -> list[bytes]:
        """The secrets a portal token may be signed with: AWSCURRENT, and AWSPREVIOUS while
        tokens signed with it may still be unexpired: until AWSCURRENT is older than the
        longest token life, plus max_age (issuers that had not fetched the new secret yet),
        plus a margin."""
        if self._settings.portal_token_secret is not None:
            return [self._settings.portal_token_secret.get_secret_value().encode()]
        name = self._portal_token_secret_name()
        current = self._current(name)
        accepted = [current.value.encode()]
        if self._age(current) < MAX_TOKEN_TTL + self.cache.max_age + _GRACE_MARGIN:
            previous = self.cache.get(name, PREVIOUS)
            if previous is not None:
                accepted.append(previous.value.encode())
        return accepted

    def refreshed_portal_token_secrets(self) -> list[bytes] | None:
        """After a portal token matched none of `portal_token_secrets()`: the secrets fetched
        again, if they changed (the token may be signed with a secret rotated since); None if
        they did not, or were fetched less than REFRESH_INTERVAL seconds ago."""
        if self._settings.portal_token_secret is not None:
            return None
        before = self.portal_token_secrets()
        name = self._portal_token_secret_name()
        if not self.cache.expire(name, unless_younger_than=REFRESH_INTERVAL):
            return None
        after = self.portal_token_secrets()
        return after if after != before else None

    def _portal_token_secret_name(self) -> str:
        if self._settings.portal_token_secret_name is None:
            raise ConfigError("set PORTAL_TOKEN_SECRET or PORTAL_TOKEN_SECRET_NAME")
        return self._settings.portal_token_secret_name

    def _current(self, secret_id: str) -> SecretVersion:
        version = self.cache.get(secret_id, CURRENT)
        if version is None:
            raise ConfigError(f"secret {secret_id} has no {CURRENT} version")
        return version

    def _age(self, version: SecretVersion) -> float:
        return self.cache.clock() - version.created


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
