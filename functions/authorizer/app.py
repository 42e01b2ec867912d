"""The HTTP API's Lambda REQUEST authorizer (payload 2.0, simple responses): who is calling.

It only authenticates, so its answer depends on the Authorization header alone, the one identity
source API Gateway caches it by. A credential it cannot authenticate is let through as an
anonymous caller, and the function answers 401 in the API's error format: an HTTP API has no
other way to a 401 (isAuthorized false is 403, a raised error is 500). Scopes and the customer
a portal token may read are checked by the function, per request, never from a cached answer.
It raises only when it cannot decide (the table or the secret is unreachable): API Gateway
answers 500, caches nothing, and the error alarm sees it. Before it refuses a portal token, it
fetches the token secret again (at most every 30 s): the secret may have just been rotated.
"""

from __future__ import annotations

import gc

gc.disable()  # until init_done(), the last line of init: see usage_meter.config

import random
import time
from typing import TYPE_CHECKING

from usage_meter.config import Settings, init_done, on_snap_start
from usage_meter.logic.auth import (
    TOKEN_PREFIX,
    Unauthenticated,
    anonymous_context,
    bearer,
    identify,
    to_context,
)
from usage_meter.models import build_imported_models
from usage_meter.observability import logger
from usage_meter.secrets import Secrets
from usage_meter.store.dynamodb import DynamoStore

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

    from usage_meter.models.auth import Principal

settings = Settings.from_env()
rng = random.Random()  # the store's retry jitter: re-seeded after a SnapStart restore
keys = DynamoStore(settings.table_name, rng=rng)
secrets = Secrets(settings)
on_snap_start(before_snapshot=build_imported_models, after_restore=rng.seed)


@logger.inject_lambda_context
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    try:
        principal = _identify((event.get("headers") or {}).get("authorization"), int(time.time()))
    except Unauthenticated as error:
        logger.info("unauthenticated", extra={"reason": error.message})
        return {"isAuthorized": True, "context": anonymous_context(error.message)}
    logger.info("authenticated", extra={"kind": principal.kind, "id": principal.id})
    return {"isAuthorized": True, "context": to_context(principal)}


def _identify(authorization: str | None, now: int) -> Principal:
    try:
        # The portal secret is fetched for a portal token only: a server key never waits for it.
        return identify(
            authorization, keys=keys, token_secrets=secrets.portal_token_secrets, now=now
        )
    except Unauthenticated:
        if not _portal_token(authorization):
            raise
        # The token may be signed with a secret rotated after this container fetched it, and
        # API Gateway would cache a refusal for minutes: fetch again (rate-limited), retry once.
        refreshed = secrets.refreshed_portal_token_secrets()
        if refreshed is None:
            raise
        return identify(authorization, keys=keys, token_secrets=refreshed, now=now)


def _portal_token(authorization: str | None) -> bool:
    try:
        return bearer(authorization).startswith(TOKEN_PREFIX)
    except Unauthenticated:
        return False


init_done()  # last: the collector runs again, never over what init made
