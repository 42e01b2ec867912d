"""A small usage-meter world for fault tests: a table on DynamoDB Local, the fake Stripe behind
the real SDK, one clock for the service and Stripe (which may run skewed), a ledger of accepted
usage, and flush runs that can be killed, paused, or raced."""

import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import ClientError

from devtools.fake_stripe import FakeStripe
from tests.clock import quiet_instant
from tests.faults.harness import (
    Crash,
    Fault,
    FaultyBilling,
    FaultyDynamoDB,
    Ledger,
    Process,
    Tap,
    TappedStore,
    all_counters,
    backlog_size,
    check_invariant,
)
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.logic.periods import schedule_point
from usage_meter.logic.quarantine import ReplayRefused, replay
from usage_meter.logic.record import LateUsage, record_events
from usage_meter.logic.subscriptions import sync
from usage_meter.models.domain import Counter, ItemPeriods, SubscriptionRead
from usage_meter.models.input import EventIn
from usage_meter.models.output import FlushSummary
from usage_meter.store.dynamodb import DynamoStore

METERS = {"ai_messages", "api_calls"}
# Stripe's longest invoice grace (72 h): every period a schedule touches still takes usage.
GRACE = 72 * 3600
FAST = FlushPolicy(
    reserve_seconds=1.0, backoff_base=0.01, backoff_cap=0.05, invoice_grace_seconds=GRACE
)


class Clock:
    """The service's clock: real time plus an offset that tests move forward."""

    def __init__(self, at: float | None = None) -> None:
        self._offset = 0.0 if at is None else at - time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds

    def set(self, at: float) -> None:
        with self._lock:
            self._offset = at - time.time()


class StripeClock:
    """The fake Stripe's clock: the current world's clock plus a skew (negative: behind)."""

    def __init__(self) -> None:
        self.clock: Callable[[], float] = time.time
        self.skew = 0.0

    def __call__(self) -> float:
        return self.clock() + self.skew


class World:
    def __init__(
        self,
        table_name: str,
        endpoint_url: str,
        stripe: FakeStripe,
        stripe_clock: StripeClock | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.table = table_name
        self.endpoint_url = endpoint_url
        self.stripe = stripe
        # Mid-month, mid-hour: a scenario's usage (a few hours back) and its runs (a day at
        # most) stay in one month, and a test's ten events in one hour, whatever the wall clock.
        self.clock = clock or Clock(quiet_instant(time.time()))
        self.stripe_clock = stripe_clock or StripeClock()
        self.stripe_clock.clock, self.stripe_clock.skew = self.clock, 0.0
        self.ledger = Ledger()
        self.db = self.client()
        self.store = DynamoStore(table_name, client=self.db, clock=self.clock)

    def client(self) -> Any:
        return boto3.client(
            "dynamodb",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )

    def now(self) -> int:
        return int(self.clock())

    # -- recording ---------------------------------------------------------------------------

    def record(self, events: Iterable[dict[str, Any]], now: float | None = None) -> None:
        at = datetime.fromtimestamp(self.clock() if now is None else now, UTC)
        requests = [EventIn.model_validate(e) for e in events]
        results = record_events(
            requests,
            meters=METERS,
            store=self.store,
            now=at,
            batch=True,
            late=LateUsage(grace_seconds=GRACE),
        )
        for request, result in zip(requests, results, strict=True):
            if not result.duplicate:
                when = request.timestamp or at
                self.ledger.add(
                    request.stripe_customer_id,
                    request.meter,
                    request.quantity,
                    int(when.timestamp()),
                )

    def subscribe(self, customer: str, renewal: int) -> None:
        """Put the customer on a monthly Stripe subscription that renewed at `renewal` (any
        second): the service learns it as from a webhook, the ledger keeps the truth."""
        previous = schedule_point(renewal, "month", 1, -1)
        following = schedule_point(renewal, "month", 1, 1)
        self.ledger.periods.boundaries[customer] = [previous, renewal, following]
        item = ItemPeriods(
            item=f"si_{customer}",
            meter="",  # a licensed item: every meter follows the customer's cycle
            anchor=previous,  # the anchor Stripe reports is the original one
            interval="month",
            periods=((renewal, following),),
        )
        read = SubscriptionRead(
            id=f"sub_{customer}",
            customer=customer,
            status="active",
            read_at=self.clock(),
            start_date=previous - 86_400,
            items=(item,),
        )
        sync(read, self.store, self.now())

    def record_random(self, rng: random.Random, count: int, customers: int = 3) -> None:
        now = self.now()
        self.record(
            {
                "stripe_customer_id": f"cus_F{rng.randrange(customers)}",
                "meter": rng.choice(sorted(METERS)),
                "quantity": rng.randint(1, 10 ** rng.randint(0, 6)),
                "timestamp": now - rng.randrange(6 * 3600),
                "idempotency_key": f"k{rng.randrange(10**12)}",
            }
            for _ in range(count)
        )

    # -- flushing ----------------------------------------------------------------------------

    def flusher(
        self,
        faults: Iterable[Fault] = (),
        *,
        tap: Tap | None = None,
        time_left: Callable[[], float] | None = None,
        policy: FlushPolicy = FAST,
        stripe_timeout: float = 2.0,
        stripe_retries: int = 2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> tuple[Flusher, FaultyDynamoDB]:
        """One run, as one Lambda invocation, with its own clients."""
        db = FaultyDynamoDB(self.client(), faults, Process())
        store: Any = DynamoStore(self.table, client=db, clock=self.clock)
        if tap is not None:
            store = TappedStore(store, tap)
        billing = StripeMeterBilling(
            "sk_test_faults",
            api_base=self.stripe.url,
            timeout_seconds=stripe_timeout,
            max_network_retries=stripe_retries,
            max_requests_per_second=1000,
        )
        flusher = Flusher(
            store,
            FaultyBilling(billing, db.process, tap),
            time_left=time_left or (lambda: 300.0),
            clock=self.clock,
            sleep=sleep,
            policy=policy,
        )
        return flusher, db

    def flush(self, faults: Iterable[Fault] = (), **options: Any) -> FlushSummary | None:
        """One run; None when it was killed or failed outright."""
        flusher, _ = self.flusher(faults, **options)
        return run(flusher)

    def settle(self, runs: int = 6) -> list[FlushSummary]:
        """Later runs with no faults: what every deployment gets on the next schedule ticks."""
        summaries = []
        for _ in range(runs):
            summary = self.flush()
            assert summary is not None
            summaries.append(summary)
            if not summary.errors and not summary.deferred and not self.backlog_size():
                break
        return summaries

    # -- operators ---------------------------------------------------------------------------

    def quarantined(self) -> list[Counter]:
        return list(self.store.quarantined())

    def replay_all(self) -> int:
        """An operator replays every quarantine the guard allows; returns how many."""
        replayed = 0
        for counter in self.store.quarantined():
            try:
                replay(self.store, counter.id, now=self.now())
                replayed += 1
            except ReplayRefused:
                pass
        return replayed

    # -- checking ----------------------------------------------------------------------------

    def counters(self) -> list[Counter]:
        return all_counters(self.db, self.table)

    def backlog_size(self) -> int:
        return backlog_size(self.db, self.table)

    def invariant(self) -> dict[str, int]:
        return check_invariant(self.ledger, self.stripe, self.store, self.db, self.table)


def run(flusher: Flusher) -> FlushSummary | None:
    try:
        return flusher.run()
    except (Crash, ClientError):  # killed, or failed outright: the invocation errs
        return None


def in_thread(target: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Start `target(*args)` in a thread; the list receives its result."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(target(*args)), daemon=True)
    thread.start()
    return thread, out
