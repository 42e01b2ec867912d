"""Reconciliation's verdicts per period, with fakes: agreement, a difference, a decision still
awaiting Stripe's answer, a meter Stripe does not have, a period too short to compare, and
periods outside the window."""

import time
from collections.abc import Iterator, Sequence

from usage_meter.logic.reconcile import reconcile
from usage_meter.models.domain import Counter, Decision

START = 1_794_577_032  # 2026-11-13T13:37:12Z, an arbitrary second
END = START + 30 * 86_400
NOW = END + 3600


class Periods:
    def __init__(self, *counters: Counter) -> None:
        self.counters = counters

    def counters_ending_on(self, day: str) -> Iterator[Sequence[Counter]]:
        yield [c for c in self.counters if _day(c.period_end - 1) == day]


class Stripe:
    def __init__(self, totals: dict[str, int], meters: Sequence[str] = ("m",)) -> None:
        self.totals, self.meters, self.windows = totals, meters, []

    def meter_id(self, event_name: str) -> str | None:
        return f"mtr_{event_name}" if event_name in self.meters else None

    def total(self, meter_id: str, customer: str, start: int, end: int) -> int:
        self.windows.append((start, end))
        return self.totals.get(customer, 0)


def _day(moment: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(moment))


def counter(customer: str, reported: int, *, meter: str = "m", end: int = END, **more) -> Counter:
    start = "2026-11-13T13:37:12Z" if end == END else "2026-12-13T13:36:30Z"
    return Counter(
        customer=customer,
        meter=meter,
        period_start=start,
        period_end=end,
        period_source="stripe_subscription",
        quantity=reported,
        reported=reported,
        **more,
    )


def verdicts(store: Periods, stripe: Stripe) -> list[tuple[str, str, int, int | None]]:
    return [
        (c.customer, c.status, c.service, c.stripe)
        for c in reconcile(store, stripe, since=START, until=NOW)
    ]


def test_each_period_gets_its_verdict_over_its_whole_minutes():
    in_flight = Decision(seq=2, value=3, timestamp=END - 61, decided_at=END)
    store = Periods(
        counter("cus_Ok", 10),
        counter("cus_More", 10),
        counter("cus_Flying", 10, sending=in_flight, seq=2),
        counter("cus_Other", 4, meter="unknown"),
    )
    stripe = Stripe({"cus_Ok": 10, "cus_More": 14, "cus_Flying": 13})
    assert sorted(verdicts(store, stripe)) == [
        ("cus_Flying", "in_flight", 10, 13),
        ("cus_More", "mismatch", 10, 14),
        ("cus_Ok", "ok", 10, 10),
        ("cus_Other", "no_meter", 4, None),
    ]
    # Stripe is asked for the period's whole minutes: 13:38:00 to 13:37:00 a month later
    assert set(stripe.windows) == {(START + 48, END - 12)}


def test_a_period_shorter_than_its_whole_minutes_is_not_compared():
    short = counter("cus_Short", 2, end=1_797_169_050)  # 13:36:30 to 13:37:30
    stripe = Stripe({})
    assert verdicts(Periods(short), stripe) == [("cus_Short", "unverifiable", 2, None)]
    assert stripe.windows == []


def test_periods_ending_outside_the_window_are_left_out():
    early = counter("cus_Early", 5, end=START)
    late = counter("cus_Late", 5, end=NOW + 60)
    assert verdicts(Periods(early, late), Stripe({})) == []
