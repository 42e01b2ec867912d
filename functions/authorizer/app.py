"""The HTTP API's Lambda REQUEST authorizer (payload 2.0, simple responses).

Unknown, malformed, revoked or expired credentials: 401. A valid credential without the
route's scope, or a portal token for another customer: 403.
"""

import time

from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.config import Settings
from usage_meter.logic.auth import Forbidden, Unauthenticated, decide, to_context
from usage_meter.observability import logger
from usage_meter.secrets import portal_token_secret
from usage_meter.store.dynamodb import DynamoStore

settings = Settings.from_env()
keys = DynamoStore(settings.table_name)


@logger.inject_lambda_context
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    route_key = event.get("routeKey", "")
    try:
        principal = decide(
            (event.get("headers") or {}).get("authorization"),
            route_key,
            (event.get("pathParameters") or {}).get("stripe_customer_id"),
            keys=keys,
            token_secret=portal_token_secret(settings),
            now=int(time.time()),
        )
    except Unauthenticated as error:
        logger.info("unauthenticated", extra={"route": route_key, "reason": error.message})
        # API Gateway's convention: this exact message makes it answer 401.
        raise Exception("Unauthorized") from None
    except Forbidden as error:
        logger.info("forbidden", extra={"route": route_key, "reason": error.message})
        return {"isAuthorized": False}
    logger.info(
        "authorized", extra={"route": route_key, "kind": principal.kind, "id": principal.id}
    )
    return {"isAuthorized": True, "context": to_context(principal)}
