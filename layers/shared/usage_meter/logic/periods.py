"""Billing periods. Until the service knows a customer's subscription, a period is a UTC month."""

from datetime import UTC, datetime

from usage_meter.models.domain import Period


def calendar_month(moment: datetime) -> Period:
    moment = moment.astimezone(UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = (
        datetime(moment.year + 1, 1, 1, tzinfo=UTC)
        if moment.month == 12
        else datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)
    )
    return Period(start=start, end=end, source="calendar_month")


def period_key(period: Period) -> str:
    """How a period names its counters and batches: its start, RFC 3339."""
    return period.start.strftime("%Y-%m-%dT%H:%M:%SZ")
