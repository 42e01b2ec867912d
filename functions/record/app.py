"""POST /v1/events and /v1/events/batch."""

from __future__ import annotations

import gc

gc.disable()  # until init_done(), the last line of init: see usage_meter.config

import random
from typing import TYPE_CHECKING

from aws_lambda_powertools.logging import correlation_paths

from usage_meter.api import record_api
from usage_meter.config import Settings, init_done, on_snap_start
from usage_meter.logic.record import LateUsage
from usage_meter.models import build_imported_models
from usage_meter.observability import logger, metrics
from usage_meter.store.dynamodb import DynamoStore

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

settings = Settings.from_env()
# The store's randomness (the shard a contended counter moves to, retry jitter): re-seeded after
# a SnapStart restore, or every restored environment would draw the same numbers.
rng = random.Random()
app = record_api(
    meters=settings.meters,
    store=DynamoStore(settings.table_name, retention_days=settings.retention_days, rng=rng),
    late=LateUsage(settings.late_usage_policy, settings.invoice_grace_seconds),
)
on_snap_start(before_snapshot=build_imported_models, after_restore=rng.seed)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)


init_done()  # last: the collector runs again, never over what init made
