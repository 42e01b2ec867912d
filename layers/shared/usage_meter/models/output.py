"""Response bodies of the HTTP API (DESIGN §4)."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_serializer

from usage_meter.models.domain import PeriodSource


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class RecordOut(BaseModel):
    id: str
    duplicate: bool


class BatchOut(BaseModel):
    results: list[RecordOut]


class PeriodOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: datetime
    end: datetime
    source: PeriodSource

    @field_serializer("start", "end")
    def _times(self, moment: datetime) -> str:
        return _rfc3339(moment)


class MeterUsageOut(BaseModel):
    meter: str
    quantity: int
    reported: int
    pending: int
    included: int
    included_remaining: int
    billable: int
    # Only when this meter's period differs from the customer's (an item on its own cycle).
    period: PeriodOut | None = None


class UsageOut(BaseModel):
    stripe_customer_id: str
    period: PeriodOut
    meters: list[MeterUsageOut]
    as_of: datetime

    @field_serializer("as_of")
    def _as_of(self, moment: datetime) -> str:
        return _rfc3339(moment)


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = []


class ErrorOut(BaseModel):
    error: ErrorBody


class FlushSummary(BaseModel):
    """What one flush run did; logged, returned and turned into metrics."""

    counters_read: int = 0  # counters with unsent or in-flight units
    resumed: int = 0  # decisions an earlier run made and did not finish, sent again
    sent: int = 0  # Stripe calls that delivered (or had delivered) a decision
    units_reported: int = 0
    quarantined: int = 0  # decisions Stripe refused for good, or too old to send
    deferred: int = 0  # decisions left in flight for the next run (429, 5xx, no time)
    released: int = 0  # counters left with nothing unsent, out of the backlog
    stopped_early: bool = False
    errors: list[str] = []


class PortalTokenOut(BaseModel):
    token: str
    expires_at: datetime

    @field_serializer("expires_at")
    def _expires(self, moment: datetime) -> str:
        return _rfc3339(moment)
