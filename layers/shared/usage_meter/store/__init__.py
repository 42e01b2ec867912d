"""The storage interface the logic depends on. The DynamoDB adapter lives in store/dynamodb.py."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from usage_meter.models.domain import BacklogEvent, Batch, MeterTotals, UsageEvent


class EventStore(Protocol):
    def fingerprints(self, event_ids: Sequence[str]) -> Mapping[str, str]:
        """Fingerprints of the events among these ids that are already stored."""
        ...

    def put_events(self, events: Sequence[UsageEvent]) -> Mapping[str, str]:
        """Store new events with their period counters, atomically per event.

        Returns the fingerprints of events that were already stored (and so were not written).
        """
        ...


class UsageReader(Protocol):
    def period_totals(self, customer: str, period_start: str) -> Sequence[MeterTotals]: ...


class BacklogStore(Protocol):
    def backlog(self) -> Iterable[BacklogEvent]:
        """Every unreported event not yet in a batch: all shards, all pages."""
        ...

    def open_batches(self) -> Sequence[Batch]:
        """Batches a run planned or claimed but did not finish."""
        ...

    def create_batch(self, batch: Batch) -> Batch:
        """Write a planned batch, or return the one already stored under its id."""
        ...

    def claim(self, batch: Batch) -> Mapping[str, tuple[int, int]]:
        """Move the batch's events out of the backlog into it.

        Returns {event id: (quantity, event time)} for the events that now belong to the batch.
        """
        ...

    def mark_claimed(
        self, batch: Batch, quantity: int, timestamp: int, event_ids: Sequence[str]
    ) -> Batch:
        """Fix the batch's content; returns the stored one if another run got there first."""
        ...

    def confirm(self, batch: Batch, reported_at: int) -> None:
        """Mark the batch reported and add its quantity to the period counter's reported total."""
        ...

    def quarantine(self, batch: Batch, reason: str) -> None: ...
