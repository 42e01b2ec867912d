"""A customer's standing in the current period, from period counters: O(meters) reads."""

from collections.abc import Mapping
from datetime import datetime

from usage_meter.logic.periods import period_for, rfc3339
from usage_meter.models.domain import MeterTotals, Period
from usage_meter.models.output import MeterUsageOut, PeriodOut, UsageOut
from usage_meter.store import UsageReader


def _out(period: Period) -> PeriodOut:
    return PeriodOut(start=period.start, end=period.end, source=period.source)


def current_usage(
    customer: str, *, included: Mapping[str, int], store: UsageReader, now: datetime
) -> UsageOut:
    billing = store.customer_billings([customer])[customer]
    periods = {meter: period_for(billing, meter, now) for meter in sorted(included)}
    # The customer's period is their subscription's; a meter billed on another cycle (a
    # subscription item with its own interval) says so in its own `period`.
    period = next(
        (p for p in periods.values() if p.source == "stripe_subscription"),
        period_for(billing, "", now),
    )
    totals: dict[tuple[Period, str], MeterTotals] = {}
    for each in set(periods.values()):
        for total in store.period_totals(customer, rfc3339(each.start), rfc3339(each.end)):
            totals[(each, total.meter)] = total
    meters = []
    for meter, meter_period in periods.items():
        found = totals.get((meter_period, meter), MeterTotals(meter=meter))
        allowance = included[meter]
        meters.append(
            MeterUsageOut(
                meter=meter,
                quantity=found.quantity,
                reported=found.reported,
                pending=found.quantity - found.reported,
                included=allowance,
                included_remaining=max(allowance - found.quantity, 0),
                billable=max(found.quantity - allowance, 0),
                period=None if meter_period == period else _out(meter_period),
            )
        )
    return UsageOut(stripe_customer_id=customer, period=_out(period), meters=meters, as_of=now)
