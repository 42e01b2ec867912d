"""The service's own vocabulary: events as stored facts, periods, counters reported to Stripe."""

import hashlib
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

PeriodSource = Literal["calendar_month", "stripe_subscription"]
Interval = Literal["day", "week", "month", "year"]


class Period(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    start: datetime
    end: datetime
    source: PeriodSource = "calendar_month"

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


class ItemPeriods(BaseModel):
    """One metered subscription item's billing periods, as synced from Stripe."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    item: str
    meter: str  # the event_name of the Meter its price bills
    anchor: int  # billing_cycle_anchor, Unix seconds
    interval: Interval
    interval_count: int = 1
    # Known periods [start, end), oldest first, never overlapping: the current one last.
    periods: tuple[tuple[int, int], ...] = ()
    renews: bool = True  # the next period follows the last on the anchor's schedule


class Subscription(BaseModel):
    """A customer's subscription as the service last read it from Stripe."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    id: str
    customer: str
    status: str
    read_at: float  # when it was read from Stripe: an older read never replaces a newer one
    items: tuple[ItemPeriods, ...] = ()


class SubscriptionRead(BaseModel):
    """A subscription as just read from Stripe: each item carries its current period only."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    id: str
    customer: str
    status: str
    read_at: float
    start_date: int
    ended_at: int | None = None  # set once canceled: no period runs past it
    items: tuple[ItemPeriods, ...] = ()


class CustomerBilling(BaseModel):
    """Every subscription the service knows for one customer."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    customer: str
    subscriptions: dict[str, Subscription] = {}
    version: int = 0  # bumped on every write: syncs update it optimistically

    def items_for(self, meter: str) -> list[ItemPeriods]:
        """The items billing this meter; without any, every item, as the customer's cycle."""
        items = [i for s in self.subscriptions.values() for i in s.items]
        return [i for i in items if i.meter == meter] or items


class UsageEvent(BaseModel):
    """An accepted event, as the store keeps it."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    id: str
    customer: str
    meter: str
    quantity: int
    event_time: int  # Unix seconds: Stripe's own resolution
    received_at: int
    period: Period
    idempotency_key: str | None
    fingerprint: str  # what "the same body" means for a replay


class RecordResult(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    id: str
    duplicate: bool


class MeterTotals(BaseModel):
    """One period counter: everything accepted, and the part Stripe has confirmed."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    meter: str
    quantity: int = 0
    reported: int = 0


class Decision(BaseModel):
    """What one Stripe call for a counter carries, written on the counter before the call: a
    resend after any crash or lost answer reuses it, identifier included."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    seq: int  # the counter's decision number; never reused, so identifiers never repeat
    value: int
    timestamp: int  # Unix seconds inside the counter's period, sent to Stripe
    decided_at: int


class Counter(BaseModel):
    """One (customer, meter, period) counter shard: the record writes add to it, and it is the
    unit the flush reports. Hot pairs spread over a few shards, each reported on its own."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    customer: str
    meter: str
    period_start: str  # the period's key (RFC 3339 start)
    # The table it lives in: two stacks reporting to one Stripe account never share identifiers.
    namespace: str = ""
    period_end: int  # Unix seconds, exclusive
    # A subscription's period closes when Stripe finalizes its invoice; a calendar month never.
    period_source: PeriodSource = "calendar_month"
    shard: int = 0
    quantity: int = 0  # every accepted unit
    reported: int = 0  # units Stripe confirmed
    quarantined: int = 0  # units Stripe refused, until an operator replays them
    seq: int = 0  # decisions made so far
    sending: Decision | None = None  # the decision in flight, if any
    # A quarantined decision that had been sent before: Stripe may have it (an answer lost, then
    # a refusal), so a replay sends it again as it was, identifier included, never anew.
    held: Decision | None = None
    quarantine_reason: str | None = None
    quarantined_at: int | None = None

    @property
    def id(self) -> str:
        """Short and stable: the Stripe identifier's stem and the operators' handle."""
        parts = (self.namespace, self.customer, self.meter, self.period_start, str(self.shard))
        return f"umc_{hashlib.sha256(chr(31).join(parts).encode()).hexdigest()[:32]}"

    @property
    def unsent(self) -> int:
        """Units no decision covers yet: neither reported, quarantined nor in flight."""
        in_flight = self.sending.value if self.sending else 0
        return self.quantity - self.reported - self.quarantined - in_flight

    def identifier(self, decision: Decision) -> str:
        """The decision's Stripe identifier: decision numbers never repeat on a counter."""
        return f"{self.id}.{decision.seq}"


class MeterEventRequest(BaseModel):
    """What one Stripe call carries."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int


class SentDecision(BaseModel):
    """A decision as logged before its Stripe call, by identifier: what Stripe's asynchronous
    rejection of that identifier takes back, and what reconciliation counts."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    identifier: str
    customer: str
    meter: str
    period_start: str
    shard: int
    seq: int
    value: int
    timestamp: int
    rejected_at: int | None = None
    reason: str | None = None
