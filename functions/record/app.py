"""POST /v1/events and /v1/events/batch."""

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.api import record_api
from usage_meter.config import Settings
from usage_meter.logic.record import LateUsage
from usage_meter.observability import logger, metrics
from usage_meter.store.dynamodb import DynamoStore

settings = Settings.from_env()
app = record_api(
    meters=settings.meters,
    store=DynamoStore(settings.table_name, retention_days=settings.retention_days),
    late=LateUsage(settings.late_usage_policy, settings.invoice_grace_seconds),
)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)
