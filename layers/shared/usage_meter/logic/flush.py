"""Flush: report the backlog to Stripe exactly once, each unit in its own period (DESIGN §6).

Plan → claim → send → confirm. Every step is idempotent, so a run that dies anywhere is
finished by the next one with the same Stripe identifier, which Stripe deduplicates.
"""

import hashlib
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from usage_meter.billing import (
    BillingAuthError,
    MeterBilling,
    PermanentBillingError,
    RateLimited,
    TransientBillingError,
)
from usage_meter.models.domain import BacklogEvent, Batch, BatchState, MeterEventRequest
from usage_meter.models.output import FlushSummary
from usage_meter.store import BacklogStore

HOUR = 3600
MAX_BATCH_EVENTS = 1000  # keeps a batch item far below DynamoDB's 400 KB
MAX_STRIPE_VALUE = 10**15 - 1  # Stripe takes at most 15 significant digits
STRIPE_MAX_AGE = 35 * 24 * HOUR
SEND_MARGIN = 10 * 60  # an event this close to Stripe's 35-day limit may arrive too late


def too_old_for_stripe(timestamp: int, now: int) -> bool:
    return timestamp < now - STRIPE_MAX_AGE + SEND_MARGIN


@dataclass(frozen=True)
class FlushPolicy:
    reserve_seconds: float = 45.0  # stop taking new work with this much Lambda time left
    parallel_pairs: int = 4  # (customer, meter) pairs sent at once; each pair stays serial
    rate_limit_attempts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 8.0


def batch_id(
    customer: str,
    meter: str,
    period_start: str,
    hour: int,
    event_ids: Sequence[str],
    attempt: int = 0,
) -> str:
    """Derived from the batch's content, so two runs planning the same events agree on it."""
    parts = [customer, meter, period_start, str(hour), *event_ids]
    if attempt:
        parts.append(f"attempt {attempt}")
    return f"umb_{hashlib.sha256(chr(31).join(parts).encode()).hexdigest()[:40]}"


def plan(events: Iterable[BacklogEvent], planned_at: int) -> list[Batch]:
    """Group by (customer, meter, period, hour of event time), split to Stripe's limits."""
    groups: dict[tuple[str, str, str, int], list[BacklogEvent]] = defaultdict(list)
    for event in events:
        hour = event.event_time - event.event_time % HOUR
        groups[(event.customer, event.meter, event.period_start, hour)].append(event)
    batches = []
    for (customer, meter, period_start, hour), members in sorted(groups.items()):
        for chunk in _split(sorted(members, key=lambda e: (e.event_time, e.id))):
            ids = tuple(e.id for e in chunk)
            identifier = batch_id(customer, meter, period_start, hour, ids)
            batches.append(
                Batch(
                    id=identifier,
                    identifier=identifier,
                    customer=customer,
                    meter=meter,
                    period_start=period_start,
                    hour=hour,
                    state=BatchState.PLANNED,
                    event_ids=ids,
                    quantity=sum(e.quantity for e in chunk),
                    timestamp=max(e.event_time for e in chunk),
                    planned_at=planned_at,
                )
            )
    return batches


def _split(events: list[BacklogEvent]) -> Iterable[list[BacklogEvent]]:
    chunk: list[BacklogEvent] = []
    total = 0
    for event in events:
        if chunk and (len(chunk) == MAX_BATCH_EVENTS or total + event.quantity > MAX_STRIPE_VALUE):
            yield chunk
            chunk, total = [], 0
        chunk.append(event)
        total += event.quantity
    if chunk:
        yield chunk


@dataclass
class _Tally:
    summary: FlushSummary = field(default_factory=FlushSummary)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self.summary, name, getattr(self.summary, name) + value)

    def error(self, message: str) -> None:
        with self.lock:
            self.summary.errors.append(message)


class Flusher:
    def __init__(
        self,
        store: BacklogStore,
        billing: MeterBilling,
        *,
        time_left: Callable[[], float],
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        policy: FlushPolicy | None = None,
    ) -> None:
        self._store = store
        self._billing = billing
        self._time_left = time_left
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._policy = policy or FlushPolicy()
        self._tally = _Tally()
        self._abort = threading.Event()

    def run(self) -> FlushSummary:
        batches = {b.id: b for b in self._store.open_batches()}
        self._tally.add(batches_resumed=len(batches))
        if self._has_time():
            try:
                for batch in self._plan(batches.values()):
                    batches.setdefault(batch.id, batch)
            except Exception as error:  # what was planned before the fault is resumed next run
                self._tally.error(f"planning failed: {type(error).__name__}: {error}")
        ready = [b for b in map(self._claim_if_planned, batches.values()) if b is not None]
        self._send_all(ready)
        return self._tally.summary

    def _has_time(self) -> bool:
        if self._abort.is_set() or self._time_left() <= self._policy.reserve_seconds:
            self._tally.summary.stopped_early = True
            return False
        return True

    def _plan(self, open_batches: Iterable[Batch]) -> Iterator[Batch]:
        # Events already promised to an open batch are left to it, not planned twice.
        promised = {
            eid for b in open_batches if b.state == BatchState.PLANNED for eid in b.event_ids
        }
        backlog = (e for e in self._store.backlog() if e.id not in promised)
        for batch in plan(backlog, planned_at=int(self._clock())):
            if not self._has_time():
                return
            yield self._create(batch)

    def _create(self, batch: Batch) -> Batch:
        """Store a planned batch. A finished batch under the same id planned these events before
        (a stale index read, or a claim that missed some): plan them again under the next id, and
        the claim decides which events are really still unreported."""
        for attempt in range(1, 100):
            stored = self._store.create_batch(batch)
            if stored.state in (BatchState.PLANNED, BatchState.CLAIMED):
                return stored
            new_id = batch_id(
                batch.customer,
                batch.meter,
                batch.period_start,
                batch.hour,
                batch.event_ids,
                attempt,
            )
            batch = batch.model_copy(update={"id": new_id, "identifier": new_id})
        raise RuntimeError(f"no free batch id for {batch.id}")

    def _claim_if_planned(self, batch: Batch) -> Batch | None:
        if batch.state == BatchState.PLANNED:
            if not self._has_time():
                return None
            try:
                batch = self._claim(batch)
            except Exception as error:  # a store fault: the batch stays planned for the next run
                self._tally.error(f"{batch.id}: claim failed: {type(error).__name__}: {error}")
                return None
        return batch if batch.state == BatchState.CLAIMED else None

    def _claim(self, batch: Batch) -> Batch:
        claimed = self._store.claim(batch)
        batch = self._store.mark_claimed(
            batch,
            quantity=sum(quantity for quantity, _ in claimed.values()),
            timestamp=max((when for _, when in claimed.values()), default=batch.timestamp),
            event_ids=sorted(claimed),
        )
        if batch.state == BatchState.EMPTY:
            self._tally.add(groups_empty=1)
        return batch

    def _send_all(self, batches: Sequence[Batch]) -> None:
        # Stripe allows one concurrent call per (customer, meter): a pair's batches go in order.
        pairs: dict[tuple[str, str], list[Batch]] = defaultdict(list)
        for batch in sorted(batches, key=lambda b: (b.timestamp, b.id)):
            pairs[(batch.customer, batch.meter)].append(batch)
        with ThreadPoolExecutor(max_workers=self._policy.parallel_pairs) as pool:
            list(pool.map(self._send_pair, pairs.values()))
        if self._abort.is_set():
            self._tally.summary.stopped_early = True

    def _send_pair(self, batches: list[Batch]) -> None:
        for batch in batches:
            if not self._has_time():
                self._tally.add(groups_deferred=1)
                continue
            try:
                self._deliver(batch)
            except Exception as error:  # a store fault: the batch stays claimed, resumed next run
                self._tally.add(groups_deferred=1)
                self._tally.error(f"{batch.id}: {type(error).__name__}: {error}")

    def _deliver(self, batch: Batch) -> None:
        now = int(self._clock())
        if too_old_for_stripe(batch.timestamp, now):
            self._store.quarantine(batch, "timestamp_out_of_window: older than Stripe's 35 days")
            self._tally.add(groups_quarantined=1)
            return
        request = MeterEventRequest(
            identifier=batch.identifier,
            event_name=batch.meter,
            customer=batch.customer,
            value=batch.quantity,
            timestamp=batch.timestamp,
        )
        for attempt in range(self._policy.rate_limit_attempts):
            try:
                self._billing.send(request)
            except RateLimited as limited:
                if attempt + 1 == self._policy.rate_limit_attempts or not self._has_time():
                    break
                self._sleep(self._backoff(attempt, limited.retry_after))
                continue
            except TransientBillingError as error:
                self._tally.error(f"{batch.id}: Stripe unavailable: {error}")
                break
            except PermanentBillingError as error:
                self._store.quarantine(batch, f"{error.code or 'rejected'}: {error}")
                self._tally.add(groups_quarantined=1)
                return
            except BillingAuthError as error:
                self._tally.error(f"Stripe refused the API key: {error}")
                self._abort.set()
                break
            self._store.confirm(batch, reported_at=int(self._clock()))
            self._tally.add(
                groups_sent=1, events_reported=len(batch.event_ids), units_reported=batch.quantity
            )
            return
        self._tally.add(groups_deferred=1)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        jittered = self._rng.uniform(
            0, min(self._policy.backoff_cap, self._policy.backoff_base * 2**attempt)
        )
        return max(jittered, retry_after or 0.0)
