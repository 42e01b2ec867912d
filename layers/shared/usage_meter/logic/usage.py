"""A customer's standing in the current period, from period counters: O(meters) reads."""

from collections.abc import Mapping
from datetime import datetime

from usage_meter.logic.periods import calendar_month, period_key
from usage_meter.models.output import MeterUsageOut, PeriodOut, UsageOut
from usage_meter.store import UsageReader


def current_usage(
    customer: str, *, included: Mapping[str, int], store: UsageReader, now: datetime
) -> UsageOut:
    period = calendar_month(now)
    totals = {t.meter: t for t in store.period_totals(customer, period_key(period))}
    meters = []
    for meter in sorted(included):
        quantity = totals[meter].quantity if meter in totals else 0
        reported = totals[meter].reported if meter in totals else 0
        allowance = included[meter]
        meters.append(
            MeterUsageOut(
                meter=meter,
                quantity=quantity,
                reported=reported,
                pending=quantity - reported,
                included=allowance,
                included_remaining=max(allowance - quantity, 0),
                billable=max(quantity - allowance, 0),
            )
        )
    return UsageOut(
        stripe_customer_id=customer,
        period=PeriodOut(start=period.start, end=period.end, source=period.source),
        meters=meters,
        as_of=now,
    )
