"""In-memory fakes of the store and billing interfaces, for fast unit tests of the logic."""

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from usage_meter.billing import (
    BillingError,
    SendOutcome,
)
from usage_meter.logic.periods import period_key
from usage_meter.models.domain import (
    Counter,
    Decision,
    MeterEventRequest,
    MeterTotals,
    UsageEvent,
)

CounterKey = tuple[str, str, str, int]  # customer, period start, meter, shard


def key_of(counter: Counter) -> CounterKey:
    return (counter.customer, counter.period_start, counter.meter, counter.shard)


class InMemoryStore:
    """Same contract as DynamoStore: every flush write conditional on what its caller read, a
    backlog that holds exactly the counters with something left to report."""

    def __init__(self, page_size: int = 100) -> None:
        self.events: dict[str, UsageEvent] = {}
        self.counters: dict[CounterKey, Counter] = {}
        self.in_backlog: set[CounterKey] = set()
        self.page_size = page_size
        self.lock = threading.RLock()

    def fingerprints(self, event_ids: Sequence[str]) -> Mapping[str, str]:
        with self.lock:
            return {i: self.events[i].fingerprint for i in event_ids if i in self.events}

    def put_events(self, events: Sequence[UsageEvent]) -> Mapping[str, str]:
        with self.lock:
            existing = self.fingerprints([e.id for e in events])
            for event in events:
                if event.id in existing:
                    continue
                self.events[event.id] = event
                key = (event.customer, period_key(event.period), event.meter, 0)
                counter = self.counters.get(key) or Counter(
                    customer=event.customer,
                    meter=event.meter,
                    period_start=key[1],
                    period_end=int(event.period.end.timestamp()),
                )
                self.counters[key] = counter.model_copy(
                    update={"quantity": counter.quantity + event.quantity}
                )
                self.in_backlog.add(key)
            return existing

    def period_totals(self, customer: str, period_start: str) -> Sequence[MeterTotals]:
        with self.lock:
            totals: dict[str, tuple[int, int]] = {}
            for (c, p, meter, _), counter in self.counters.items():
                if c == customer and p == period_start:
                    q, r = totals.get(meter, (0, 0))
                    totals[meter] = (q + counter.quantity, r + counter.reported)
            return [MeterTotals(meter=m, quantity=q, reported=r) for m, (q, r) in totals.items()]

    # -- flush -------------------------------------------------------------------------------

    def backlog(self) -> Iterator[Sequence[Counter]]:
        with self.lock:
            keys = sorted(self.in_backlog)
        for start in range(0, len(keys), self.page_size):
            with self.lock:
                yield [self.counters[k] for k in keys[start : start + self.page_size]]

    def _swap(self, counter: Counter, holds: bool, **changes: object) -> bool:
        with self.lock:
            if not holds:
                return False
            key = key_of(counter)
            self.counters[key] = self.counters[key].model_copy(update=changes)
            return True

    def decide(self, counter: Counter, decision: Decision) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            holds = stored.sending is None and stored.seq == counter.seq
            return self._swap(counter, holds, seq=decision.seq, sending=decision)

    def confirm(self, counter: Counter, decision: Decision) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            holds = stored.sending is not None and stored.sending.seq == decision.seq
            return self._swap(
                counter, holds, reported=stored.reported + decision.value, sending=None
            )

    def quarantine(self, counter: Counter, decision: Decision, reason: str, at: int) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            holds = stored.sending is not None and stored.sending.seq == decision.seq
            return self._swap(
                counter,
                holds,
                quarantined=stored.quarantined + decision.value,
                quarantine_reason=reason,
                quarantined_at=at,
                sending=None,
            )

    def release(self, counter: Counter) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            holds = (
                counter.sending is None
                and counter.unsent == 0
                and stored.quantity == counter.quantity
                and stored.sending is None
                and stored.seq == counter.seq
                and stored.quarantined == counter.quarantined
            )
            if holds:
                self.in_backlog.discard(key_of(counter))
            return holds

    # -- quarantine ----------------------------------------------------------------------------

    def quarantined(self) -> Sequence[Counter]:
        with self.lock:
            return sorted(
                (c for c in self.counters.values() if c.quarantined),
                key=lambda c: (c.quarantined_at or 0, c.id),
            )

    def quarantined_counter(self, counter_id: str) -> Counter | None:
        return next((c for c in self.quarantined() if c.id == counter_id), None)

    def replay(self, counter: Counter, *, restamp_to: Counter | None = None) -> bool:
        with self.lock:
            key = key_of(counter)
            stored = self.counters[key]
            if (stored.quarantined, stored.quarantined_at) != (
                counter.quarantined,
                counter.quarantined_at,
            ):
                return False
            units = stored.quarantined
            changes: dict[str, object] = {
                "quarantined": 0,
                "quarantine_reason": None,
                "quarantined_at": None,
            }
            if restamp_to is None:
                self.in_backlog.add(key)
            else:
                changes["quantity"] = stored.quantity - units
                target_key = key_of(restamp_to)
                target = self.counters.get(target_key) or restamp_to
                self.counters[target_key] = target.model_copy(
                    update={"quantity": target.quantity + units}
                )
                self.in_backlog.add(target_key)
            self.counters[key] = stored.model_copy(update=changes)
            return True


@dataclass
class FakeBilling:
    """Dedupes identifiers like Stripe; `script` holds errors to raise on the next calls."""

    delivered: dict[str, MeterEventRequest] = field(default_factory=dict)
    calls: list[MeterEventRequest] = field(default_factory=list)
    script: list[BillingError] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, request: MeterEventRequest) -> SendOutcome:
        with self.lock:
            self.calls.append(request)
            if self.script:
                raise self.script.pop(0)
            if request.identifier in self.delivered:
                return SendOutcome.ALREADY_DELIVERED
            self.delivered[request.identifier] = request
            return SendOutcome.DELIVERED

    def totals(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for r in self.delivered.values():
            out[(r.customer, r.event_name)] = out.get((r.customer, r.event_name), 0) + r.value
        return out
