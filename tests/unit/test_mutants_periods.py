"""Billing periods at their edges (issue 15, mutation testing: what a changed line of
logic/periods.py would get wrong that tests/unit/test_periods.py does not see): the second a
period starts or ends, renewals predicted on every interval, and the close of a period."""

from datetime import UTC, datetime, timedelta

import pytest

from usage_meter.logic.periods import (
    closes_at,
    is_closed,
    period_for,
    schedule_point,
    scheduled_period,
)
from usage_meter.models.domain import CustomerBilling, ItemPeriods, Period, Subscription


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def billing(*periods: tuple[int, int], interval: str = "month", renews: bool = True):
    anchor = periods[0][0]
    item = ItemPeriods(
        item="si_1", meter="m", anchor=anchor, interval=interval, periods=periods, renews=renews
    )
    subscription = Subscription(
        id="sub_1", customer="cus_A", status="active", read_at=0, items=(item,)
    )
    return CustomerBilling(customer="cus_A", subscriptions={"sub_1": subscription})


A, B, C = at("2026-09-13T13:37:12"), at("2026-10-13T13:37:12"), at("2026-11-13T13:37:12")


def span(billing: CustomerBilling, moment: int) -> tuple[int, int, str]:
    period = period_for(billing, "m", utc(moment))
    return int(period.start.timestamp()), int(period.end.timestamp()), period.source


def test_a_known_periods_first_second_belongs_to_it_and_its_end_to_the_next():
    known = billing((A, B), (B, C))
    assert span(known, A) == (A, B, "stripe_subscription")
    assert span(known, B) == (B, C, "stripe_subscription")
    assert span(known, B - 1) == (A, B, "stripe_subscription")


def test_the_renewal_predicted_at_the_last_known_end_starts_there():
    assert span(billing((A, B)), B) == (B, C, "stripe_subscription")


@pytest.mark.parametrize(
    ("interval", "first_end", "next_end"),
    [
        ("day", at("2026-09-14T13:37:12"), at("2026-09-15T13:37:12")),
        ("week", at("2026-09-20T13:37:12"), at("2026-09-27T13:37:12")),
        ("year", at("2027-09-13T13:37:12"), at("2028-09-13T13:37:12")),
    ],
)
def test_a_renewal_is_predicted_on_the_items_own_interval(interval, first_end, next_end):
    # Given an item whose only known period ended, on its interval's schedule
    known = billing((A, first_end), interval=interval)
    # When usage comes a second into the next period / Then it is the next on that schedule
    assert span(known, first_end + 1) == (first_end, next_end, "stripe_subscription")


# The anchors and intervals where the first guess of scheduled_period is furthest off: month
# lengths from 28 to 31 days, leap years, anchors at a month's end.
ANCHORS = [at("2024-01-31T23:59:59"), at("2026-02-01T00:00:00"), at("2026-09-13T13:37:12")]
SCHEDULES = [("day", 1), ("week", 2), ("month", 1), ("month", 3), ("year", 1)]


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize(("interval", "count"), SCHEDULES)
def test_the_scheduled_period_is_the_boundary_pair_around_the_moment(anchor, interval, count):
    for n in range(-3, 40):
        boundary = schedule_point(anchor, interval, count, n)
        following = schedule_point(anchor, interval, count, n + 1)
        # At a boundary, just before the next, and in between, the period is (boundary, next)
        for moment in (boundary, following - 1, (boundary + following) // 2):
            assert scheduled_period(anchor, interval, count, moment) == (boundary, following), (
                interval,
                count,
                n,
                utc(moment),
            )


def test_a_period_with_no_grace_closes_at_its_end():
    period = Period(start=utc(A), end=utc(B), source="stripe_subscription")
    assert closes_at(period, 0) == utc(B)
    assert is_closed(period, utc(B), 0) and not is_closed(period, utc(B - 1), 0)


def test_a_grace_longer_than_the_margin_closes_the_period_that_much_later():
    period = Period(start=utc(A), end=utc(B), source="stripe_subscription")
    assert closes_at(period, 3600) == utc(B) + timedelta(minutes=45)
