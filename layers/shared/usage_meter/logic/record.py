"""Accepting usage: domain validation, idempotency, and the event facts the store keeps."""

import hashlib
import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from usage_meter.errors import IdempotencyConflict, PeriodClosed, ValidationFailed
from usage_meter.logic.periods import closes_at, is_closed, period_for, rfc3339
from usage_meter.models.domain import CustomerBilling, Period, RecordResult, UsageEvent
from usage_meter.models.input import EventIn
from usage_meter.store import EventStore

# Stripe accepts timestamps up to 5 minutes ahead and 35 days back. We accept 33 days back so
# the flush has two days to deliver an old event before Stripe would refuse it.
MAX_FUTURE = timedelta(minutes=5)
MAX_AGE = timedelta(days=33)


@dataclass(frozen=True)
class LateUsage:
    """What happens to usage whose period's invoice Stripe has finalized (or is about to):
    `reject` refuses it (422 period_closed); `current_period` bills it in the current period."""

    policy: Literal["reject", "current_period"] = "reject"
    grace_seconds: int = 3600  # the invoice finalization grace period set in Stripe


DEFAULT_LATE_USAGE = LateUsage()


def event_id(customer: str, idempotency_key: str | None) -> str:
    """Keyed events get an id derived from (customer, key), so a replay hits the same item."""
    if idempotency_key is None:
        return f"ev_{uuid.uuid4().hex}"
    digest = hashlib.sha256(f"{customer}\x1f{idempotency_key}".encode()).hexdigest()
    return f"ev_{digest[:32]}"


def _fingerprint(request: EventIn) -> str:
    when = int(request.timestamp.timestamp()) if request.timestamp else None
    body = [request.stripe_customer_id, request.meter, request.quantity, when]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _problems(request: EventIn, meters: Collection[str], now: datetime) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    if request.meter not in meters:
        problems.append(
            {"field": "meter", "message": f"unknown meter; configured: {', '.join(sorted(meters))}"}
        )
    if request.timestamp is not None:
        if request.timestamp > now + MAX_FUTURE:
            problems.append({"field": "timestamp", "message": "more than 5 minutes in the future"})
        elif request.timestamp < now - MAX_AGE:
            problems.append(
                {
                    "field": "timestamp",
                    "message": f"older than {MAX_AGE.days} days; Stripe would refuse it",
                }
            )
    return problems


def _period(
    request: EventIn, billing: CustomerBilling, now: datetime, late: LateUsage
) -> Period | dict[str, Any]:
    """The period the event is billed in, or the problem when that period is closed."""
    period = period_for(billing, request.meter, request.timestamp or now)
    # Only a subscription's period has an invoice to close; a calendar month bills nothing.
    if period.source == "calendar_month" or not is_closed(period, now, late.grace_seconds):
        return period
    if late.policy == "current_period":
        return period_for(billing, request.meter, now)
    return {
        "field": "timestamp",
        "type": "period_closed",
        "message": f"the billing period {rfc3339(period.start)} to {rfc3339(period.end)} closed "
        f"at {rfc3339(closes_at(period, late.grace_seconds))}: Stripe finalizes its invoice and "
        "would not bill this usage",
    }


def _to_event(request: EventIn, now: datetime, period: Period) -> UsageEvent:
    when = request.timestamp or now
    return UsageEvent(
        id=event_id(request.stripe_customer_id, request.idempotency_key),
        customer=request.stripe_customer_id,
        meter=request.meter,
        quantity=request.quantity,
        event_time=int(when.timestamp()),
        received_at=int(now.timestamp()),
        period=period,
        idempotency_key=request.idempotency_key,
        fingerprint=_fingerprint(request),
    )


def _periods(
    requests: Sequence[EventIn], store: EventStore, now: datetime, late: LateUsage, batch: bool
) -> list[Period]:
    """Each event's billing period; raises PeriodClosed for new events in a closed period (a
    replay of a stored one still answers as a replay)."""
    billings = store.customer_billings([r.stripe_customer_id for r in requests])
    periods: list[Period] = []
    closed: dict[int, dict[str, Any]] = {}
    for index, request in enumerate(requests):
        billing = billings[request.stripe_customer_id]
        found = _period(request, billing, now, late)
        if isinstance(found, dict):
            closed[index] = found
            found = period_for(billing, request.meter, now)  # used only if it is a replay
        periods.append(found)
    if closed:
        keyed = {
            i: event_id(requests[i].stripe_customer_id, requests[i].idempotency_key)
            for i in closed
            if requests[i].idempotency_key is not None
        }
        stored = store.fingerprints(list(keyed.values())) if keyed else {}
        details = [
            {**problem, "field": _where(i, "timestamp", batch)}
            for i, problem in closed.items()
            if keyed.get(i) not in stored
        ]
        if details:
            raise PeriodClosed("usage for a closed billing period", details)
    return periods


def _where(index: int, field: str, batch: bool) -> str:
    return f"events[{index}].{field}" if batch else field


def record_events(
    requests: Sequence[EventIn],
    *,
    meters: Collection[str],
    store: EventStore,
    now: datetime,
    batch: bool = False,
    late: LateUsage = DEFAULT_LATE_USAGE,
) -> list[RecordResult]:
    """Validate every event, then store the new ones. Nothing is stored unless all are valid."""
    details = [
        {**problem, "field": _where(index, problem["field"], batch)}
        for index, request in enumerate(requests)
        for problem in _problems(request, meters, now)
    ]
    seen: dict[tuple[str, str], int] = {}
    for index, request in enumerate(requests):
        if request.idempotency_key is None:
            continue
        key = (request.stripe_customer_id, request.idempotency_key)
        first = seen.setdefault(key, index)
        if first != index:
            details.append(
                {
                    "field": _where(index, "idempotency_key", batch),
                    "message": f"repeats the idempotency key of events[{first}]",
                }
            )
    if details:
        raise ValidationFailed("the request is not valid", details)

    periods = _periods(requests, store, now, late, batch)
    events = [_to_event(r, now, p) for r, p in zip(requests, periods, strict=True)]
    # A batch checks for conflicting replays first, so a 409 stores nothing.
    keyed = [e.id for e in events if e.idempotency_key is not None]
    stored = dict(store.fingerprints(keyed)) if batch and keyed else {}
    _raise_on_conflict(events, stored, batch)
    stored.update(store.put_events([e for e in events if e.id not in stored]))
    _raise_on_conflict(events, stored, batch)
    return [RecordResult(id=e.id, duplicate=e.id in stored) for e in events]


def _raise_on_conflict(events: Sequence[UsageEvent], stored: dict[str, str], batch: bool) -> None:
    conflicts = [
        {
            "field": _where(index, "idempotency_key", batch),
            "message": "this idempotency key was used with a different body",
        }
        for index, event in enumerate(events)
        if event.id in stored and stored[event.id] != event.fingerprint
    ]
    if conflicts:
        raise IdempotencyConflict("an idempotency key was reused with a different body", conflicts)
