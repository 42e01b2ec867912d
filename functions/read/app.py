"""GET /v1/customers/{stripe_customer_id}/usage and POST /v1/portal-tokens."""

from __future__ import annotations

import gc

gc.disable()  # until init_done(), the last line of init: see usage_meter.config

import random
from typing import TYPE_CHECKING

from aws_lambda_powertools.logging import correlation_paths

from usage_meter.api import read_api
from usage_meter.config import Settings, init_done, on_snap_start
from usage_meter.models import build_imported_models
from usage_meter.observability import logger
from usage_meter.secrets import Secrets
from usage_meter.store.dynamodb import DynamoStore

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

settings = Settings.from_env()
secrets = Secrets(settings)
rng = random.Random()  # the store's retry jitter: re-seeded after a SnapStart restore
app = read_api(
    included={name: meter.included for name, meter in settings.meters.items()},
    store=DynamoStore(settings.table_name, rng=rng),
    token_secret=secrets.portal_token_signing_secret,  # fetched when a token is first issued
    portal_origins=settings.portal_origins,
)
on_snap_start(before_snapshot=build_imported_models, after_restore=rng.seed)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)


init_done()  # last: the collector runs again, never over what init made
