"""What Stripe tells the service, signed (no API authorizer: the signature is checked on the
raw body):
- POST /v1/stripe/webhook: subscription events keep customers' billing periods;
- POST /v1/stripe/events: an event destination's thin notifications of meter events Stripe
  rejected after accepting them; their units go back into the quarantine.
"""

import gc

gc.disable()  # until init_done(), the last line of init: see usage_meter.config

import base64
import json
import time
from collections.abc import Callable
from functools import lru_cache

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.billing.stripe_subscriptions import (
    ERROR_REPORT_EVENTS,
    SUBSCRIPTION_EVENTS,
    InvalidSignature,
    StripeSubscriptions,
    verify_webhook,
)
from usage_meter.config import Settings, init_done
from usage_meter.logic.rejections import handle_error_report
from usage_meter.logic.subscriptions import handle_subscription_event
from usage_meter.observability import logger, metrics
from usage_meter.secrets import Secrets
from usage_meter.store.dynamodb import DynamoStore

settings = Settings.from_env()
store = DynamoStore(settings.table_name, retention_days=settings.retention_days)
secrets = Secrets(settings)
EVENTS_PATH = "/v1/stripe/events"


def _reader() -> StripeSubscriptions:
    """The Stripe client for the current key (re-read from Secrets Manager every max_age)."""
    return _reader_for(secrets.stripe_api_key())


@lru_cache(maxsize=1)  # one client per key: warm runs reuse it until a rotation
def _reader_for(api_key: str) -> StripeSubscriptions:
    return StripeSubscriptions(
        api_key, api_base=settings.stripe_api_base, timeout_seconds=settings.stripe_timeout_seconds
    )


def _answer(status: int, body: dict) -> dict:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(body),
    }


def _verified[T](parse: Callable[[list[str]], T]) -> T:
    """`parse` with the signing secrets; once more with them fetched again if it refuses: the
    secret may have been rolled since this container fetched it."""
    try:
        return parse(secrets.stripe_webhook_secrets())
    except InvalidSignature:
        refreshed = secrets.refreshed_stripe_webhook_secrets()
        if refreshed is None:
            raise
        return parse(refreshed)


def _refused(error: InvalidSignature) -> dict:
    logger.warning("delivery refused", extra={"reason": str(error)})
    metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
    return _answer(400, {"error": {"code": "invalid_signature", "message": str(error)}})


def _notification(payload: bytes, signature: str | None) -> dict:
    reader = _reader()
    try:
        notification = _verified(lambda known: reader.notification(payload, signature, known))
    except InvalidSignature as error:
        return _refused(error)
    if notification.type not in ERROR_REPORT_EVENTS:
        return _answer(200, {"received": True, "handled": False})
    now = int(time.time())
    outcomes = handle_error_report(notification.id, reader.rejections(notification), store, now)
    if outcomes:
        metrics.add_metric(
            name="CountersQuarantined", unit=MetricUnit.Count, value=outcomes["quarantined"]
        )
    logger.info(
        "meter event errors",
        extra={"event": notification.id, "type": notification.type, "outcomes": outcomes},
    )
    return _answer(200, {"received": True, "handled": outcomes is not None})


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    body = event.get("body") or ""
    payload = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()
    headers = {k.lower(): v for k, v in (event.get("headers") or {}).items()}
    if event.get("rawPath") == EVENTS_PATH:
        return _notification(payload, headers.get("stripe-signature"))
    try:
        signature = headers.get("stripe-signature")
        stripe_event = _verified(lambda known: verify_webhook(payload, signature, known))
    except InvalidSignature as error:
        return _refused(error)
    event_id, event_type = stripe_event["id"], stripe_event["type"]
    if event_type not in SUBSCRIPTION_EVENTS:
        return _answer(200, {"received": True, "handled": False})
    now = int(time.time())
    subscription_id = stripe_event["data"]["object"]["id"]
    outcome = handle_subscription_event(
        event_id, subscription_id, reader=_reader(), store=store, now=now
    )
    lag = now - int(stripe_event["created"])
    metrics.add_metric(name="WebhookLagSeconds", unit=MetricUnit.Seconds, value=max(lag, 0))
    logger.info(
        "subscription event",
        extra={
            "event": event_id,
            "type": event_type,
            "handled": outcome.handled,
            "lag_seconds": lag,
            "sync": outcome.sync.__dict__ if outcome.sync else None,
        },
    )
    return _answer(200, {"received": True, "handled": outcome.handled})


init_done()  # last: the collector runs again, never over what init made
