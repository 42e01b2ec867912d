"""Response bodies of the HTTP API (DESIGN §4)."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_serializer

from usage_meter.models.domain import PeriodSource


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class RecordOut(BaseModel):
    model_config = ConfigDict(defer_build=True)

    id: str
    duplicate: bool


class BatchOut(BaseModel):
    model_config = ConfigDict(defer_build=True)

    results: list[RecordOut]


class PeriodOut(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    start: datetime
    end: datetime
    source: PeriodSource

    @field_serializer("start", "end")
    def _times(self, moment: datetime) -> str:
        return _rfc3339(moment)


class MeterUsageOut(BaseModel):
    model_config = ConfigDict(defer_build=True)

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
    model_config = ConfigDict(defer_build=True)

    stripe_customer_id: str
    period: PeriodOut
    meters: list[MeterUsageOut]
    as_of: datetime

    @field_serializer("as_of")
    def _as_of(self, moment: datetime) -> str:
        return _rfc3339(moment)


class ErrorBody(BaseModel):
    model_config = ConfigDict(defer_build=True)

    code: str
    message: str
    details: list[dict[str, Any]] = []


class ErrorOut(BaseModel):
    model_config = ConfigDict(defer_build=True)

    error: ErrorBody


class FlushSummary(BaseModel):
    """What one flush run did; logged, returned and turned into metrics."""

    model_config = ConfigDict(defer_build=True)

    counters_read: int = 0  # counters with unsent or in-flight units
    resumed: int = 0  # decisions an earlier run made and did not finish, sent again
    sent: int = 0  # Stripe calls that delivered (or had delivered) a decision
    units_reported: int = 0
    quarantined: int = 0  # decisions Stripe refused for good, or too old to send
    deferred: int = 0  # decisions left in flight for the next run (429, 5xx, no time)
    released: int = 0  # counters left with nothing unsent, out of the backlog
    stopped_early: bool = False
    errors: list[str] = []
    # For the metrics and alarms (functions/flush/app.py):
    units_unreported: int = 0  # units not yet reported in the counters read: the backlog's size
    # How long the oldest decision found unconfirmed has waited since a run made it (0: none).
    # Units no decision covers yet wait at most one schedule period while runs complete.
    oldest_unreported_seconds: int = 0
    units_quarantined: int = 0  # the units of the decisions quarantined
    pairs_quarantined: int = 0  # distinct (customer, meter) pairs among them


class PortalTokenOut(BaseModel):
    model_config = ConfigDict(defer_build=True)

    token: str
    expires_at: datetime

    @field_serializer("expires_at")
    def _expires(self, moment: datetime) -> str:
        return _rfc3339(moment)
