"""100,000 unreported events over 80 (customer, meter, period) counters: the flush's calls and
writes follow the counters, not the events; it holds one page at a time; a run stops before its
deadline with consistent state, and later runs finish the job, each unit once."""

from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from tests.fakes import FakeBilling, FakeClock, InMemoryStore
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.logic.record import record_events
from usage_meter.models import domain
from usage_meter.models.input import EventIn

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
T = int(NOW.timestamp())
OCTOBER_30 = int(datetime(2026, 10, 30, 12, tzinfo=UTC).timestamp())


class TimedStore(InMemoryStore):
    """Each request costs what it would on DynamoDB: 10 ms a write, 20 ms a page of reads; it
    also counts the flush's requests and the largest page it handed out."""

    def __init__(self, clock: FakeClock, page_size: int) -> None:
        super().__init__(page_size=page_size)
        self.clock = clock
        self.writes: Counter[str] = Counter()
        self.largest_page = 0

    def backlog(self) -> Iterator[Sequence[domain.Counter]]:
        for page in super().backlog():
            self.clock.advance(0.02)
            self.largest_page = max(self.largest_page, len(page))
            yield page

    def _write(self, name: str) -> None:
        self.clock.advance(0.01)
        self.writes[name] += 1

    def decide(self, counter: domain.Counter, decision: domain.Decision) -> bool:
        self._write("decide")
        return super().decide(counter, decision)

    def confirm(self, counter: domain.Counter, decision: domain.Decision) -> bool:
        self._write("confirm")
        return super().confirm(counter, decision)

    def release(self, counter: domain.Counter) -> bool:
        self._write("release")
        return super().release(counter)


def test_a_backlog_of_100k_events_costs_one_call_per_counter_over_several_bounded_runs():
    clock = FakeClock(T)
    store = TimedStore(clock, page_size=10)
    billing = FakeBilling(on_call=lambda _: clock.advance(0.15))  # a Stripe call: 150 ms
    accepted: Counter[tuple[str, str]] = Counter()
    # Given 100,000 events over 20 customers, 2 meters and 2 periods (October and November)
    for chunk in range(1000):
        events = [
            EventIn(
                stripe_customer_id=f"cus_L{(chunk + i) % 20}",
                meter="mn"[i // 20 % 2],
                quantity=1 + i % 7,
                timestamp=(OCTOBER_30 if chunk % 2 else T) - i,
            )
            for i in range(100)
        ]
        record_events(events, meters={"m", "n"}, store=store, now=NOW, batch=True)
        for e in events:
            accepted[(e.stripe_customer_id, e.meter)] += e.quantity
    assert len(store.counters) == 80
    runs = []
    # When runs with 5 seconds of work each (50 s left, 45 s reserve) flush it
    while store.in_backlog:
        deadline = clock() + 50
        flusher = Flusher(
            store,
            billing,
            time_left=lambda d=deadline: d - clock(),
            clock=clock,
            sleep=clock.advance,
            policy=FlushPolicy(parallel_pairs=1),
        )
        runs.append(flusher.run())
        # Then no run ate into its reserve by more than one counter's work
        assert deadline - clock() > 45 - 0.3
        assert len(runs) < 20
    # and the job took several runs, each one making progress
    assert runs[0].stopped_early and len(runs) > 2
    assert all(r.sent > 0 for r in runs)
    # and Stripe got one call per counter, and holds each unit once
    assert len(billing.calls) == 80 == sum(r.sent for r in runs)
    assert billing.totals() == dict(accepted)
    assert sum(r.units_reported for r in runs) == sum(accepted.values())
    # and the flush wrote to each counter a bounded number of times, holding one page at a time
    assert store.writes == {"decide": 80, "confirm": 80, "release": 80}
    assert store.largest_page == 10
