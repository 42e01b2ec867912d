"""Operators' view of batches Stripe refused: list them, and replay them once the cause is fixed."""

from collections.abc import Sequence
from typing import Protocol

from usage_meter.errors import NotFound, UsageMeterError
from usage_meter.logic.flush import too_old_for_stripe
from usage_meter.models.domain import Batch, BatchState


class ReplayRefused(UsageMeterError):
    code = "replay_refused"


class QuarantineStore(Protocol):
    def quarantined_batches(self) -> Sequence[Batch]: ...

    def get_batch(self, batch_id: str) -> Batch | None: ...

    def replay(self, batch: Batch, identifier: str, timestamp: int) -> Batch: ...


def replay_identifier(batch: Batch) -> str:
    """A fresh Stripe identifier: Stripe keeps its first answer to the old one's idempotency key
    for 24 hours, so the same identifier would only be refused again. Safe, because a refused
    event was never recorded by Stripe."""
    _, _, attempt = batch.identifier.partition(".r")
    return f"{batch.id}.r{int(attempt or 0) + 1}"


def replay(store: QuarantineStore, batch_id: str, *, now: int, restamp: bool = False) -> Batch:
    """Put a quarantined batch back in line; the next flush sends it."""
    batch = store.get_batch(batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id}")
    if batch.state != BatchState.QUARANTINED:
        raise ReplayRefused(f"batch {batch_id} is {batch.state}, not quarantined")
    timestamp = batch.timestamp
    if too_old_for_stripe(timestamp, now):
        if not restamp:
            raise ReplayRefused(
                f"batch {batch_id} is older than Stripe's 35 days and would be refused again; "
                "replay it with restamp to send it with the current time (it then bills in the "
                "current Stripe period)"
            )
        timestamp = now
    return store.replay(batch, replay_identifier(batch), timestamp)
