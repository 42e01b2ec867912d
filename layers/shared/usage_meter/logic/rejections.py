"""Stripe's asynchronous rejections: usage Stripe answered 200 for, then refused.

Stripe validates a meter event after accepting it. An unknown customer, an archived or missing
meter, or a bad value is reported minutes later as an error report, through an event
destination, with sample identifiers. Each sampled identifier is looked up in the decisions the
flush logged before sending, and its units go from `reported` (or from flight, if the flush has
not confirmed it yet) to the counter's quarantine, with Stripe's code as the reason: the portal
shows them as pending, `status` and `quarantine list` show them, the alarm fires, and a replay
sends them again under a new identifier once the cause is fixed. A report carries samples, not
every failed identifier: reconciliation finds the rest.
"""

from collections import Counter as Tally
from dataclasses import dataclass
from typing import Protocol

from usage_meter.store import RejectionStore

_ATTEMPTS = 5  # a flush confirming the same counter meanwhile: read again and retry


@dataclass(frozen=True)
class Rejection:
    identifier: str
    code: str  # Stripe's: meter_event_customer_not_found, archived_meter, no_meter, ...
    message: str = ""


class HandledEvents(Protocol):
    def stripe_event_handled(self, event_id: str) -> bool: ...

    def remember_stripe_event(self, event_id: str, at: int) -> None: ...


class Store(RejectionStore, HandledEvents, Protocol): ...


def take_back(rejection: Rejection, store: RejectionStore, now: int) -> str:
    """Quarantine the units of one rejected identifier. Returns what happened: `quarantined`,
    `already` (taken back before), `unknown` (not an identifier this stack sent, or its log
    expired) or `unresolved` (its counter no longer holds those units as reported or in flight,
    e.g. an operator already moved them)."""
    for _ in range(_ATTEMPTS):
        sent = store.sent(rejection.identifier)
        if sent is None:
            return "unknown"
        if sent.rejected_at is not None:
            return "already"
        counter = store.counter_of(sent)
        if counter is None:
            return "unknown"
        reason = f"{rejection.code}: Stripe rejected {rejection.identifier} after accepting it"
        if rejection.message:
            reason += f" ({rejection.message})"
        if store.unreport(counter, sent, reason, now):
            return "quarantined"
    return "unresolved"


def handle_error_report(
    event_id: str, rejections: list[Rejection], store: Store, now: int
) -> Tally[str] | None:
    """One error report, once per event id; None when it was handled before."""
    if store.stripe_event_handled(event_id):
        return None
    outcomes = Tally(take_back(rejection, store, now) for rejection in rejections)
    store.remember_stripe_event(event_id, now)
    return outcomes
