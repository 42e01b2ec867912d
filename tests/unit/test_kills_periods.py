"""Billing periods (logic/periods.py) at their exact seconds (issue 15, mutation testing): the
calendar month clipped at a subscription's edges when the moment is that edge, and a predicted
renewal that never reaches back before the last known end."""

from datetime import UTC, datetime, timedelta, timezone

from usage_meter.logic.periods import period_for, rfc3339
from usage_meter.models.domain import CustomerBilling, ItemPeriods, Subscription

CUSTOMER = "cus_Edge1"
ANCHOR = datetime(2026, 10, 13, 13, 37, 12, tzinfo=UTC)


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


def billing(periods: tuple[tuple[datetime, datetime], ...], *, renews: bool) -> CustomerBilling:
    item = ItemPeriods(
        item="si_1",
        meter="ai_messages",
        anchor=unix(ANCHOR),
        interval="month",
        periods=tuple((unix(start), unix(end)) for start, end in periods),
        renews=renews,
    )
    subscription = Subscription(
        id="sub_1", customer=CUSTOMER, status="active", read_at=0, items=(item,)
    )
    return CustomerBilling(customer=CUSTOMER, subscriptions={"sub_1": subscription})


def period_of(known: CustomerBilling, moment: datetime) -> tuple[datetime, datetime, str]:
    period = period_for(known, "ai_messages", moment)
    return period.start, period.end, period.source


def test_usage_at_the_second_a_subscription_ended_starts_the_unbilled_month_there():
    # Given a subscription canceled mid-month
    ended = datetime(2026, 11, 20, 9, 0, 0, tzinfo=UTC)
    known = billing(((ANCHOR, ended),), renews=False)
    # When usage happens at the very second it ended
    # Then it is in a calendar period that starts there, not over the subscription's period
    assert period_of(known, ended) == (
        ended,
        datetime(2026, 12, 1, tzinfo=UTC),
        "calendar_month",
    )


def test_usage_at_midnight_of_a_month_a_subscription_ended_at_is_that_whole_month():
    # Given a subscription that ended exactly at the start of November
    november = datetime(2026, 11, 1, tzinfo=UTC)
    known = billing(((datetime(2026, 10, 1, tzinfo=UTC), november),), renews=False)
    # When usage happens at that instant
    # Then its period is November, not an empty period ending where it starts
    assert period_of(known, november) == (
        november,
        datetime(2026, 12, 1, tzinfo=UTC),
        "calendar_month",
    )


def test_a_predicted_renewal_never_starts_before_the_last_known_end():
    # Given a renewing item whose last known period ended off its anchor's schedule
    renewal = datetime(2026, 11, 13, 13, 37, 12, tzinfo=UTC)
    off_schedule_end = datetime(2026, 11, 20, 9, 0, 0, tzinfo=UTC)
    known = billing(((ANCHOR, renewal), (renewal, off_schedule_end)), renews=True)
    # When usage comes after that end, before the webhook of the next period
    # Then the predicted period starts at the known end and ends on the schedule
    assert period_of(known, datetime(2026, 11, 25, tzinfo=UTC)) == (
        off_schedule_end,
        datetime(2026, 12, 13, 13, 37, 12, tzinfo=UTC),
        "stripe_subscription",
    )


def test_usage_stamped_with_an_offset_is_in_the_utc_month_it_happened_in():
    # Given no subscription, and usage at 23:30 on November 30th at UTC-2 (December 1st, UTC)
    moment = datetime(2026, 11, 30, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    # Then it is December's usage
    assert period_of(CustomerBilling(customer=CUSTOMER), moment) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
        "calendar_month",
    )


def test_a_moment_is_written_in_utc_whatever_its_offset():
    moment = datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert rfc3339(moment) == "2026-11-30T23:30:00Z"
