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
    BacklogEvent,
    Batch,
    BatchState,
    MeterEventRequest,
    MeterTotals,
    UsageEvent,
)


@dataclass
class _Event:
    event: UsageEvent
    batch_id: str | None = None


class InMemoryStore:
    """Same contract as DynamoStore: conditional writes, a backlog that claims empty."""

    def __init__(self) -> None:
        self.events: dict[str, _Event] = {}
        self.counters: dict[tuple[str, str, str], list[int]] = {}  # -> [quantity, reported]
        self.batches: dict[str, Batch] = {}
        self.lock = threading.RLock()

    def fingerprints(self, event_ids: Sequence[str]) -> Mapping[str, str]:
        with self.lock:
            return {i: self.events[i].event.fingerprint for i in event_ids if i in self.events}

    def put_events(self, events: Sequence[UsageEvent]) -> Mapping[str, str]:
        with self.lock:
            existing = self.fingerprints([e.id for e in events])
            for event in events:
                if event.id in existing:
                    continue
                self.events[event.id] = _Event(event)
                key = (event.customer, period_key(event.period), event.meter)
                self.counters.setdefault(key, [0, 0])[0] += event.quantity
            return existing

    def period_totals(self, customer: str, period_start: str) -> Sequence[MeterTotals]:
        with self.lock:
            return [
                MeterTotals(meter=meter, quantity=q, reported=r)
                for (c, p, meter), (q, r) in self.counters.items()
                if c == customer and p == period_start
            ]

    def backlog(self) -> Iterator[BacklogEvent]:
        with self.lock:
            unclaimed = [s.event for s in self.events.values() if s.batch_id is None]
        for e in unclaimed:
            yield BacklogEvent(
                id=e.id,
                customer=e.customer,
                meter=e.meter,
                quantity=e.quantity,
                event_time=e.event_time,
                period_start=period_key(e.period),
            )

    def open_batches(self) -> Sequence[Batch]:
        with self.lock:
            open_states = (BatchState.PLANNED, BatchState.CLAIMED)
            return [b for b in self.batches.values() if b.state in open_states]

    def quarantined_batches(self) -> Sequence[Batch]:
        with self.lock:
            return [b for b in self.batches.values() if b.state == BatchState.QUARANTINED]

    def create_batch(self, batch: Batch) -> Batch:
        with self.lock:
            return self.batches.setdefault(batch.id, batch)

    def claim(self, batch: Batch) -> Mapping[str, tuple[int, int]]:
        with self.lock:
            claimed = {}
            for event_id in batch.event_ids:
                stored = self.events.get(event_id)
                if stored is None or stored.batch_id not in (None, batch.id):
                    continue
                stored.batch_id = batch.id
                claimed[event_id] = (stored.event.quantity, stored.event.event_time)
            return claimed

    def mark_claimed(
        self, batch: Batch, quantity: int, timestamp: int, event_ids: Sequence[str]
    ) -> Batch:
        with self.lock:
            stored = self.batches[batch.id]
            if stored.state != BatchState.PLANNED:
                return stored
            state = BatchState.CLAIMED if event_ids else BatchState.EMPTY
            updated = stored.model_copy(
                update={
                    "state": state,
                    "quantity": quantity,
                    "timestamp": timestamp,
                    "event_ids": tuple(event_ids),
                }
            )
            self.batches[batch.id] = updated
            return updated

    def confirm(self, batch: Batch, reported_at: int) -> None:
        with self.lock:
            stored = self.batches[batch.id]
            if stored.state == BatchState.REPORTED:
                return
            assert stored.state == BatchState.CLAIMED, stored.state
            self.batches[batch.id] = stored.model_copy(
                update={"state": BatchState.REPORTED, "reported_at": reported_at}
            )
            self.counters[(batch.customer, batch.period_start, batch.meter)][1] += batch.quantity

    def get_batch(self, batch_id: str) -> Batch | None:
        with self.lock:
            return self.batches.get(batch_id)

    def replay(self, batch: Batch, identifier: str, timestamp: int) -> Batch:
        with self.lock:
            stored = self.batches[batch.id]
            assert stored.state == BatchState.QUARANTINED and stored.identifier == batch.identifier
            updated = stored.model_copy(
                update={
                    "state": BatchState.CLAIMED,
                    "identifier": identifier,
                    "timestamp": timestamp,
                }
            )
            self.batches[batch.id] = updated
            return updated

    def quarantine(self, batch: Batch, reason: str) -> None:
        with self.lock:
            stored = self.batches[batch.id]
            assert stored.state == BatchState.CLAIMED, stored.state
            self.batches[batch.id] = stored.model_copy(
                update={"state": BatchState.QUARANTINED, "reason": reason}
            )


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
