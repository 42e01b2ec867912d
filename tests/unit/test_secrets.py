"""Secrets with a TTL: the cache, the rotation rules for portal tokens, the Stripe key."""

import pytest

from usage_meter.config import ConfigError, Settings
from usage_meter.logic.auth import MAX_TOKEN_TTL
from usage_meter.secrets import (
    CURRENT,
    PREVIOUS,
    REFRESH_INTERVAL,
    RETRY_AFTER_ERROR,
    SIGNING_DELAY,
    SecretCache,
    Secrets,
    SecretVersion,
)

T0 = 1_796_000_000.0
MAX_AGE = 300.0
PORTAL, STRIPE = "portal-secret", "stripe-secret"
DEPLOYED = Settings.from_env(
    {
        "TABLE_NAME": "usage",
        "METERS": '{"ai_messages": {}}',
        "PORTAL_TOKEN_SECRET_NAME": PORTAL,
        "STRIPE_API_KEY_SECRET": STRIPE,
    }
)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSecretsManager:
    """Secrets Manager's staging labels in memory: a put makes the new value AWSCURRENT and
    the one before AWSPREVIOUS. Counts the fetches; can be made unreachable."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.stages: dict[str, dict[str, SecretVersion]] = {}
        self.fetches: list[tuple[str, str]] = []
        self.unreachable = False

    def put(self, secret_id: str, value: str) -> None:
        stages = self.stages.setdefault(secret_id, {})
        if CURRENT in stages:
            stages[PREVIOUS] = stages[CURRENT]
        stages[CURRENT] = SecretVersion(value, created=self.clock())

    def __call__(self, secret_id: str, stage: str) -> SecretVersion | None:
        self.fetches.append((secret_id, stage))
        if self.unreachable:
            raise ConnectionError("Secrets Manager unreachable")
        return self.stages.get(secret_id, {}).get(stage)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(clock: Clock) -> FakeSecretsManager:
    manager = FakeSecretsManager(clock)
    manager.put(PORTAL, "portal-v1")
    manager.put(STRIPE, "sk_test_v1")
    return manager


@pytest.fixture
def cache(manager: FakeSecretsManager, clock: Clock) -> SecretCache:
    return SecretCache(manager, max_age=MAX_AGE, clock=clock)


@pytest.fixture
def secrets(cache: SecretCache) -> Secrets:
    return Secrets(DEPLOYED, cache)


def value(version: SecretVersion | None) -> str | None:
    return None if version is None else version.value


# -- the cache --------------------------------------------------------------------------------


def test_a_cached_secret_is_served_without_fetching_within_max_age(cache, manager, clock):
    # Given a secret fetched once, then rotated
    cache.get(STRIPE)
    manager.put(STRIPE, "sk_test_v2")
    # When it is asked for again just before max_age has passed
    clock.advance(MAX_AGE - 1)
    answer = cache.get(STRIPE)
    # Then the cached value answers and Secrets Manager was asked once
    assert value(answer) == "sk_test_v1" and manager.fetches == [(STRIPE, CURRENT)]


def test_a_rotated_secret_is_fetched_once_max_age_has_passed(cache, manager, clock):
    # Given a secret fetched once, then rotated
    cache.get(STRIPE)
    manager.put(STRIPE, "sk_test_v2")
    # When max_age has passed
    clock.advance(MAX_AGE)
    # Then the same cache answers the new value
    assert value(cache.get(STRIPE)) == "sk_test_v2"


def test_an_expired_secret_is_fetched_again_right_away(cache, manager):
    # Given a secret fetched, rotated, and expired on purpose (Stripe refused it)
    cache.get(STRIPE)
    manager.put(STRIPE, "sk_test_v2")
    assert cache.expire(STRIPE) is True
    # When it is asked for again, no time later / Then the new value answers
    assert value(cache.get(STRIPE)) == "sk_test_v2"


def test_expiring_a_secret_fetched_moments_ago_is_refused(cache, manager, clock):
    # Given a secret fetched less than the rate limit ago
    cache.get(PORTAL)
    clock.advance(REFRESH_INTERVAL - 1)
    # When something asks to expire it unless younger than that limit
    expired = cache.expire(PORTAL, unless_younger_than=REFRESH_INTERVAL)
    # Then nothing is fetched again
    cache.get(PORTAL)
    assert expired is False and manager.fetches == [(PORTAL, CURRENT)]


def test_a_stage_that_no_version_has_is_none(cache):
    # Given a secret never rotated / When its previous version is asked for / Then none
    assert cache.get(PORTAL, PREVIOUS) is None


def test_an_unreachable_secrets_manager_leaves_the_cached_value_in_use_for_a_while(
    cache, manager, clock
):
    # Given a cached secret whose max_age has passed while Secrets Manager is unreachable
    cache.get(STRIPE)
    manager.unreachable = True
    clock.advance(MAX_AGE)
    # When it is asked for, and again a little later
    first = cache.get(STRIPE)
    clock.advance(RETRY_AFTER_ERROR - 1)
    second = cache.get(STRIPE)
    # Then the old value answers both times, and only the first one tried to fetch
    assert value(first) == value(second) == "sk_test_v1"
    assert manager.fetches == [(STRIPE, CURRENT), (STRIPE, CURRENT)]


def test_an_unreachable_secrets_manager_with_nothing_cached_raises(cache, manager):
    # Given a cold container and Secrets Manager down / When a secret is asked for / Then raise
    manager.unreachable = True
    with pytest.raises(ConnectionError):
        cache.get(STRIPE)


# -- portal tokens ----------------------------------------------------------------------------


def test_before_any_rotation_one_portal_secret_is_accepted(secrets):
    assert secrets.portal_token_secrets() == [b"portal-v1"]


def test_after_a_rotation_tokens_signed_with_the_previous_secret_are_accepted(secrets, manager):
    # Given the portal secret rotated
    manager.put(PORTAL, "portal-v2")
    # When a container fetches it
    accepted = secrets.portal_token_secrets()
    # Then the new secret comes first and the previous one is still accepted
    assert accepted == [b"portal-v2", b"portal-v1"]


def test_the_previous_portal_secret_is_accepted_until_tokens_signed_with_it_expired(
    secrets, manager, clock
):
    # Given a rotation; the longest token signed with the old secret can be issued by a
    # container that has not fetched the new one yet, up to max_age after the rotation
    manager.put(PORTAL, "portal-v2")
    last_token_expiry = MAX_TOKEN_TTL + MAX_AGE
    # When a container looks at the secrets then
    clock.advance(last_token_expiry)
    # Then the previous secret is still accepted
    assert secrets.portal_token_secrets() == [b"portal-v2", b"portal-v1"]


def test_the_previous_portal_secret_is_refused_once_the_new_one_is_a_day_old(
    secrets, manager, clock
):
    # Given a rotation, and a day plus max_age plus the margin later
    manager.put(PORTAL, "portal-v2")
    clock.advance(MAX_TOKEN_TTL + MAX_AGE + 300)
    # When a container looks at the secrets / Then only the new one is accepted (a leaked
    # old secret stops working)
    assert secrets.portal_token_secrets() == [b"portal-v2"]


def test_a_portal_token_signed_with_a_just_rotated_secret_refreshes_a_stale_container(
    secrets, manager, clock
):
    # Given a container that fetched the secret before a rotation, the rate limit ago
    secrets.portal_token_secrets()
    manager.put(PORTAL, "portal-v2")
    clock.advance(REFRESH_INTERVAL)
    # When a token matched none of its secrets / Then it gets the rotated ones to try
    assert secrets.refreshed_portal_token_secrets() == [b"portal-v2", b"portal-v1"]


def test_refused_tokens_refresh_the_portal_secret_at_most_every_30_seconds(secrets, manager, clock):
    # Given a container that refreshed its secret after a refused token
    secrets.portal_token_secrets()
    clock.advance(REFRESH_INTERVAL)
    secrets.refreshed_portal_token_secrets()
    fetches = len(manager.fetches)
    # When forged tokens keep coming within the next 30 s
    clock.advance(REFRESH_INTERVAL - 1)
    answers = [secrets.refreshed_portal_token_secrets() for _ in range(100)]
    # Then none of them makes it fetch again
    assert answers == [None] * 100 and len(manager.fetches) == fetches


def test_a_refresh_that_finds_the_same_secrets_says_so(secrets, clock):
    # Given no rotation / When a refused token refreshes the secrets / Then there is no retry
    secrets.portal_token_secrets()
    clock.advance(REFRESH_INTERVAL)
    assert secrets.refreshed_portal_token_secrets() is None


def test_a_new_portal_secret_signs_tokens_only_once_verifiers_can_have_it(secrets, manager, clock):
    # Given a rotation
    manager.put(PORTAL, "portal-v2")
    # When tokens are issued right after it, and SIGNING_DELAY later (in a fresh container)
    right_after = secrets.portal_token_signing_secret()
    clock.advance(SIGNING_DELAY)
    later = Secrets(DEPLOYED, SecretCache(manager, clock=clock))
    # Then the first is signed with the previous secret, the second with the new one
    assert right_after == b"portal-v1" and later.portal_token_signing_secret() == b"portal-v2"


def test_locally_the_portal_secret_comes_from_the_environment_and_never_rotates(manager):
    # Given PORTAL_TOKEN_SECRET set, as in local runs and tests
    settings = Settings.from_env(
        {"TABLE_NAME": "usage", "METERS": '{"m": {}}', "PORTAL_TOKEN_SECRET": "local"}
    )
    secrets = Secrets(settings, SecretCache(manager))
    # When the secrets are asked for / Then the one local secret answers, with no fetch
    assert secrets.portal_token_signing_secret() == b"local"
    assert secrets.portal_token_secrets() == [b"local"]
    assert secrets.refreshed_portal_token_secrets() is None and manager.fetches == []


# -- the Stripe key ---------------------------------------------------------------------------


def test_a_refused_stripe_key_is_fetched_again_on_next_use(secrets, manager):
    # Given a key in use, then rotated in Secrets Manager
    assert secrets.stripe_api_key() == "sk_test_v1"
    manager.put(STRIPE, "sk_test_v2")
    # When Stripe refuses the old key
    secrets.stripe_api_key_refused()
    # Then the next use fetches the new one, max_age or not
    assert secrets.stripe_api_key() == "sk_test_v2"


# -- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_age", ["0", "-5", "3601", "soon"])
def test_a_secrets_max_age_outside_0_to_an_hour_is_a_config_error(max_age):
    env = {"TABLE_NAME": "usage", "METERS": '{"m": {}}', "SECRETS_MAX_AGE_SECONDS": max_age}
    with pytest.raises(ConfigError, match="secrets_max_age_seconds"):
        Settings.from_env(env)


def test_the_secrets_max_age_defaults_to_five_minutes_and_sets_the_cache():
    base = {"TABLE_NAME": "usage", "METERS": '{"m": {}}'}
    assert Secrets(Settings.from_env(base)).cache.max_age == 300
    custom = Settings.from_env({**base, "SECRETS_MAX_AGE_SECONDS": "60"})
    assert Secrets(custom).cache.max_age == 60
