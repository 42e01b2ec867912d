"""Operators' view of units Stripe refused: list them, and replay them once the cause is fixed."""

from datetime import UTC, datetime

from usage_meter.errors import NotFound, UsageMeterError
from usage_meter.logic.flush import IDENTIFIER_WINDOW, STALE_READ, too_old_for_stripe
from usage_meter.logic.periods import period_for, period_key
from usage_meter.models.domain import Counter
from usage_meter.store import QuarantineStore

# A replay waits until every run that could still hold the refused decision has given up on it
# (runs send nothing they read more than STALE_READ ago), so none can send it after the replay.
REPLAY_GUARD = STALE_READ + 5 * 60


class ReplayRefused(UsageMeterError):
    code = "replay_refused"


def replay(
    store: QuarantineStore,
    counter_id: str,
    *,
    now: int,
    restamp: bool = False,
    fresh: bool = False,
    invoice_grace_seconds: int = 3600,
) -> Counter:
    """Make a counter's quarantined units sendable again; the next flush sends them under a new
    decision, so a new identifier. A held decision (refused when resent: Stripe may have it) is
    sent again as it was while Stripe still deduplicates its identifier; after that, only with
    `fresh`, once an operator has checked Stripe. Returns the counter as it was."""
    counter = store.quarantined_counter(counter_id)
    if counter is None or not counter.quarantined:
        raise NotFound(f"no quarantined units in counter {counter_id}")
    quarantined_at = counter.quarantined_at or 0
    if now < quarantined_at + REPLAY_GUARD:
        when = datetime.fromtimestamp(quarantined_at + REPLAY_GUARD, UTC)
        raise ReplayRefused(
            f"counter {counter_id} was quarantined a moment ago, and a flush that read it may "
            f"still be running: replay it from {when:%Y-%m-%dT%H:%M:%SZ}"
        )
    held = counter.held
    if held is not None and not fresh:
        identifier = counter.identifier(held)
        if restamp or now - held.decided_at > IDENTIFIER_WINDOW:
            raise ReplayRefused(
                f"Stripe may already have {identifier} (an answer to it was lost) "
                "and no longer recognises it: check the meter's events in Stripe, and replay "
                "with fresh only if it is not there"
            )
        if counter.sending is not None:
            raise ReplayRefused(
                f"counter {counter_id} has a decision in flight; replay it after the next flush"
            )
        if not store.replay(counter, resend=True):
            raise ReplayRefused(f"counter {counter_id} changed while replaying it; try again")
        return counter
    target = None
    too_old = too_old_for_stripe(counter.period_end - 1, now)
    closed = (
        counter.period_source == "stripe_subscription"
        and now >= counter.period_end + invoice_grace_seconds
    )
    if too_old or closed:
        if not restamp:
            why = "ended more than Stripe's 35 days ago" if too_old else "has a finalized invoice"
            raise ReplayRefused(
                f"counter {counter_id}'s period {why}, so Stripe would not bill it there; replay "
                "it with restamp to bill the units in the current period instead"
            )
        billing = store.customer_billings([counter.customer])[counter.customer]
        period = period_for(billing, counter.meter, datetime.fromtimestamp(now, UTC))
        target = Counter(
            customer=counter.customer,
            meter=counter.meter,
            period_start=period_key(period),
            period_end=int(period.end.timestamp()),
            period_source=period.source,
        )
    if not store.replay(counter, restamp_to=target):
        raise ReplayRefused(f"counter {counter_id} changed while replaying it; try again")
    return counter
