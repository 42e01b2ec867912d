"""The HTTP API's Lambda REQUEST authorizer (payload 2.0, simple responses): who is calling.

It only authenticates, so its answer depends on the Authorization header alone, the one identity
source API Gateway caches it by. A credential it cannot authenticate is let through as an
anonymous caller, and the function answers 401 in the API's error format: an HTTP API has no
other way to a 401 (isAuthorized false is 403, a raised error is 500). Scopes and the customer
a portal token may read are checked by the function, per request, never from a cached answer.
It raises only when it cannot decide (the table or the secret is unreachable): API Gateway
answers 500, caches nothing, and the error alarm sees it.
"""

import time

from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.config import Settings
from usage_meter.logic.auth import Unauthenticated, anonymous_context, identify, to_context
from usage_meter.observability import logger
from usage_meter.secrets import portal_token_secret
from usage_meter.store.dynamodb import DynamoStore

settings = Settings.from_env()
keys = DynamoStore(settings.table_name)


@logger.inject_lambda_context
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    try:
        principal = identify(
            (event.get("headers") or {}).get("authorization"),
            keys=keys,
            token_secret=portal_token_secret(settings),
            now=int(time.time()),
        )
    except Unauthenticated as error:
        logger.info("unauthenticated", extra={"reason": error.message})
        return {"isAuthorized": True, "context": anonymous_context(error.message)}
    logger.info("authenticated", extra={"kind": principal.kind, "id": principal.id})
    return {"isAuthorized": True, "context": to_context(principal)}
