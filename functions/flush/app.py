"""Scheduled: report the unreported backlog to Stripe Billing Meters."""

from functools import lru_cache

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.billing import BillingAuthError, MeterBilling, SendOutcome
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.config import Settings
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.models.domain import MeterEventRequest
from usage_meter.observability import logger, metrics
from usage_meter.secrets import Secrets
from usage_meter.store.dynamodb import DynamoStore

settings = Settings.from_env()
store = DynamoStore(settings.table_name, retention_days=settings.retention_days)
secrets = Secrets(settings)
_RETRIES = 2
# Keep enough time for one Stripe call with all its retries before the Lambda deadline.
policy = FlushPolicy(reserve_seconds=settings.stripe_timeout_seconds * (_RETRIES + 1) + 15)


class FlushIncomplete(RuntimeError):
    """Raised after logging, so the invocation counts as failed and the alarm sees it."""


def billing() -> StripeMeterBilling:
    """The Stripe client for the current key (re-read from Secrets Manager every max_age)."""
    return _billing_for(secrets.stripe_api_key())


@lru_cache(maxsize=1)  # one client per key: warm runs reuse its connections until a rotation
def _billing_for(api_key: str) -> StripeMeterBilling:
    return StripeMeterBilling(
        api_key,
        api_base=settings.stripe_api_base,
        timeout_seconds=settings.stripe_timeout_seconds,
        max_network_retries=_RETRIES,
        max_requests_per_second=settings.stripe_max_requests_per_second,
    )


class _RefetchRefusedKey:
    """Billing that, when Stripe refuses the key (401/403), has the next run fetch it again:
    it may have been rotated and the old one expired before this container's copy did."""

    def __init__(self, billing: MeterBilling) -> None:
        self._billing = billing

    def send(self, request: MeterEventRequest) -> SendOutcome:
        try:
            return self._billing.send(request)
        except BillingAuthError:
            secrets.stripe_api_key_refused()
            raise


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    flusher = Flusher(
        store,
        _RefetchRefusedKey(billing()),
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
        policy=policy,
    )
    summary = flusher.run()
    logger.info("flush finished", extra={"summary": summary.model_dump()})
    metrics.add_metric(name="CountersSent", unit=MetricUnit.Count, value=summary.sent)
    metrics.add_metric(name="UnitsReported", unit=MetricUnit.Count, value=summary.units_reported)
    metrics.add_metric(name="CountersQuarantined", unit=MetricUnit.Count, value=summary.quarantined)
    metrics.add_metric(name="CountersDeferred", unit=MetricUnit.Count, value=summary.deferred)
    if summary.errors:
        raise FlushIncomplete(f"{len(summary.errors)} error(s); first: {summary.errors[0]}")
    return summary.model_dump()
