"""Fault injection for the flush: a DynamoDB client that throttles, conflicts, loses answers or
dies on cue at a named step of the protocol, a billing adapter that dies with it, taps that pause
a run or record usage between two steps, and the invariant every scenario must end in."""

import threading
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError, ReadTimeoutError

from devtools.fake_stripe import FakeStripe
from usage_meter.billing import MeterBilling, SendOutcome
from usage_meter.logic.periods import calendar_month, period_key
from usage_meter.models.domain import Counter, Decision, MeterEventRequest
from usage_meter.store.dynamodb import DynamoStore, _to_counter

Key = tuple[str, str, str]  # customer, meter, period start

# The flush's writes and reads, as FaultyDynamoDB names them (Fault.step takes these or a raw
# botocore operation name).
STEPS = (
    "read_backlog",  # query on the backlog index
    "read_counters",  # the page's consistent BatchGetItem
    "decide",
    "confirm",
    "quarantine",
    "release",
    "replay",
    "record",
)
WRITE_KINDS = ("crash", "crash_after", "throttle", "retried", "lost")


class Crash(BaseException):
    """The process died here. BaseException, so no `except Exception` in the code under test
    can swallow it, as nothing survives a real kill."""


def _client_error(code: str, operation: str, reasons: list[str] | None = None) -> ClientError:
    response: dict[str, Any] = {"Error": {"Code": code, "Message": f"injected {code}"}}
    if reasons is not None:
        response["CancellationReasons"] = [{"Code": r} for r in reasons]
    return ClientError(response, operation)  # type: ignore[arg-type]


def step_of(operation: str, kwargs: dict[str, Any]) -> str:
    """Which step of the protocol a DynamoDB call is (by what it writes)."""
    if operation == "query":
        return "read_backlog" if kwargs.get("IndexName") else "query"
    if operation == "batch_get_item":
        return "read_counters"
    if operation == "update_item":
        expression = kwargs.get("UpdateExpression", "")
        if "sending_seq = :next" in expression:
            return "decide"
        if "ADD reported" in expression:
            return "confirm"
        if expression.startswith("REMOVE backlog_pk"):
            return "release"
    if operation == "transact_write_items":
        first = kwargs["TransactItems"][0]
        if "Put" in first and first["Put"]["Item"]["pk"]["S"].startswith("EVENT#"):
            return "record"
        expression = first.get("Update", {}).get("UpdateExpression", "")
        if "ADD quarantined" in expression:
            return "quarantine"
        if "quarantined = :zero" in expression:
            return "replay"
    return operation


@dataclass(frozen=True)
class Fault:
    """`kind` at the `at`-th call of `step` (a STEPS name or a botocore operation name).

    crash        the process dies before the call: nothing of it happens
    crash_after  the call is applied, then the process dies before it sees the answer
    throttle     DynamoDB refuses it (as after the SDK's own retries): nothing happens
    conflict     a transaction cancelled by a concurrent one: nothing happens
    retried      applied, its answer lost, and the SDK retried the same request: the retry is
                 judged against the new state (a conditional write fails its own condition; a
                 transaction's ClientRequestToken makes the retry a no-op)
    lost         applied, and the caller gets a timeout: it does not know
    """

    step: str
    at: int
    kind: str


class Process:
    """One Lambda invocation's life: once killed, its DynamoDB and Stripe calls all die."""

    def __init__(self) -> None:
        self.dead = threading.Event()

    def check(self, where: str) -> None:
        if self.dead.is_set():
            raise Crash(f"dead before {where}")

    def kill(self, where: str) -> None:
        self.dead.set()
        raise Crash(f"killed at {where}")


class FaultyDynamoDB:
    """Wraps a real botocore DynamoDB client and injects `faults` by protocol step."""

    def __init__(
        self, client: Any, faults: Iterable[Fault] = (), process: Process | None = None
    ) -> None:
        self._client = client
        self._faults = list(faults)
        self._calls: Tally[str] = Tally()
        self._lock = threading.Lock()
        self.process = process or Process()
        self.fired: list[Fault] = []

    @property
    def dead(self) -> bool:
        return self.process.dead.is_set()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target) or name in ("meta", "exceptions"):
            return target

        def call(**kwargs: Any) -> Any:
            fault = self._before(name, kwargs)
            if fault is None:
                return target(**kwargs)
            return self._inject(fault, name, target, kwargs)

        return call

    def get_paginator(self, name: str) -> Any:
        paginator = self._client.get_paginator(name)
        outer = self

        class _Paginator:
            def paginate(self, **kwargs: Any) -> Iterator[Any]:
                pages = iter(paginator.paginate(**kwargs))
                while True:
                    fault = outer._before(name, kwargs)
                    if fault is not None and fault.kind != "crash":
                        raise _client_error("ProvisionedThroughputExceededException", name)
                    try:
                        page = next(pages)
                    except StopIteration:
                        return
                    yield page

        return _Paginator()

    def _inject(self, fault: Fault, name: str, target: Any, kwargs: dict[str, Any]) -> Any:
        if fault.kind == "throttle":
            raise _client_error("ProvisionedThroughputExceededException", name)
        if fault.kind == "conflict":
            if name == "transact_write_items":
                writes = len(kwargs["TransactItems"])
                raise _client_error(
                    "TransactionCanceledException",
                    name,
                    ["TransactionConflict"] + ["None"] * (writes - 1),
                )
            raise _client_error("TransactionConflictException", name)
        if name == "transact_write_items":
            kwargs.setdefault("ClientRequestToken", str(uuid.uuid4()))
        target(**kwargs)
        if fault.kind == "crash_after":
            self.process.kill(f"{name} ({fault.step} #{fault.at}), after it was applied")
        if fault.kind == "retried":
            return target(**kwargs)
        if fault.kind == "lost":
            raise ReadTimeoutError(endpoint_url=f"injected: {name} applied, its answer lost")
        raise ValueError(f"unknown fault {fault.kind}")

    def _before(self, operation: str, kwargs: dict[str, Any]) -> Fault | None:
        """Count the call; die if the process is dead or this is its kill point; else the fault."""
        step = step_of(operation, kwargs)
        with self._lock:
            self.process.check(f"{operation} ({step})")
            self._calls[operation] += 1
            if step != operation:
                self._calls[step] += 1
            fault = next(
                (
                    f
                    for f in self._faults
                    if f.step in (step, operation) and f.at == self._calls[f.step]
                ),
                None,
            )
            if fault is None:
                return None
            self._faults.remove(fault)
            self.fired.append(fault)
        if fault.kind == "crash":
            self.process.kill(f"{operation} ({fault.step} #{fault.at})")
        return fault


Tap = Callable[[str, Any], None]


class TappedStore:
    """The flush's store, with `tap(point, counter)` called between its steps:
    `read` (a page read, before any decision), `decided`, `confirmed`, `quarantined`,
    `releasing`."""

    def __init__(self, store: Any, tap: Tap) -> None:
        self._store = store
        self._tap = tap

    def backlog(self) -> Iterator[Sequence[Counter]]:
        for page in self._store.backlog():
            self._tap("read", page)
            yield page

    def decide(self, counter: Counter, decision: Decision) -> bool:
        decided: bool = self._store.decide(counter, decision)
        self._tap("decided", counter)
        return decided

    def log_send(self, counter: Counter, decision: Decision) -> None:
        self._store.log_send(counter, decision)

    def confirm(self, counter: Counter, decision: Decision) -> bool:
        confirmed: bool = self._store.confirm(counter, decision)
        self._tap("confirmed", counter)
        return confirmed

    def quarantine(self, counter: Counter, decision: Decision, reason: str, at: int) -> bool:
        quarantined: bool = self._store.quarantine(counter, decision, reason, at)
        self._tap("quarantined", counter)
        return quarantined

    def release(self, counter: Counter) -> bool:
        self._tap("releasing", counter)
        return bool(self._store.release(counter))


class FaultyBilling:
    """The real Stripe adapter, inside the process: a dead process sends nothing. Taps
    `sending` before a call and `answered` after it (whatever the answer)."""

    def __init__(self, billing: MeterBilling, process: Process, tap: Tap | None = None) -> None:
        self._billing = billing
        self._process = process
        self._tap = tap or (lambda point, request: None)

    def send(self, request: MeterEventRequest) -> SendOutcome:
        self._process.check("a Stripe call")
        self._tap("sending", request)
        try:
            return self._billing.send(request)
        finally:
            self._tap("answered", request)


class Pause:
    """A tap that holds a run at the `occurrence`-th `point` until resumed: the run is then as
    stale as the clock says. Other points pass through to `then`."""

    def __init__(
        self,
        point: str,
        occurrence: int = 1,
        then: Tap | None = None,
        customer: str | None = None,
    ) -> None:
        self.point = point
        self.customer = customer  # only points about this customer's counters count
        self.occurrence = occurrence
        self.reached = threading.Event()
        self._resume = threading.Event()
        self._seen = 0
        self._lock = threading.Lock()
        self._then = then

    def __call__(self, point: str, subject: Any = None) -> None:
        if self._then is not None:
            self._then(point, subject)
        if point != self.point:
            return
        if self.customer is not None and getattr(subject, "customer", None) != self.customer:
            return
        with self._lock:
            self._seen += 1
            hold = self._seen == self.occurrence
        if hold:
            self.reached.set()
            self._resume.wait(timeout=120)

    def resume(self) -> None:
        self._resume.set()


class Periods:
    """The truth about billing periods, kept apart from the service's own logic: a customer on
    a Stripe subscription has periods between its boundaries (set at arbitrary seconds), any
    other has UTC calendar months."""

    def __init__(self) -> None:
        self.boundaries: dict[str, list[int]] = {}

    def of(self, customer: str, timestamp: int) -> str:
        edges = self.boundaries.get(customer, [])
        starts = [edge for edge in edges[:-1] if edge <= timestamp]
        if starts and timestamp < edges[-1]:
            return period_key_of(starts[-1])
        return period_key(calendar_month(datetime.fromtimestamp(timestamp, UTC)))


def period_key_of(start: int) -> str:
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Ledger:
    """What the service accepted, per (customer, meter, period): the truth both Stripe and the
    counters customers read must match."""

    accepted: Tally[Key] = field(default_factory=Tally)
    lock: threading.Lock = field(default_factory=threading.Lock)
    periods: Periods = field(default_factory=Periods)

    def add(self, customer: str, meter: str, quantity: int, timestamp: int) -> None:
        with self.lock:
            self.accepted[(customer, meter, self.periods.of(customer, timestamp))] += quantity


def period_of(timestamp: int) -> str:
    return period_key(calendar_month(datetime.fromtimestamp(timestamp, UTC)))


def stripe_totals(stripe: FakeStripe, periods: Periods) -> Tally[Key]:
    """What Stripe accepted, each identifier once, by the period its timestamp falls in."""
    totals: Tally[Key] = Tally()
    for event in stripe.accepted():
        key = (event.customer, event.event_name, periods.of(event.customer, event.timestamp))
        totals[key] += event.value
    return totals


def all_counters(client: Any, table: str) -> list[Counter]:
    """Every counter shard in the table (a scan: for checking, never for the service)."""
    paginator = client.get_paginator("scan")
    counters = []
    for page in paginator.paginate(
        TableName=table,
        FilterExpression="begins_with(sk, :p)",
        ExpressionAttributeValues={":p": {"S": "PERIOD#"}},
        ConsistentRead=True,
    ):
        counters.extend(_to_counter(item, table) for item in page["Items"])
    return counters


def backlog_size(client: Any, table: str) -> int:
    paginator = client.get_paginator("scan")
    return sum(page["Count"] for page in paginator.paginate(TableName=table, IndexName="backlog"))


def check_invariant(
    ledger: Ledger, stripe: FakeStripe, store: DynamoStore, client: Any, table: str
) -> dict[str, int]:
    """Both sides of exactly-once, in units (all 0 when the invariant holds):

    - lost / doubled: per (customer, meter, period), Stripe's total (each identifier once, by
      its timestamp's period) plus the quarantined units against the accepted units;
    - left_unreported: units no counter has reported or quarantined, and in_backlog: counters
      still waiting in the backlog index;
    - miscounted / misreported: what customers read (period_totals, summed over shards): the
      quantity against the accepted units, `reported` against what Stripe accepted;
    - off_period: units Stripe holds under an identifier whose counter's period does not
      contain the event's timestamp (or under no counter at all).
    """
    counters = all_counters(client, table)
    by_id = {c.id: c for c in counters}
    billed = stripe_totals(stripe, ledger.periods)
    quarantined: Tally[Key] = Tally()
    left = 0
    for c in counters:
        quarantined[(c.customer, c.meter, c.period_start)] += c.quarantined
        left += abs(c.quantity - c.reported - c.quarantined)
    off_period = 0
    for event in stripe.accepted():
        owner = by_id.get(event.identifier.rsplit(".", 1)[0])
        start = owner and datetime.fromisoformat(owner.period_start).timestamp()
        if owner is None or not start <= event.timestamp < owner.period_end:  # type: ignore[operator]
            off_period += abs(event.value)
    keys = (
        set(ledger.accepted)
        | set(billed)
        | {(c.customer, c.meter, c.period_start) for c in counters}
    )
    lost = doubled = miscounted = misreported = 0
    seen: dict[Key, tuple[int, int]] = {}
    for customer, period in {(k[0], k[2]) for k in keys}:
        for totals in store.period_totals(customer, period):
            seen[(customer, totals.meter, period)] = (totals.quantity, totals.reported)
    for key in keys:
        difference = billed[key] + quarantined[key] - ledger.accepted[key]
        doubled += max(difference, 0)
        lost += max(-difference, 0)
        quantity, reported = seen.get(key, (0, 0))
        miscounted += abs(quantity - ledger.accepted[key])
        misreported += abs(reported - billed[key])
    return {
        "lost": lost,
        "doubled": doubled,
        "left_unreported": left,
        "in_backlog": backlog_size(client, table),
        "miscounted": miscounted,
        "misreported": misreported,
        "off_period": off_period,
    }


CLEAN = {
    "lost": 0,
    "doubled": 0,
    "left_unreported": 0,
    "in_backlog": 0,
    "miscounted": 0,
    "misreported": 0,
    "off_period": 0,
}
