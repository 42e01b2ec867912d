"""Keeping customers' billing periods in step with Stripe.

A webhook (or the backfill) names a subscription; the service reads it from Stripe again, so a
repeated, late or out-of-order delivery only ever stores Stripe's current state, and merges it
into what it knew:
- the current period of each item joins the item's known periods; an earlier period it overlaps
  was cut short (a plan change that resets the anchor) and ends where the new one starts;
- a canceled subscription's periods end at `ended_at`, and nothing is predicted after it;
- periods too old to receive usage are forgotten.
Then every counter whose period the new knowledge shortens is cut to match, so the flush stamps
its units inside the period Stripe bills them in.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from usage_meter.errors import StoreUnavailable
from usage_meter.logic.periods import period_for, rfc3339, scheduled_period
from usage_meter.models.domain import (
    Counter,
    CustomerBilling,
    ItemPeriods,
    Subscription,
    SubscriptionRead,
)

DAY = 86_400
# Events are accepted up to 33 days old; periods that ended before this are never looked up.
KEEP_PERIODS = 40 * DAY
# Counters are checked against new knowledge back this far: a year's period plus Stripe's window.
CUT_HORIZON = 400 * DAY
_ATTEMPTS = 8


class BillingStore(Protocol):
    def customer_billing(self, customer: str) -> CustomerBilling: ...

    def save_billing(self, billing: CustomerBilling, expected_version: int) -> bool:
        """Write it if the stored version is still `expected_version`; it is stored one higher."""
        ...

    def customer_counters(self, customer: str, since: str) -> Sequence[Counter]:
        """The customer's counters whose period starts at or after `since` (RFC 3339)."""
        ...

    def cut(self, counter: Counter, period_end: int) -> bool:
        """Shorten the counter's period to end at `period_end`, if it still ends where
        `counter` says."""
        ...


@dataclass(frozen=True)
class SyncResult:
    subscription: str
    customer: str
    status: str
    stale: bool  # a newer read was already stored: nothing changed
    counters_cut: int = 0


def _cut_at(periods: list[tuple[int, int]], at: int) -> list[tuple[int, int]]:
    """The periods as they are once a new period starts (or the subscription ends) at `at`."""
    return [(start, min(end, at)) for start, end in periods if start < at]


def _merge_item(known: Sequence[ItemPeriods], fresh: ItemPeriods, start_date: int) -> ItemPeriods:
    history = sorted({p for item in known for p in item.periods})
    [(start, end)] = fresh.periods
    merged = _cut_at(history, start)
    if not merged and start_date < start and fresh.anchor < start:
        # First seen mid-life (the backfill): the period before the current one follows the
        # same schedule, so usage recorded in it is billed where Stripe put it.
        previous, _ = scheduled_period(
            fresh.anchor, fresh.interval, fresh.interval_count, start - 1
        )
        merged = [(max(previous, start_date), start)]
    return fresh.model_copy(update={"periods": (*merged, (start, end))})


def merge(known: Subscription | None, fresh: SubscriptionRead, now: int) -> Subscription:
    """What the service knows of a subscription once it has read it again."""
    old_items = known.items if known else ()
    items: list[ItemPeriods] = []
    for item in fresh.items:
        same_meter = [i for i in old_items if i.meter == item.meter]
        items.append(_merge_item(same_meter, item, fresh.start_date))
    # A meter no longer on the subscription (a plan change swapped it) keeps its past periods.
    current = {i.meter for i in fresh.items}
    for item in old_items:
        if item.meter not in current:
            ended = fresh.items[0].periods[0][0] if fresh.items else int(fresh.read_at)
            items.append(
                item.model_copy(
                    update={"periods": tuple(_cut_at(list(item.periods), ended)), "renews": False}
                )
            )
    if fresh.ended_at is not None:
        items = [
            i.model_copy(
                update={"periods": tuple(_cut_at(list(i.periods), fresh.ended_at)), "renews": False}
            )
            for i in items
        ]
    kept = [
        i.model_copy(update={"periods": tuple(p for p in i.periods if p[1] > now - KEEP_PERIODS)})
        for i in items
    ]
    return Subscription(
        id=fresh.id,
        customer=fresh.customer,
        status=fresh.status,
        read_at=fresh.read_at,
        items=tuple(i for i in kept if i.periods),
    )


def sync(fresh: SubscriptionRead, store: BillingStore, now: int) -> SyncResult:
    """Store what Stripe says of one subscription, then cut the counters it shortens."""
    for _ in range(_ATTEMPTS):
        billing = store.customer_billing(fresh.customer)
        known = billing.subscriptions.get(fresh.id)
        if known is not None and known.read_at >= fresh.read_at:
            return SyncResult(fresh.id, fresh.customer, known.status, stale=True)
        subscriptions = {**billing.subscriptions, fresh.id: merge(known, fresh, now)}
        updated = billing.model_copy(update={"subscriptions": subscriptions})
        if store.save_billing(updated, expected_version=billing.version):
            break
    else:
        raise StoreUnavailable(f"customer {fresh.customer}'s billing kept changing; retry")
    cut = cut_counters(updated, store, now)
    return SyncResult(fresh.id, fresh.customer, fresh.status, stale=False, counters_cut=cut)


def cut_counters(billing: CustomerBilling, store: BillingStore, now: int) -> int:
    """Shorten every counter whose period, by what is known now, ends earlier: its units are
    then stamped before the boundary, in the period Stripe bills them in."""
    since = rfc3339(datetime.fromtimestamp(now - CUT_HORIZON, UTC))
    cut = 0
    for counter in store.customer_counters(billing.customer, since):
        start = datetime.fromisoformat(counter.period_start)
        end = int(period_for(billing, counter.meter, start).end.timestamp())
        if end < counter.period_end and store.cut(counter, end):
            cut += 1
    return cut


class SubscriptionReader(Protocol):
    def read(self, subscription_id: str) -> SubscriptionRead | None: ...


class WebhookStore(BillingStore, Protocol):
    def stripe_event_handled(self, event_id: str) -> bool: ...

    def remember_stripe_event(self, event_id: str, at: int) -> None: ...


@dataclass(frozen=True)
class WebhookOutcome:
    event: str
    handled: bool  # False: a duplicate delivery, or an event type this endpoint ignores
    sync: SyncResult | None = None


def handle_subscription_event(
    event_id: str,
    subscription_id: str,
    *,
    reader: SubscriptionReader,
    store: WebhookStore,
    now: int,
) -> WebhookOutcome:
    """One `customer.subscription.*` event: the subscription is read again from Stripe, so a
    repeated, late or out-of-order delivery stores Stripe's state as it is now."""
    if store.stripe_event_handled(event_id):
        return WebhookOutcome(event_id, handled=False)
    fresh = reader.read(subscription_id)
    result = sync(fresh, store, now) if fresh is not None else None
    store.remember_stripe_event(event_id, now)  # only once handled: a failure is retried
    return WebhookOutcome(event_id, handled=True, sync=result)
