"""The service's own vocabulary: events as stored facts, periods, batches sent to Stripe."""

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict

PeriodSource = Literal["calendar_month", "subscription"]


class Period(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: datetime
    end: datetime
    source: PeriodSource = "calendar_month"

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


class UsageEvent(BaseModel):
    """An accepted event, as the store keeps it."""

    model_config = ConfigDict(frozen=True)

    id: str
    customer: str
    meter: str
    quantity: int
    event_time: int  # Unix seconds: Stripe's own resolution
    received_at: int
    period: Period
    idempotency_key: str | None
    fingerprint: str  # what "the same body" means for a replay


class RecordResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    duplicate: bool


class MeterTotals(BaseModel):
    """One period counter: everything accepted, and the part Stripe has confirmed."""

    model_config = ConfigDict(frozen=True)

    meter: str
    quantity: int = 0
    reported: int = 0


class BacklogEvent(BaseModel):
    """An unreported event, as the flush reads it from the sparse index."""

    model_config = ConfigDict(frozen=True)

    id: str
    customer: str
    meter: str
    quantity: int
    event_time: int
    period_start: str


class BatchState(StrEnum):
    PLANNED = "planned"
    CLAIMED = "claimed"
    REPORTED = "reported"
    QUARANTINED = "quarantined"
    EMPTY = "empty"  # every planned event went to a concurrent run's batch


class Batch(BaseModel):
    """One Stripe meter event's worth of usage: a (customer, meter, period, hour) group."""

    model_config = ConfigDict(frozen=True)

    id: str
    identifier: str  # the Stripe identifier; a replay after quarantine gets a fresh one
    customer: str
    meter: str
    period_start: str
    hour: int  # Unix seconds of the hour the events fall in
    state: BatchState
    event_ids: tuple[str, ...]
    quantity: int  # planned total, final once claimed
    timestamp: int  # an event time inside the group, sent to Stripe
    planned_at: int
    reported_at: int | None = None
    reason: str | None = None


class MeterEventRequest(BaseModel):
    """What one Stripe call carries."""

    model_config = ConfigDict(frozen=True)

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
