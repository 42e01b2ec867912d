"""Reconciliation's report lines and window, at the edges (issue 15, mutation testing: what a
changed line of logic/reconcile.py would get wrong that tests/unit/test_reconcile_logic.py does
not see)."""

import time

from tests.unit.test_reconcile_logic import END, START, Periods, counter
from usage_meter.logic.reconcile import PeriodCheck, reconcile

DAY = 86_400


class Stripe:
    """Summaries per (meter id, customer); only the meters it has answer a meter id."""

    def __init__(self, totals: dict[tuple[str, str], int]) -> None:
        self.totals = totals

    def meter_id(self, event_name: str) -> str | None:
        return f"mtr_{event_name}" if event_name in ("m", "n") else None

    def total(self, meter_id: str, customer: str, start: int, end: int) -> int:
        return self.totals.get((meter_id, customer), 0)


def test_a_check_names_its_period_and_asks_stripe_for_the_meters_own_summaries():
    store = Periods(counter("cus_A", 10, meter="n"))
    stripe = Stripe({("mtr_n", "cus_A"): 10, ("mtr_m", "cus_A"): 99})
    [check] = reconcile(store, stripe, since=START, until=END)
    assert check == PeriodCheck(
        "cus_A", "n", "2026-11-13T13:37:12Z", "2026-12-13T13:37:12Z", 10, 10, "ok"
    )
    assert check.line() == {
        "customer": "cus_A",
        "meter": "n",
        "period_start": "2026-11-13T13:37:12Z",
        "period_end": "2026-12-13T13:37:12Z",
        "service": 10,
        "stripe": 10,
        "status": "ok",
    }


def test_periods_ending_on_each_day_of_the_window_are_checked_its_last_second_included():
    ends = [END + n * DAY for n in range(4)]
    store = Periods(*[counter(f"cus_{n}", 1, end=end) for n, end in enumerate(ends)])
    checks = list(reconcile(store, Stripe({}), since=END - 1, until=ends[-1]))
    assert sorted(c.customer for c in checks) == ["cus_0", "cus_1", "cus_2", "cus_3"]


def test_a_period_shorter_than_a_minute_from_a_minute_boundary_is_not_compared():
    start = END - END % 60 + 60  # on a minute
    short = counter("cus_A", 1, end=start + 30).model_copy(
        update={"period_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))}
    )
    [check] = reconcile(Periods(short), Stripe({}), since=start, until=start + 30)
    assert (check.status, check.stripe) == ("unverifiable", None)
