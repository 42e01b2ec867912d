"""In-memory fakes of the store and billing interfaces, for fast unit tests of the logic."""

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from usage_meter.billing import (
    BillingError,
    SendOutcome,
)
from usage_meter.logic.periods import period_key
from usage_meter.models.domain import (
    Counter,
    CustomerBilling,
    Decision,
    MeterEventRequest,
    MeterTotals,
    SentDecision,
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
        self.billings: dict[str, CustomerBilling] = {}
        self.stripe_events: set[str] = set()
        self.sent_log: dict[str, SentDecision] = {}
        self.page_size = page_size
        self.lock = threading.RLock()

    def fingerprints(self, event_ids: Sequence[str]) -> Mapping[str, str]:
        with self.lock:
            return {i: self.events[i].fingerprint for i in event_ids if i in self.events}

    def put_events(self, events: Sequence[UsageEvent]) -> Mapping[str, str]:
        with self.lock:
            existing = self.fingerprints([e.id for e in events])
            if any(existing.get(e.id, e.fingerprint) != e.fingerprint for e in events):
                return existing  # the request answers 409 and stores nothing
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
                    period_source=event.period.source,
                )
                self.counters[key] = counter.model_copy(
                    update={"quantity": counter.quantity + event.quantity}
                )
                self.in_backlog.add(key)
            return existing

    def period_totals(
        self, customer: str, start: str, end: str | None = None
    ) -> Sequence[MeterTotals]:
        with self.lock:
            totals: dict[str, tuple[int, int]] = {}
            for (c, p, meter, _), counter in self.counters.items():
                if c == customer and (p == start if end is None else start <= p < end):
                    q, r = totals.get(meter, (0, 0))
                    totals[meter] = (q + counter.quantity, r + counter.reported)
            return [MeterTotals(meter=m, quantity=q, reported=r) for m, (q, r) in totals.items()]

    # -- billing periods -----------------------------------------------------------------------

    def customer_billings(self, customers: Sequence[str]) -> Mapping[str, CustomerBilling]:
        with self.lock:
            return {
                c: self.billings.get(c) or CustomerBilling(customer=c)
                for c in dict.fromkeys(customers)
            }

    def customer_billing(self, customer: str) -> CustomerBilling:
        return self.customer_billings([customer])[customer]

    def save_billing(self, billing: CustomerBilling, expected_version: int) -> bool:
        with self.lock:
            if self.customer_billing(billing.customer).version != expected_version:
                return False
            self.billings[billing.customer] = billing.model_copy(
                update={"version": expected_version + 1}
            )
            return True

    def customer_counters(self, customer: str, since: str) -> Sequence[Counter]:
        with self.lock:
            return [
                c
                for (cu, p, _, _), c in sorted(self.counters.items())
                if cu == customer and p >= since
            ]

    def cut(self, counter: Counter, period_end: int) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            return self._swap(
                counter, stored.period_end == counter.period_end, period_end=period_end
            )

    def stripe_event_handled(self, event_id: str) -> bool:
        return event_id in self.stripe_events

    def remember_stripe_event(self, event_id: str, at: int) -> None:
        self.stripe_events.add(event_id)

    # -- flush -------------------------------------------------------------------------------

    def backlog(self) -> Iterator[Sequence[Counter]]:
        with self.lock:
            keys = sorted(self.in_backlog)
        for start in range(0, len(keys), self.page_size):
            with self.lock:  # read under the lock, yield outside it: the flush's threads write
                page = [self.counters[k] for k in keys[start : start + self.page_size]]
            yield page

    def _swap(self, counter: Counter, holds: bool, **changes: object) -> bool:
        with self.lock:
            if not holds:
                return False
            key = key_of(counter)
            self.counters[key] = self.counters[key].model_copy(update=changes)
            return True

    def log_send(self, counter: Counter, decision: Decision) -> None:
        with self.lock:
            self.sent_log.setdefault(
                counter.identifier(decision),
                SentDecision(
                    identifier=counter.identifier(decision),
                    customer=counter.customer,
                    meter=counter.meter,
                    period_start=counter.period_start,
                    shard=counter.shard,
                    seq=decision.seq,
                    value=decision.value,
                    timestamp=decision.timestamp,
                ),
            )

    def sent(self, identifier: str) -> SentDecision | None:
        return self.sent_log.get(identifier)

    def counter_of(self, sent: SentDecision) -> Counter | None:
        return self.counters.get((sent.customer, sent.period_start, sent.meter, sent.shard))

    def unreport(self, counter: Counter, sent: SentDecision, reason: str, at: int) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            if self.sent_log[sent.identifier].rejected_at is not None:
                return False
            in_flight = counter.sending is not None and counter.sending.seq == sent.seq
            if in_flight:
                holds = stored.sending is not None and stored.sending.seq == sent.seq
                changes: dict[str, object] = {"sending": None}
            else:
                holds = stored.reported >= sent.value and (
                    stored.sending is None or stored.sending.seq != sent.seq
                )
                changes = {"reported": stored.reported - sent.value}
            if not holds:
                return False
            self.sent_log[sent.identifier] = sent.model_copy(
                update={"rejected_at": at, "reason": reason}
            )
            return self._swap(
                counter,
                True,
                quarantined=stored.quarantined + sent.value,
                quarantine_reason=reason,
                quarantined_at=at,
                **changes,
            )

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

    def quarantine(
        self, counter: Counter, decision: Decision, reason: str, at: int, *, hold: bool = False
    ) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            holds = stored.sending is not None and stored.sending.seq == decision.seq
            if hold:
                holds = holds and stored.held is None
            return self._swap(
                counter,
                holds,
                quarantined=stored.quarantined + decision.value,
                quarantine_reason=reason,
                quarantined_at=at,
                sending=None,
                held=decision if hold else stored.held,
            )

    def release(self, counter: Counter) -> bool:
        with self.lock:
            stored = self.counters[key_of(counter)]
            holds = (
                counter.sending is None
                and counter.unsent == 0
                and stored.quantity == counter.quantity
                and stored.reported == counter.reported
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

    def replay(
        self, counter: Counter, *, restamp_to: Counter | None = None, resend: bool = False
    ) -> bool:
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
                "held": None,
            }
            if resend and counter.held is not None:
                if stored.sending is not None or stored.held != counter.held:
                    return False
                changes["sending"] = counter.held
                self.in_backlog.add(key)
            elif restamp_to is None:
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


class HookedStore(InMemoryStore):
    """An InMemoryStore that runs a test's action once just before or after a named step
    (`decide`, `confirm`, `quarantine`, `release`; after only: `backlog`, once a page is read,
    and `quarantined_counter`), so a race (another run, a record, a replay, a crash) happens
    exactly there. Same contract otherwise."""

    def __init__(self, page_size: int = 100) -> None:
        super().__init__(page_size)
        self.hooks: dict[tuple[str, str], list[Callable[[], object]]] = {}

    def before(self, step: str, action: Callable[[], object]) -> None:
        self.hooks.setdefault(("before", step), []).append(action)

    def after(self, step: str, action: Callable[[], object]) -> None:
        self.hooks.setdefault(("after", step), []).append(action)

    def _fire(self, when: str, step: str) -> None:
        with self.lock:
            waiting = self.hooks.get((when, step))
            action = waiting.pop(0) if waiting else None
        if action is not None:  # outside the lock: the action may be a whole other run
            action()

    def backlog(self) -> Iterator[Sequence[Counter]]:
        for page in super().backlog():
            self._fire("after", "backlog")
            yield page

    def decide(self, counter: Counter, decision: Decision) -> bool:
        self._fire("before", "decide")
        done = super().decide(counter, decision)
        self._fire("after", "decide")
        return done

    def confirm(self, counter: Counter, decision: Decision) -> bool:
        self._fire("before", "confirm")
        done = super().confirm(counter, decision)
        self._fire("after", "confirm")
        return done

    def quarantine(
        self, counter: Counter, decision: Decision, reason: str, at: int, *, hold: bool = False
    ) -> bool:
        self._fire("before", "quarantine")
        done = super().quarantine(counter, decision, reason, at, hold=hold)
        self._fire("after", "quarantine")
        return done

    def release(self, counter: Counter) -> bool:
        self._fire("before", "release")
        done = super().release(counter)
        self._fire("after", "release")
        return done

    def quarantined_counter(self, counter_id: str) -> Counter | None:
        found = super().quarantined_counter(counter_id)
        self._fire("after", "quarantined_counter")
        return found


class FakeClock:
    """Wall-clock time (Unix seconds) that moves only when a test, or a fake sleep, moves it."""

    def __init__(self, now: float) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeBilling:
    """Dedupes identifiers like Stripe; `script` holds errors to raise on the next calls.

    `on_call` runs while a call is in flight, before Stripe looks at it (a test puts a barrier
    or another run there); `max_in_flight` and `max_in_flight_per_pair` record how many calls,
    overall and per (customer, meter), were ever in flight at once."""

    delivered: dict[str, MeterEventRequest] = field(default_factory=dict)
    calls: list[MeterEventRequest] = field(default_factory=list)
    script: list[BillingError] = field(default_factory=list)
    on_call: Callable[[MeterEventRequest], object] | None = None
    max_in_flight: int = 0
    max_in_flight_per_pair: int = 0
    in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, request: MeterEventRequest) -> SendOutcome:
        pair = (request.customer, request.event_name)
        with self.lock:
            self.calls.append(request)
            self.in_flight[pair] = self.in_flight.get(pair, 0) + 1
            self.max_in_flight_per_pair = max(self.max_in_flight_per_pair, self.in_flight[pair])
            self.max_in_flight = max(self.max_in_flight, sum(self.in_flight.values()))
        try:
            if self.on_call is not None:
                self.on_call(request)
            with self.lock:
                if self.script:
                    raise self.script.pop(0)
                if request.identifier in self.delivered:
                    return SendOutcome.ALREADY_DELIVERED
                self.delivered[request.identifier] = request
                return SendOutcome.DELIVERED
        finally:
            with self.lock:
                self.in_flight[pair] -= 1

    def totals(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for r in self.delivered.values():
            out[(r.customer, r.event_name)] = out.get((r.customer, r.event_name), 0) + r.value
        return out
