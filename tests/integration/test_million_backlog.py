"""A backlog of 1,000,000 events over 1,000 pairs, on DynamoDB Local, drains in one flush run.

The flush reads counters, never events: what it does and holds follows the (customer, meter,
period) pairs with new usage. Each test records through the real record path (record_events ->
DynamoStore.put_events, 99 events per transaction at most), then runs one Flusher against the
real Stripe adapter and the loopback fake Stripe, and checks in that one run: one Stripe call per
pair, exact totals, an empty backlog, DynamoDB calls that follow pairs, and flat memory. The fake
Stripe runs in a process of its own, so the memory measured is the flush's alone.

Recording a million events on DynamoDB Local takes 12-16 minutes on a 2-CPU machine (1,100-1,400
events/s; the engine serializes transactions, so more threads do not help). So by default
the million is a million units: each pair gets 10 events of 100 units, which leaves every counter
exactly as a thousand one-unit events would (quantity 1,000, shard 0), and the flush reads only
the counters. USAGE_METER_MILLION_EVENTS=1 records the full 1,000,000 one-unit events instead.
"""

import os
import re
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.clock import real_time
from usage_meter.billing import SendOutcome
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.models.domain import MeterEventRequest
from usage_meter.models.input import EventIn
from usage_meter.models.output import FlushSummary
from usage_meter.store.dynamodb import INDEX, DynamoStore

PAIRS = 1_000
EVENTS = 1_000_000
UNITS_PER_PAIR = EVENTS // PAIRS
CHUNK = 99  # events per record call: with their counter, one full transaction


class FakeStripeProcess:
    """`python -m devtools.fake_stripe` in a child process; what it accepted, over HTTP."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devtools.fake_stripe", "--port", "0"],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"listening on (\S+)", line)
        assert found, line
        self.url = found.group(1)
        # It logs every request: read its output, or a full pipe would stop it.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def totals(self) -> dict[tuple[str, str], int]:
        listing = requests.get(f"{self.url}/_fake/meter_events", timeout=30).json()
        return {(t["customer"], t["event_name"]): t["value"] for t in listing["totals"]}

    def reset(self) -> None:
        requests.post(f"{self.url}/_fake/reset", timeout=30).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class CountingBilling:
    """The Stripe adapter, counting its calls (no SDK retries: one call, one request)."""

    def __init__(self, url: str) -> None:
        self._billing = StripeMeterBilling(
            "sk_test_million",
            api_base=url,
            max_network_retries=0,
            max_requests_per_second=100_000,
        )
        self.calls = 0
        self._lock = threading.Lock()

    def send(self, request: MeterEventRequest) -> SendOutcome:
        with self._lock:
            self.calls += 1
        return self._billing.send(request)


@dataclass
class Drained:
    summary: FlushSummary
    stripe_calls: int
    seconds: float
    peak_bytes: int
    maxrss_delta_kib: int
    dynamodb_calls: Tally[str]


def customers(count: int) -> list[str]:
    return [f"cus_Million{i:04d}" for i in range(count)]


def record_backlog(store: DynamoStore, pairs: int, events_per_pair: int, quantity: int) -> float:
    """Record through the real path; seconds taken."""
    now = datetime.fromtimestamp(real_time(), UTC)
    started = time.monotonic()
    for customer in customers(pairs):
        for start in range(0, events_per_pair, CHUNK):
            size = min(CHUNK, events_per_pair - start)
            batch = [EventIn(stripe_customer_id=customer, meter="m", quantity=quantity)] * size
            record_events(batch, meters={"m"}, store=store, now=now, batch=True)
    return time.monotonic() - started


def drain(store: DynamoStore, client: Any, stripe: FakeStripeProcess) -> Drained:
    """One flush run, its peak Python memory (tracemalloc) and its DynamoDB calls."""
    billing = CountingBilling(stripe.url)
    calls: Tally[str] = Tally()
    client.meta.events.register(
        "after-call.dynamodb", lambda model, **_: calls.update([model.name])
    )
    # The fake Stripe's process keeps the real clock, even when this one's is forced
    # (tests/clock.py): the flush stamps its events with that clock, as usage is recorded.
    flusher = Flusher(store, billing, time_left=lambda: 900, clock=real_time)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        started = time.monotonic()
        summary = flusher.run()
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    return Drained(summary, billing.calls, seconds, peak, rss_delta, calls)


def index_count(local_table) -> int:
    return local_table.client.scan(TableName=local_table.name, IndexName=INDEX, Select="COUNT")[
        "Count"
    ]


@pytest.fixture
def stripe() -> Iterator[FakeStripeProcess]:
    fake = FakeStripeProcess()
    try:
        yield fake
    finally:
        fake.stop()


def one_page_footprint(local_table, stripe: FakeStripeProcess) -> int:
    """Peak memory of a run over a single page of counters: the floor the big run is held to."""
    store = DynamoStore(local_table.name, client=local_table.client)
    record_events(
        [EventIn(stripe_customer_id=f"cus_Page{i:03d}", meter="n", quantity=1) for i in range(100)],
        meters={"n"},
        store=store,
        now=datetime.fromtimestamp(real_time(), UTC),
        batch=True,
    )
    small = drain(store, local_table.client, stripe)
    assert small.summary.sent == 100
    stripe.reset()
    return small.peak_bytes


def check_one_run_drains_everything(
    local_table, stripe: FakeStripeProcess, events_per_pair: int, quantity: int
) -> None:
    # Given the footprint of a run over one page (100 counters)
    page_peak = one_page_footprint(local_table, stripe)
    # and a backlog of 1,000,000 units over 1,000 pairs
    store = DynamoStore(local_table.name, client=local_table.client)
    recording = record_backlog(store, PAIRS, events_per_pair, quantity)
    assert index_count(local_table) == PAIRS

    # When one flush run drains it
    run = drain(store, local_table.client, stripe)

    summary = run.summary
    events = PAIRS * events_per_pair
    print(
        f"\n{events:,} events ({PAIRS * events_per_pair * quantity:,} units) over {PAIRS:,} pairs:"
        f" recorded in {recording:.1f}s ({events / recording:,.0f} events/s);"
        f" one flush run in {run.seconds:.1f}s, {run.stripe_calls:,} Stripe calls,"
        f" DynamoDB calls {dict(run.dynamodb_calls)};"
        f" peak traced memory {run.peak_bytes / 2**20:.2f} MiB"
        f" (one page of 100 counters: {page_peak / 2**20:.2f} MiB),"
        f" maxrss +{run.maxrss_delta_kib / 1024:.1f} MiB"
    )
    # Then one run sent each pair once, the exact totals, and left nothing behind
    assert not summary.stopped_early and summary.errors == []
    assert (summary.counters_read, summary.sent, summary.released) == (PAIRS, PAIRS, PAIRS)
    assert summary.units_reported == EVENTS
    assert run.stripe_calls == PAIRS
    assert stripe.totals() == {(c, "m"): UNITS_PER_PAIR for c in customers(PAIRS)}
    assert index_count(local_table) == 0 and list(store.backlog()) == []
    # and its DynamoDB calls follow the pairs: decide, confirm and release per counter, the
    # decision's log entry before its Stripe call, plus a query per index shard page and a
    # batch read per 100 counters
    assert run.dynamodb_calls["UpdateItem"] == 3 * PAIRS
    assert run.dynamodb_calls["PutItem"] == PAIRS
    assert run.dynamodb_calls["BatchGetItem"] <= PAIRS // 100 + 16
    assert sum(run.dynamodb_calls.values()) <= 4 * PAIRS + 2 * (PAIRS // 100 + 16)
    # and its memory stays flat: ten pages cost about what one does, whatever the event count
    assert run.peak_bytes < 2 * page_peak, (run.peak_bytes, page_peak)


@pytest.mark.timeout(600)  # about a minute alone; far more on a loaded machine
def test_a_million_unit_backlog_over_1000_pairs_drains_in_one_flush_run(local_table, stripe):
    check_one_run_drains_everything(local_table, stripe, events_per_pair=10, quantity=100)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 12-16 minutes of recording
@pytest.mark.skipif(
    os.environ.get("USAGE_METER_MILLION_EVENTS") != "1",
    reason="records 1,000,000 events (12-16 minutes); set USAGE_METER_MILLION_EVENTS=1",
)
def test_a_million_recorded_events_over_1000_pairs_drain_in_one_flush_run(local_table, stripe):
    check_one_run_drains_everything(local_table, stripe, events_per_pair=1_000, quantity=1)
