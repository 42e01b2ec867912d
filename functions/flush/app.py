"""Scheduled: report the unreported backlog to Stripe Billing Meters."""

import gc

gc.disable()  # until init_done(), the last line of init: see usage_meter.config

import threading
import time
from collections import Counter
from functools import lru_cache

from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.billing import (
    BillingAuthError,
    BillingError,
    MeterBilling,
    PermanentBillingError,
    RateLimited,
    SendOutcome,
    TransientBillingError,
)
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.config import Settings, init_done
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.models.domain import MeterEventRequest
from usage_meter.models.output import FlushSummary
from usage_meter.observability import SERVICE, logger, metrics
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


# Stripe's errors by class, as the StripeErrors metric's ErrorClass dimension (and the alarms).
ERROR_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (RateLimited, "rate_limited"),  # 429: retried with backoff, then left for the next run
    (TransientBillingError, "unavailable"),  # 5xx, timeouts: left in flight for the next run
    (PermanentBillingError, "rejected"),  # other 4xx: the decision is quarantined
    (BillingAuthError, "auth"),  # the key is refused: the run stops
    (BillingError, "other"),
)


class _StripeCalls:
    """Billing that times every Stripe call and counts its errors by class, for the metrics.

    When Stripe refuses the key (401/403), it has the next run fetch the key again: it may have
    been rotated and the old one expired before this container's copy did."""

    def __init__(self, billing: MeterBilling) -> None:
        self._billing = billing
        self._lock = threading.Lock()  # the flush sends for several pairs at once
        self.latencies_ms: list[float] = []
        self.errors: Counter[str] = Counter()

    def send(self, request: MeterEventRequest) -> SendOutcome:
        started = time.perf_counter()
        error_class = None
        try:
            return self._billing.send(request)
        except BillingError as error:
            error_class = next(name for kind, name in ERROR_CLASSES if isinstance(error, kind))
            if isinstance(error, BillingAuthError):
                secrets.stripe_api_key_refused()
            raise
        finally:
            with self._lock:
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
                if error_class is not None:
                    self.errors[error_class] += 1


def publish(summary: FlushSummary, calls: _StripeCalls, seconds: float, left: float) -> None:
    """The run's metrics (EMF, namespace and service from the template). Every name here that
    an alarm or the dashboard uses is checked against template.yaml by
    tests/infrastructure/test_alarms.py."""
    count, seconds_unit = MetricUnit.Count, MetricUnit.Seconds
    add = metrics.add_metric
    add(name="CountersSent", unit=count, value=summary.sent)
    add(name="UnitsReported", unit=count, value=summary.units_reported)
    add(name="CountersQuarantined", unit=count, value=summary.quarantined)
    add(name="UnitsQuarantined", unit=count, value=summary.units_quarantined)
    add(name="PairsQuarantined", unit=count, value=summary.pairs_quarantined)
    add(name="CountersDeferred", unit=count, value=summary.deferred)
    add(name="BacklogCounters", unit=count, value=summary.counters_read)
    add(name="BacklogUnits", unit=count, value=summary.units_unreported)
    add(
        name="OldestUnreportedAgeSeconds",
        unit=seconds_unit,
        value=summary.oldest_unreported_seconds,
    )
    add(name="FlushErrors", unit=count, value=len(summary.errors))
    add(name="FlushStoppedEarly", unit=count, value=int(summary.stopped_early))
    add(name="FlushDurationSeconds", unit=seconds_unit, value=round(seconds, 3))
    add(name="FlushTimeLeftSeconds", unit=seconds_unit, value=round(left, 3))
    add(name="StripeCalls", unit=count, value=len(calls.latencies_ms))
    add(name="StripeErrors", unit=count, value=sum(calls.errors.values()))
    for latency in calls.latencies_ms:  # one value per call: CloudWatch computes percentiles
        metrics.add_metric(
            name="StripeCallLatency", unit=MetricUnit.Milliseconds, value=round(latency, 1)
        )
    for error_class, errors in sorted(calls.errors.items()):  # and by class, when there were
        by_class = EphemeralMetrics(service=SERVICE, namespace=metrics.namespace)
        by_class.add_dimension(name="ErrorClass", value=error_class)
        by_class.add_metric(name="StripeErrors", unit=count, value=errors)
        by_class.flush_metrics()


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    started = time.monotonic()
    calls = _StripeCalls(billing())
    flusher = Flusher(
        store,
        calls,
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
        policy=policy,
    )
    summary = flusher.run()
    logger.info("flush finished", extra={"summary": summary.model_dump()})
    publish(
        summary,
        calls,
        seconds=time.monotonic() - started,
        left=context.get_remaining_time_in_millis() / 1000,
    )
    if summary.errors:
        raise FlushIncomplete(f"{len(summary.errors)} error(s); first: {summary.errors[0]}")
    return summary.model_dump()


init_done()  # last: the collector runs again, never over what init made
