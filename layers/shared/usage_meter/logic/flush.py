"""Flush: report every counter's new units to Stripe exactly once, in their period (DESIGN §6).

The record transaction adds each event to its (customer, meter, period) counter and puts the
counter in the backlog. A run reads the backlog a page at a time and, per counter:

1. **Decide**: what the next Stripe call carries (the units no decision covers yet, a
   timestamp inside the counter's period, the next decision number, which names the
   identifier) is written on the counter, conditional on nothing having changed since it read.
2. **Send** it. A counter with a decision in flight (an earlier run died, or Stripe did not
   answer) is sent the same decision again: Stripe deduplicates the identifier.
3. **Confirm** (the units join `reported`) or **quarantine** (Stripe refused them for good),
   each conditional on the decision still being in flight, so a stale run changes nothing.
4. **Release** the counter from the backlog once nothing is left to send.

Work and Stripe calls follow the counters with new units, not the events; memory holds one
page of counters.
"""

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from usage_meter.billing import (
    BillingAuthError,
    MeterBilling,
    PermanentBillingError,
    RateLimited,
    TransientBillingError,
)
from usage_meter.models.domain import Counter, Decision, MeterEventRequest
from usage_meter.models.output import FlushSummary
from usage_meter.store import CounterStore

MINUTE, HOUR = 60, 3600
MAX_STRIPE_VALUE = 10**15 - 1  # Stripe takes at most 15 significant digits
STRIPE_MAX_AGE = 35 * 24 * HOUR
SEND_MARGIN = 10 * 60  # a timestamp this close to Stripe's 35-day limit may arrive too late
# Stripe deduplicates an identifier for at least 24 hours. A decision still unconfirmed after
# this long may have been delivered, and a resend might no longer be recognised: it waits for an
# operator, who checks Stripe, rather than risk billing twice.
IDENTIFIER_WINDOW = 23 * HOUR
# A run sends nothing it read longer ago than this. Any run that could hold a decision has
# then given up on it, which is what lets an operator replay a quarantine safely (REPLAY_GUARD).
STALE_READ = 10 * 60


def too_old_for_stripe(timestamp: int, now: int) -> bool:
    return timestamp < now - STRIPE_MAX_AGE + SEND_MARGIN


def stamp_window(counter: Counter) -> tuple[int, int]:
    """The seconds a decision for the counter may carry, [first, last]: its period's whole
    minutes. Stripe's meter event summaries only take minute-aligned windows, so units stamped
    there reconcile per period exactly (a period shorter than that keeps its own seconds)."""
    start = int(_start(counter))
    first, last = -(-start // MINUTE) * MINUTE, counter.period_end // MINUTE * MINUTE - 1
    return (first, last) if first <= last else (start, counter.period_end - 1)


def stamp(counter: Counter, now: int) -> int:
    """The timestamp a decision sends: now, kept inside the period's whole minutes. In the
    period's first partial minute that is up to 59 s ahead, well inside the 5 minutes Stripe
    accepts; once the period ended, its last stampable second."""
    first, last = stamp_window(counter)
    return min(max(now, first), last)


@dataclass(frozen=True)
class FlushPolicy:
    reserve_seconds: float = 45.0  # stop taking new work with this much Lambda time left
    parallel_pairs: int = 4  # (customer, meter) pairs sent at once; each pair stays serial
    rate_limit_attempts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    # Stripe's invoice finalization grace period: units of a period that ended longer ago than
    # this would not be billed, so they are quarantined for an operator (replay --restamp).
    invoice_grace_seconds: int = 3600


@dataclass
class _Tally:
    summary: FlushSummary = field(default_factory=FlushSummary)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pairs: set[tuple[str, str]] = field(default_factory=set)  # (customer, meter) quarantined

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self.summary, name, getattr(self.summary, name) + value)

    def error(self, message: str) -> None:
        with self.lock:
            self.summary.errors.append(message)

    def found(self, page: Sequence[Counter], now: int) -> None:
        """The backlog's size and age, for the metrics: units not yet reported, and how long
        the oldest decision found still unconfirmed has waited since a run made it."""
        with self.lock:
            for counter in page:
                self.summary.units_unreported += max(
                    counter.quantity - counter.reported - counter.quarantined, 0
                )
                if counter.sending is not None:
                    age = max(now - counter.sending.decided_at, 0)
                    self.summary.oldest_unreported_seconds = max(
                        self.summary.oldest_unreported_seconds, age
                    )

    def quarantined(self, counter: Counter, decision: Decision) -> None:
        with self.lock:
            self.summary.quarantined += 1
            self.summary.units_quarantined += decision.value
            self.pairs.add((counter.customer, counter.meter))
            self.summary.pairs_quarantined = len(self.pairs)


class Flusher:
    def __init__(
        self,
        store: CounterStore,
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
        try:
            for page in self._store.backlog():
                if not self._has_time():
                    break
                self._tally.add(counters_read=len(page))
                self._tally.found(page, int(self._clock()))
                self._work(page, read_at=self._clock())
        except Exception as error:  # a store fault: what is decided stays for the next run
            self._tally.error(f"reading the backlog failed: {type(error).__name__}: {error}")
        return self._tally.summary

    def _has_time(self) -> bool:
        if self._abort.is_set() or self._time_left() <= self._policy.reserve_seconds:
            self._tally.summary.stopped_early = True
            return False
        return True

    def _work(self, page: Sequence[Counter], read_at: float) -> None:
        # Stripe allows one concurrent call per (customer, meter): a pair's shards go in turn.
        pairs: dict[tuple[str, str], list[Counter]] = defaultdict(list)
        for counter in page:
            pairs[(counter.customer, counter.meter)].append(counter)
        with ThreadPoolExecutor(max_workers=self._policy.parallel_pairs) as pool:
            list(pool.map(lambda counters: self._pair(counters, read_at), pairs.values()))

    def _pair(self, counters: list[Counter], read_at: float) -> None:
        for counter in counters:
            if not self._has_time():
                self._tally.add(deferred=1)
                continue
            try:
                self._counter(counter, read_at)
            except Exception as error:  # a store fault: the counter is picked up next run
                self._tally.add(deferred=1)
                self._tally.error(f"{counter.id}: {type(error).__name__}: {error}")

    def _counter(self, counter: Counter, read_at: float) -> None:
        now = int(self._clock())
        decision = counter.sending
        resumed = decision is not None
        if decision is not None:
            self._tally.add(resumed=1)
            if now - decision.decided_at > IDENTIFIER_WINDOW:
                self._quarantine(
                    counter,
                    decision,
                    "unconfirmed_decision: no answer from Stripe for a day; check the meter's "
                    f"events in Stripe for {counter.identifier(decision)} before replaying",
                    # Stripe may have it: a replay must not resend it under a new identifier
                    hold=True,
                )
                return
        else:
            decision = self._decide(counter, now)
            if decision is None:
                return
            counter = counter.model_copy(update={"seq": decision.seq, "sending": decision})
        if too_old_for_stripe(decision.timestamp, now):
            reason = "timestamp_too_far_in_past: older than Stripe's 35 days"
            if resumed:
                reason += f"; sent before: check Stripe for {counter.identifier(decision)}"
            self._quarantine(counter, decision, reason, hold=resumed)
            return
        if (
            not resumed
            and counter.period_source == "stripe_subscription"
            and now >= counter.period_end + self._policy.invoice_grace_seconds
        ):
            self._quarantine(
                counter,
                decision,
                "period_closed: the period's invoice is finalized and Stripe would not bill "
                "these units; replay with restamp to bill them in the current period",
            )
            return
        self._send(counter, decision, read_at, resumed=resumed)

    def _decide(self, counter: Counter, now: int) -> Decision | None:
        """The next decision for the counter's unsent units; None when there is nothing to send
        now, or another run decided first."""
        if counter.unsent < 0:  # more reported than recorded: never bill on, say so
            self._tally.error(f"{counter.id}: {-counter.unsent} units more accounted than recorded")
            return None
        if counter.unsent == 0:
            if self._store.release(counter):
                self._tally.add(released=1)
            return None
        if now < int(_start(counter)):
            return None  # usage recorded ahead into a period that has not begun
        decision = Decision(
            seq=counter.seq + 1,
            value=min(counter.unsent, MAX_STRIPE_VALUE),
            timestamp=stamp(counter, now),
            decided_at=now,
        )
        return decision if self._store.decide(counter, decision) else None

    def _send(self, counter: Counter, decision: Decision, read_at: float, *, resumed: bool) -> None:
        request = MeterEventRequest(
            identifier=counter.identifier(decision),
            event_name=counter.meter,
            customer=counter.customer,
            value=decision.value,
            timestamp=decision.timestamp,
        )
        for attempt in range(self._policy.rate_limit_attempts):
            if self._clock() - read_at > STALE_READ:
                break  # what this run read may have changed since: the next run reads again
            if attempt == 0:
                # Before Stripe can have the identifier: an asynchronous rejection finds it.
                self._store.log_send(counter, decision)
            try:
                self._billing.send(request)
            except RateLimited as limited:
                pause = self._backoff(attempt, limited.retry_after)
                if (
                    attempt + 1 == self._policy.rate_limit_attempts
                    or not self._has_time()
                    or self._time_left() - pause <= self._policy.reserve_seconds
                ):
                    break  # the next run resends it; a sleep must not run into the reserve
                self._sleep(pause)
                continue
            except TransientBillingError as error:
                self._tally.error(f"{counter.id}: Stripe unavailable: {error}")
                break
            except PermanentBillingError as error:
                # A resend is held: an earlier attempt may have been delivered with its answer
                # lost, and Stripe may validate before it deduplicates, so a replay must send
                # this decision again as it is, not its units anew.
                self._quarantine(
                    counter, decision, f"{error.code or 'rejected'}: {error}", hold=resumed
                )
                return
            except BillingAuthError as error:
                self._tally.error(f"Stripe refused the API key: {error}")
                self._abort.set()
                break
            if self._store.confirm(counter, decision):
                self._tally.add(sent=1, units_reported=decision.value)
                confirmed = counter.model_copy(
                    update={"reported": counter.reported + decision.value, "sending": None}
                )
                if confirmed.unsent == 0 and self._store.release(confirmed):
                    self._tally.add(released=1)
            return
        self._tally.add(deferred=1)

    def _quarantine(
        self, counter: Counter, decision: Decision, reason: str, *, hold: bool = False
    ) -> None:
        if self._store.quarantine(counter, decision, reason, int(self._clock()), hold=hold):
            self._tally.quarantined(counter, decision)
        else:  # changed meanwhile, or another decision is held: it stays for the next run
            self._tally.add(deferred=1)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        jittered = self._rng.uniform(
            0, min(self._policy.backoff_cap, self._policy.backoff_base * 2**attempt)
        )
        return max(jittered, retry_after or 0.0)


def _start(counter: Counter) -> float:
    return datetime.fromisoformat(counter.period_start).timestamp()
