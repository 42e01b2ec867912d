"""Reconciliation: per (customer, meter, billing period), what the service confirmed sending
against what Stripe's meter event summaries hold.

The flush stamps a period's units inside its whole minutes (see flush.stamp_window), and Stripe
summarizes minute-aligned windows, so both sides count exactly the same units. Stripe's
summaries are eventually consistent: periods that ended less than `settle` seconds ago are left
for a later run. Run it after periods end and before their invoices finalize.
"""

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from usage_meter.logic.flush import MINUTE, stamp_window
from usage_meter.models.domain import Counter


class PeriodCounters(Protocol):
    def counters_ending_on(self, day: str) -> Iterator[Sequence[Counter]]: ...


class Summaries(Protocol):
    def meter_id(self, event_name: str) -> str | None: ...

    def total(self, meter_id: str, customer: str, start: int, end: int) -> int: ...


@dataclass(frozen=True)
class PeriodCheck:
    customer: str
    meter: str
    period_start: str
    period_end: str
    service: int  # units Stripe confirmed to the flush
    stripe: int | None  # what Stripe's summaries hold; None when not comparable
    status: str  # ok, mismatch, in_flight (a decision awaits its answer), no_meter, unverifiable

    def line(self) -> dict[str, object]:
        return asdict(self)


def _days(since: int, until: int) -> Iterator[str]:
    day = datetime.fromtimestamp(since, UTC).date()
    while day <= datetime.fromtimestamp(until, UTC).date() + timedelta(days=1):
        yield day.isoformat()
        day += timedelta(days=1)


def reconcile(
    store: PeriodCounters, stripe: Summaries, *, since: int, until: int
) -> Iterator[PeriodCheck]:
    """Every period that ended in (since, until], compared. `until` already includes the
    settling delay."""
    for day in _days(since, until):
        periods: dict[tuple[str, str, str], list[Counter]] = {}
        for page in store.counters_ending_on(day):
            for counter in page:
                if since < counter.period_end <= until:
                    key = (counter.customer, counter.meter, counter.period_start)
                    periods.setdefault(key, []).append(counter)
        for (customer, meter, start), shards in sorted(periods.items()):
            yield _check(customer, meter, start, shards, stripe)


def _check(
    customer: str, meter: str, start: str, shards: list[Counter], stripe: Summaries
) -> PeriodCheck:
    end = datetime.fromtimestamp(shards[0].period_end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    service = sum(c.reported for c in shards)
    check = PeriodCheck(customer, meter, start, end, service, None, "ok")
    first, last = stamp_window(shards[0])
    if first % MINUTE or (last + 1) % MINUTE:
        return replace(check, status="unverifiable")  # shorter than its whole minutes
    meter_id = stripe.meter_id(meter)
    if meter_id is None:
        return replace(check, status="no_meter")
    held = stripe.total(meter_id, customer, first, last + 1)
    if any(c.sending is not None for c in shards) and held != service:
        return replace(check, stripe=held, status="in_flight")
    return replace(check, stripe=held, status="ok" if held == service else "mismatch")
