"""Accepting usage: domain validation, idempotency, and the event facts the store keeps."""

import hashlib
import json
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from usage_meter.errors import IdempotencyConflict, ValidationFailed
from usage_meter.logic.periods import calendar_month
from usage_meter.models.domain import RecordResult, UsageEvent
from usage_meter.models.input import EventIn
from usage_meter.store import EventStore

# Stripe accepts timestamps up to 5 minutes ahead and 35 days back. We accept 33 days back so
# the flush has two days to deliver an old event before Stripe would refuse it.
MAX_FUTURE = timedelta(minutes=5)
MAX_AGE = timedelta(days=33)


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


def _to_event(request: EventIn, now: datetime) -> UsageEvent:
    when = request.timestamp or now
    return UsageEvent(
        id=event_id(request.stripe_customer_id, request.idempotency_key),
        customer=request.stripe_customer_id,
        meter=request.meter,
        quantity=request.quantity,
        event_time=int(when.timestamp()),
        received_at=int(now.timestamp()),
        period=calendar_month(when),
        idempotency_key=request.idempotency_key,
        fingerprint=_fingerprint(request),
    )


def _where(index: int, field: str, batch: bool) -> str:
    return f"events[{index}].{field}" if batch else field


def record_events(
    requests: Sequence[EventIn],
    *,
    meters: Collection[str],
    store: EventStore,
    now: datetime,
    batch: bool = False,
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

    events = [_to_event(request, now) for request in requests]
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
