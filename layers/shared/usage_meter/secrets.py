"""Secrets: from the environment locally, from Secrets Manager deployed (once per container)."""

from functools import cache
from typing import Any

import botocore.session

from usage_meter.config import ConfigError, Settings


def stripe_api_key(settings: Settings) -> str:
    if settings.stripe_api_key is not None:
        return settings.stripe_api_key.get_secret_value()
    if settings.stripe_api_key_secret is None:
        raise ConfigError("set STRIPE_API_KEY or STRIPE_API_KEY_SECRET")
    return _secret_string(settings.stripe_api_key_secret)


def portal_token_secret(settings: Settings) -> bytes:
    if settings.portal_token_secret is not None:
        return settings.portal_token_secret.get_secret_value().encode()
    if settings.portal_token_secret_name is None:
        raise ConfigError("set PORTAL_TOKEN_SECRET or PORTAL_TOKEN_SECRET_NAME")
    return _secret_string(settings.portal_token_secret_name).encode()


@cache  # once per container: a rotated key is picked up by the next cold start
def _secret_string(secret_id: str) -> str:
    client: Any = botocore.session.get_session().create_client("secretsmanager")
    return str(client.get_secret_value(SecretId=secret_id)["SecretString"]).strip()
