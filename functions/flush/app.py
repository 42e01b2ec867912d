"""Scheduled: report the unreported backlog to Stripe Billing Meters."""

from functools import cache

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.config import Settings
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.observability import logger, metrics
from usage_meter.secrets import stripe_api_key
from usage_meter.store.dynamodb import DynamoStore

settings = Settings.from_env()
store = DynamoStore(settings.table_name, retention_days=settings.retention_days)
_RETRIES = 2
# Keep enough time for one Stripe call with all its retries before the Lambda deadline.
policy = FlushPolicy(reserve_seconds=settings.stripe_timeout_seconds * (_RETRIES + 1) + 15)


class FlushIncomplete(RuntimeError):
    """Raised after logging, so the invocation counts as failed and the alarm sees it."""


@cache  # once per container, on the first run: warm runs reuse its connections
def billing() -> StripeMeterBilling:
    return StripeMeterBilling(
        stripe_api_key(settings),
        api_base=settings.stripe_api_base,
        timeout_seconds=settings.stripe_timeout_seconds,
        max_network_retries=_RETRIES,
        max_requests_per_second=settings.stripe_max_requests_per_second,
    )


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    flusher = Flusher(
        store,
        billing(),
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
        policy=policy,
    )
    summary = flusher.run()
    logger.info("flush finished", extra={"summary": summary.model_dump()})
    metrics.add_metric(name="GroupsSent", unit=MetricUnit.Count, value=summary.groups_sent)
    metrics.add_metric(name="EventsReported", unit=MetricUnit.Count, value=summary.events_reported)
    metrics.add_metric(
        name="GroupsQuarantined", unit=MetricUnit.Count, value=summary.groups_quarantined
    )
    metrics.add_metric(name="GroupsDeferred", unit=MetricUnit.Count, value=summary.groups_deferred)
    if summary.errors:
        raise FlushIncomplete(f"{len(summary.errors)} error(s); first: {summary.errors[0]}")
    return summary.model_dump()
