"""The storage interface the logic depends on. The DynamoDB adapter lives in store/dynamodb.py."""

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from usage_meter.models.domain import (
    Counter,
    CustomerBilling,
    Decision,
    MeterTotals,
    SentDecision,
    UsageEvent,
)


class BillingReader(Protocol):
    def customer_billings(self, customers: Sequence[str]) -> Mapping[str, CustomerBilling]:
        """Each customer's known Stripe subscriptions (an empty record when none)."""
        ...


class EventStore(BillingReader, Protocol):
    def fingerprints(self, event_ids: Sequence[str]) -> Mapping[str, str]:
        """Fingerprints of the events among these ids that are already stored."""
        ...

    def put_events(self, events: Sequence[UsageEvent]) -> Mapping[str, str]:
        """Store new events, each atomically with its period counter, which then waits in the
        backlog until it is reported.

        Returns the fingerprints of events that were already stored (and so were not written).
        """
        ...


class UsageReader(BillingReader, Protocol):
    def period_totals(
        self, customer: str, start: str, end: str | None = None
    ) -> Sequence[MeterTotals]:
        """Totals per meter of the counters whose period starts at `start` or, given `end`,
        anywhere in [start, end)."""
        ...


class CounterStore(Protocol):
    """The flush's view: counters with unsent or in-flight units, and the conditional writes
    that move units from decided to reported or quarantined. Every write is conditional on the
    state its caller read, so a stale run changes nothing."""

    def backlog(self) -> Iterator[Sequence[Counter]]:
        """Every counter in the backlog, read consistently, in pages of a bounded size."""
        ...

    def log_send(self, counter: Counter, decision: Decision) -> None:
        """Log the decision by its identifier before Stripe can have it (idempotent)."""
        ...

    def decide(self, counter: Counter, decision: Decision) -> bool:
        """Write the decision on the counter, if no other was made since `counter` was read."""
        ...

    def confirm(self, counter: Counter, decision: Decision) -> bool:
        """Stripe has the decision's units: add them to `reported`, if it is still in flight."""
        ...

    def quarantine(
        self, counter: Counter, decision: Decision, reason: str, at: int, *, hold: bool = False
    ) -> bool:
        """Stripe refused the decision for good: its units wait for an operator, if it is still
        in flight. With hold (a resend), the decision is kept for the replay to send again; only
        one is kept per counter, so this is refused while another is held."""
        ...

    def release(self, counter: Counter) -> bool:
        """Take the counter out of the backlog, if it still holds exactly what `counter` says
        and nothing of that is unsent or in flight."""
        ...


class QuarantineStore(BillingReader, Protocol):
    def quarantined(self) -> Sequence[Counter]: ...

    def quarantined_counter(self, counter_id: str) -> Counter | None: ...

    def replay(
        self, counter: Counter, *, restamp_to: Counter | None = None, resend: bool = False
    ) -> bool:
        """Make the quarantined units sendable again (under a fresh decision), if nothing changed
        since `counter` was read; with restamp_to, move them into that (current) period. With
        resend, the held decision goes back in flight as it was (nothing else may be in flight);
        the rest of the quarantined units become unsent."""
        ...


class RejectionStore(Protocol):
    """Stripe's asynchronous rejections: a logged decision's units leave `reported` (or its
    in-flight state) for the quarantine, once."""

    def sent(self, identifier: str) -> SentDecision | None: ...

    def counter_of(self, sent: SentDecision) -> Counter | None: ...

    def unreport(self, counter: Counter, sent: SentDecision, reason: str, at: int) -> bool:
        """Move the decision's units into the quarantine, if the counter is as read and the
        decision was not taken back before. Its units were confirmed, or, when the counter
        still has it in flight, are taken out of flight."""
        ...
