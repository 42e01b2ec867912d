"""One design's figures, measured on a DynamoDB Local through its real store, flush and Stripe
adapter (the fake Stripe behind the real SDK). `benchmarks.compare` runs this module once per
design, with PYTHONPATH at that design's layers/shared: the same scenarios drive whichever
`usage_meter` is importable, through the entry points both designs share (record_events,
DynamoStore, Flusher, StripeMeterBilling).

    python -m benchmarks.scenarios --endpoint http://127.0.0.1:8000 --template template.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

from benchmarks.capacity import Bill, IndexSpec, Meter
from devtools.fake_stripe import FakeStripe
from devtools.template import create_usage_table, load_template, table_create_kwargs
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.errors import StoreUnavailable
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore

METER = "m"
HOUR = 3600
# A DynamoDB transaction commits in about 10-20 ms; while it does, it holds its items.
HOLD_SECONDS = 0.02


class Bench:
    def __init__(self, endpoint: str, template_path: Path, quick: bool) -> None:
        self.endpoint = endpoint
        self.template = load_template(template_path)
        self.quick = quick
        self._session = botocore.session.get_session()
        self.admin = self.client()
        self.fake = FakeStripe().start()
        self.billing = StripeMeterBilling(
            "sk_test_bench",
            api_base=self.fake.url,
            max_network_retries=2,
            max_requests_per_second=100_000,
        )
        self._keys = 0

    def client(self) -> Any:
        return self._session.create_client(
            "dynamodb",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=Config(retries={"mode": "standard", "max_attempts": 6}, max_pool_connections=32),
        )

    def table(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:10]}"
        create_usage_table(self.admin, name, self.template)
        return name

    def indexes(self) -> tuple[list[IndexSpec], tuple[str, ...]]:
        kwargs = table_create_kwargs(self.template, "x")
        return IndexSpec.from_table(kwargs), tuple(k["AttributeName"] for k in kwargs["KeySchema"])

    def event(self, customer: str, quantity: int = 1, timestamp: int | None = None) -> EventIn:
        self._keys += 1
        body: dict[str, Any] = {
            "stripe_customer_id": customer,
            "meter": METER,
            "quantity": quantity,
            "idempotency_key": f"bench-{self._keys:08d}",
        }
        if timestamp is not None:
            body["timestamp"] = timestamp
        return EventIn.model_validate(body)

    def record(self, store: Any, events: Sequence[EventIn], *, batch: bool) -> None:
        record_events(events, meters={METER}, store=store, now=datetime.now(UTC), batch=batch)

    def flusher(self, store: Any) -> Flusher:
        return Flusher(store, self.billing, time_left=lambda: 900.0)

    # -- 1. write units per event -------------------------------------------------------------

    def write_units(self) -> dict[str, Any]:
        """Record then flush, twice (the second cycle finds its counters already there), with
        every call priced. Single requests: 2 pairs; batches of 100: 10 pairs. Each pair gets
        100 events between flushes."""
        indexes, table_keys = self.indexes()
        cycles = 2
        results: dict[str, Any] = {}
        for mode, customers, requests in (("single", 2, 200), ("batch", 10, 10)):
            client = self.client()
            meter = Meter(client, indexes, table_keys)
            store = DynamoStore(self.table(), client=client)
            record, flush = Bill(), Bill()
            events = 0
            for _ in range(cycles):
                start = meter.bill.snapshot()
                for r in range(requests):
                    if mode == "single":
                        self.record(store, [self.event(f"cus_S{r % customers}")], batch=False)
                        events += 1
                    else:
                        batch = [self.event(f"cus_B{i % customers}") for i in range(100)]
                        self.record(store, batch, batch=True)
                        events += 100
                middle = meter.bill.snapshot()
                summary = self.flusher(store).run()
                assert not summary.errors, summary.errors
                end = meter.bill.snapshot()
                record = _add(record, middle - start)
                flush = _add(flush, end - middle)
            results[mode] = {
                "events": events,
                "requests": requests * cycles,
                "pairs": customers,
                "record": _bill(record),
                "flush": _bill(flush),
            }
        return results

    def latency(self) -> dict[str, float]:
        """Unmetered wall time of one request, as a proxy for the record Lambda's duration."""
        store = DynamoStore(self.table(), client=self.client())
        singles, batches = [], []
        for r in range(30 if self.quick else 100):
            started = time.perf_counter()
            self.record(store, [self.event(f"cus_L{r % 2}")], batch=False)
            singles.append(time.perf_counter() - started)
        for _ in range(3 if self.quick else 10):
            batch = [self.event(f"cus_L{i % 10}") for i in range(100)]
            started = time.perf_counter()
            self.record(store, batch, batch=True)
            batches.append(time.perf_counter() - started)
        return {
            "single_request_s": statistics.median(singles),
            "batch_request_s": statistics.median(batches),
        }

    # -- 2 and 3. Stripe calls and drain rate on the issue's backlog -----------------------------

    def drain(self) -> dict[str, Any]:
        """The median of up to 3 runs, each on a fresh backlog, stopping once the flushes took
        2 s in all: one short flush says more about the machine's load than about the design."""
        runs: list[dict[str, Any]] = []
        while len(runs) < 3 and sum(r["flush_seconds"] for r in runs) < 2.0:
            runs.append(self.drain_once())
        runs.sort(key=lambda r: r["flush_seconds"])
        return {**runs[len(runs) // 2], "flush_seconds_all": [r["flush_seconds"] for r in runs]}

    def drain_once(self) -> dict[str, Any]:
        store = DynamoStore(self.table(), client=self.client())
        events, groups, pairs = issue_backlog(self, datetime.now(UTC))
        started = time.perf_counter()
        for chunk in _chunks(events, 100):
            self.record(store, chunk, batch=True)
        recorded = time.perf_counter() - started
        self.fake.reset()
        started = time.perf_counter()
        summary = self.flusher(store).run()
        seconds = time.perf_counter() - started
        calls = self.fake.calls
        accepted = self.fake.accepted()
        again = self.flusher(store).run()
        return {
            "events": len(events),
            "units": sum(e.quantity for e in events),
            "groups": groups,
            "pairs": pairs,
            "record_seconds": recorded,
            "flush_seconds": seconds,
            "events_per_second": len(events) / seconds,
            "stripe_calls": calls,
            "stripe_events": len(accepted),
            "stripe_units": sum(e.value for e in accepted),
            "second_flush_calls": self.fake.calls - calls,
            "errors": summary.errors[:3] + again.errors[:3],
        }

    # -- 4. hot customer ------------------------------------------------------------------------

    def writers(self, hot: bool, writers: int, requests: int, emulate: bool) -> dict[str, Any]:
        """`writers` threads, each with its own client (as concurrent Lambdas have), record
        `requests` single-event requests each, on one (customer, meter) or one customer each.

        DynamoDB Local runs transactions one at a time and never answers TransactionConflict.
        With `emulate`, the client does what DynamoDB does instead: a transaction that touches
        an item another transaction holds is cancelled with TransactionConflict. A transaction
        holds its items from its start until it returns, or HOLD_SECONDS at most (DynamoDB's own
        time to commit one): the time a request waits in DynamoDB Local's single queue is not a
        hold on DynamoDB."""
        table = self.table()
        counts = {"conflicts": 0, "cancelled": 0, "throttled": 0}
        lock = threading.Lock()
        held: dict[tuple[str, str], float] = {}  # item → when its holder commits

        def conflict(busy: list[bool]) -> ClientError:
            response: Any = {
                "Error": {
                    "Code": "TransactionCanceledException",
                    "Message": "Transaction cancelled (emulated TransactionConflict)",
                },
                "CancellationReasons": [
                    {"Code": "TransactionConflict" if b else "None"} for b in busy
                ],
            }
            return ClientError(response, "TransactWriteItems")

        def counting(client: Any) -> Any:
            call = client._make_api_call

            def send(operation: str, params: dict[str, Any]) -> Any:
                if not (emulate and operation == "TransactWriteItems"):
                    return call(operation, params)
                entries = [next(iter(e.values())) for e in params["TransactItems"]]
                keys = [_item_key(e) for e in entries]
                with lock:
                    now = time.monotonic()
                    busy = [held.get(k, 0.0) > now for k in keys]
                    if any(busy):
                        raise conflict(busy)
                    until = now + HOLD_SECONDS
                    held.update((k, until) for k in keys)
                try:
                    return call(operation, params)
                finally:
                    with lock:  # committed (or failed): its items are free from now on
                        done = time.monotonic()
                        for k in keys:
                            if held.get(k) == until:
                                held[k] = min(until, done)

            def wrapped(operation: str, params: dict[str, Any]) -> Any:
                try:
                    return send(operation, params)
                except ClientError as error:
                    reasons = [r.get("Code") for r in error.response.get("CancellationReasons", [])]
                    with lock:
                        if error.response["Error"]["Code"] == "TransactionCanceledException":
                            counts["cancelled"] += 1
                        counts["conflicts"] += "TransactionConflict" in reasons
                        counts["throttled"] += "ThrottlingError" in reasons
                    raise

            client._make_api_call = wrapped
            return client

        stores = [DynamoStore(table, client=counting(self.client())) for _ in range(writers)]
        # Keyed events made up front, so the timed loop only records.
        work = [
            [self.event("cus_HOT" if hot else f"cus_W{w:02d}") for _ in range(requests)]
            for w in range(writers)
        ]
        latencies: list[float] = []
        failures: list[str] = []
        gate = threading.Barrier(writers)

        def writer(w: int) -> None:
            mine: list[float] = []
            gate.wait()
            for event in work[w]:
                started = time.perf_counter()
                try:
                    self.record(stores[w], [event], batch=False)
                except StoreUnavailable as error:  # the API answers 503
                    with lock:
                        failures.append(f"StoreUnavailable: {error}")
                except Exception as error:  # the API answers 500
                    with lock:
                        failures.append(f"{type(error).__name__}: {error}")
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        latencies.sort()
        result: dict[str, Any] = {
            "writers": writers,
            "requests": writers * requests,
            "errors_5xx": len(failures),
            "first_error": failures[0] if failures else None,
            **counts,
            "p50_ms": 1000 * _percentile(latencies, 0.50),
            "p99_ms": 1000 * _percentile(latencies, 0.99),
            "max_ms": 1000 * latencies[-1],
            "requests_per_second": writers * requests / wall,
        }
        if hot:
            # What the flush then makes of one hot pair.
            store = DynamoStore(table, client=self.client())
            self.fake.reset()
            self.flusher(store).run()
            result["flush_stripe_calls"] = self.fake.calls
            result["stored_units"] = _counter_quantity(self.admin, table, "cus_HOT")
            result["billed_units"] = sum(e.value for e in self.fake.accepted())
            result["counter_items"] = _counter_items(self.admin, table, "cus_HOT")
        return result

    def hot_customer(self) -> dict[str, Any]:
        requests = 10 if self.quick else 30
        return {
            f"{where}_{how}": self.writers(how == "hot", 16, requests, emulate)
            for where, emulate in (("local", False), ("emulated", True))
            for how in ("hot", "spread")
        }


def issue_backlog(bench: Bench, now: datetime) -> tuple[list[EventIn], int, int]:
    """The issue's backlog: 10,010 events of 20 customers in 22 (customer, meter, hour) groups,
    all in one billing period; two groups hold more than 1,000 events."""
    this_hour = int(now.timestamp()) // HOUR * HOUR
    first = this_hour - 3 * HOUR
    month_start = int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp())
    if first < month_start:  # keep both hours inside one (the previous) calendar month
        first = month_start - 3 * HOUR
    sizes = {0: 4000, 1: 1500, **{c: 250 for c in range(2, 20)}}
    events: list[EventIn] = []
    groups: set[tuple[str, int]] = set()
    for customer, count in sizes.items():
        name = f"cus_D{customer:02d}"
        for i in range(count):
            events.append(bench.event(name, 1 + i % 5, first + (i * 7) % HOUR))
            groups.add((name, first))
    for customer in (2, 3):  # a second hour for two customers
        name = f"cus_D{customer:02d}"
        for i in range(5):
            events.append(bench.event(name, 2, first + HOUR + 60 * i))
            groups.add((name, first + HOUR))
    return events, len(groups), len(sizes)


def _item_key(entry: dict[str, Any]) -> tuple[str, str]:
    key = entry.get("Key") or entry["Item"]
    return key["pk"]["S"], key["sk"]["S"]


def _counter_rows(client: Any, table: str, customer: str) -> list[dict[str, Any]]:
    response = client.query(
        TableName=table,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": f"USAGE#{customer}"}},
        ConsistentRead=True,
    )
    return list(response["Items"])


def _counter_items(client: Any, table: str, customer: str) -> int:
    return len(_counter_rows(client, table, customer))


def _counter_quantity(client: Any, table: str, customer: str) -> int:
    rows = _counter_rows(client, table, customer)
    return sum(int(i.get("quantity", {"N": "0"})["N"]) for i in rows)


def _chunks(items: Sequence[EventIn], size: int) -> Iterator[Sequence[EventIn]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _percentile(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def _add(a: Bill, b: Bill) -> Bill:
    return Bill(
        a.table_writes + b.table_writes,
        a.index_writes + b.index_writes,
        a.reads + b.reads,
        a.failed_writes + b.failed_writes,
        a.calls + b.calls,
    )


def _bill(bill: Bill) -> dict[str, Any]:
    return {
        "table_writes": bill.table_writes,
        "index_writes": bill.index_writes,
        "reads": bill.reads,
        "failed_writes": bill.failed_writes,
        "calls": dict(bill.calls),
    }


STEPS: dict[str, Callable[[Bench], Any]] = {
    "write_units": Bench.write_units,
    "latency": Bench.latency,
    "drain": Bench.drain,
    "hot_customer": Bench.hot_customer,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=sorted(STEPS), action="append")
    args = parser.parse_args(argv)
    bench = Bench(args.endpoint, args.template, args.quick)
    out: dict[str, Any] = {}
    try:
        for name, step in STEPS.items():
            if args.only and name not in args.only:
                continue
            started = time.perf_counter()
            out[name] = step(bench)
            print(f"  {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    finally:
        bench.fake.stop()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
