"""Billing periods: the customer's Stripe subscription periods when the service knows them,
otherwise UTC calendar months.

Stripe puts a unit in the period its timestamp falls in, and a period starts at the billing
anchor, at any second. A subscription item's periods follow its anchor's schedule: months from
the anchor with the day clamped to the month's end (Jan 31 → Feb 28 → Mar 31), keeping the
anchor's time of day; days, weeks and years likewise. That makes a renewal predictable: an event
after the last known period end falls in the next period on the schedule, before any webhook.
"""

import calendar
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from usage_meter.models.domain import CustomerBilling, ItemPeriods, Period

# The flush runs every 5 minutes: a closing period leaves it three runs to deliver late usage
# before Stripe finalizes the period's invoice.
CLOSE_MARGIN = 15 * 60
_SECONDS = {"day": 86_400, "week": 7 * 86_400}


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
    """How a period names its counters: its start, RFC 3339 (so keys sort by time)."""
    return rfc3339(period.start)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def schedule_point(anchor: int, interval: str, count: int, n: int) -> int:
    """The n-th period boundary on an anchor's schedule (n may be negative)."""
    if interval in _SECONDS:
        return anchor + n * count * _SECONDS[interval]
    months = n * count * (12 if interval == "year" else 1)
    start = _utc(anchor)
    year, month = divmod(start.year * 12 + start.month - 1 + months, 12)
    day = min(start.day, calendar.monthrange(year, month + 1)[1])
    return int(start.replace(year=year, month=month + 1, day=day).timestamp())


def scheduled_period(anchor: int, interval: str, count: int, moment: int) -> tuple[int, int]:
    """The period on the anchor's schedule that contains `moment`."""
    length = _SECONDS.get(interval) or (365 * 86_400 if interval == "year" else 30 * 86_400)
    n = (moment - anchor) // (length * count)  # a guess, then a few steps to the exact one
    while schedule_point(anchor, interval, count, n) > moment:
        n -= 1
    while schedule_point(anchor, interval, count, n + 1) <= moment:
        n += 1
    return schedule_point(anchor, interval, count, n), schedule_point(
        anchor, interval, count, n + 1
    )


def _item_period(item: ItemPeriods, moment: int) -> tuple[int, int] | None:
    for start, end in item.periods:
        if start <= moment < end:
            return start, end
    if item.renews and item.periods and moment >= item.periods[-1][1]:
        # A renewal not synced yet: the next period on the schedule, never before the last end.
        start, end = scheduled_period(item.anchor, item.interval, item.interval_count, moment)
        return max(start, item.periods[-1][1]), end
    return None


def _boundaries(items: Iterable[ItemPeriods]) -> list[int]:
    return sorted({edge for item in items for period in item.periods for edge in period})


def period_for(billing: CustomerBilling | None, meter: str, moment: datetime) -> Period:
    """The billing period a unit of `meter` at `moment` belongs to.

    The meter's subscription item decides; a meter that is on none of the customer's
    subscriptions follows the customer's other items, so one customer has one period. With no
    subscription covering the moment, it is the UTC calendar month, clipped so it never overlaps
    a known subscription period (usage before a subscription starts is not billed in it)."""
    at = int(moment.timestamp())
    items = billing.items_for(meter) if billing else []
    for item in items:
        found = _item_period(item, at)
        if found is not None:
            return Period(start=_utc(found[0]), end=_utc(found[1]), source="stripe_subscription")
    month = calendar_month(moment)
    start, end = int(month.start.timestamp()), int(month.end.timestamp())
    for edge in _boundaries(items):
        if start < edge <= at:
            start = edge
        elif at < edge < end:
            end = edge
    return Period(start=_utc(start), end=_utc(end), source="calendar_month")


def closes_at(period: Period, grace_seconds: int) -> datetime:
    """When the service stops taking usage for a period: Stripe finalizes its invoice after the
    grace period, and the flush needs a margin to deliver before that."""
    return period.end + timedelta(seconds=max(grace_seconds - CLOSE_MARGIN, 0))


def is_closed(period: Period, now: datetime, grace_seconds: int) -> bool:
    return now >= closes_at(period, grace_seconds)
