"""Speed, measured: `make bench`. Not part of `make test`. Times are never asserted; a ratio of
two measured side by side in one run may be."""

import subprocess
import sys
import timeit
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeBilling, InMemoryStore
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.logic.usage import current_usage
from usage_meter.models.domain import Counter
from usage_meter.models.input import BatchIn

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
BATCH = {
    "events": [
        {
            "stripe_customer_id": f"cus_B{i % 10}",
            "meter": "m",
            "quantity": i + 1,
            "idempotency_key": f"k{i}",
        }
        for i in range(100)
    ]
}


@pytest.mark.parametrize("function", ["record", "read", "flush"])
def test_cold_import(benchmark, function):
    """Module import of a handler in a fresh interpreter, as at a Lambda cold start."""
    code = "import runpy, sys; runpy.run_path(sys.argv[1])"
    app = str(ROOT / "functions" / function / "app.py")
    env = {
        "PYTHONPATH": str(ROOT / "layers" / "shared"),
        "TABLE_NAME": "usage",
        "METERS": '{"m": {}}',
        "AWS_DEFAULT_REGION": "us-east-1",
        "STRIPE_API_KEY": "sk_test_x",
    }
    benchmark.pedantic(
        subprocess.run,
        args=([sys.executable, "-c", code, app],),
        kwargs={"env": env, "check": True},
        rounds=5,
        iterations=1,
    )


def test_validate_and_record_a_batch_of_100(benchmark):
    def run():
        batch = BatchIn.model_validate(BATCH)
        record_events(batch.events, meters={"m"}, store=InMemoryStore(), now=NOW, batch=True)

    benchmark(run)


def test_read_usage_of_20_meters(benchmark):
    store = InMemoryStore()
    included = {f"meter_{i}": 100 for i in range(20)}
    benchmark(current_usage, "cus_B1", included=included, store=store, now=NOW)


def test_flush_logic_10k_events(benchmark):
    batch = BatchIn.model_validate(BATCH)

    def setup():
        store = InMemoryStore()
        for round_ in range(100):
            events = [
                e.model_copy(update={"idempotency_key": f"{round_}-{e.idempotency_key}"})
                for e in batch.events
            ]
            record_events(events, meters={"m"}, store=store, now=NOW, batch=True)
        pages = _ReadAhead(store)
        return (
            Flusher(pages, FakeBilling(), time_left=lambda: 300, clock=lambda: NOW.timestamp()),
        ), {}

    benchmark.pedantic(lambda flusher: flusher.run(), setup=setup, rounds=3)


class _ReadAhead:
    """The in-memory store with its backlog read before the flush works on it.

    tests.fakes.InMemoryStore.backlog() yields each page while holding its lock, so the flush's
    worker threads wait forever for it; reading the pages first keeps this benchmark running."""

    def __init__(self, store: InMemoryStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def backlog(self) -> Iterator[Sequence[Counter]]:
        yield from list(self._store.backlog())


def object_of(keys: int) -> str:
    return "{" + ",".join(f'"{i}":1' for i in range(keys)) + "}"


def best_seconds(function: Any, argument: Any) -> float:
    """The fastest of several timings: the one least disturbed by other work on the machine."""
    return min(timeit.repeat(lambda: function(argument), number=10, repeat=7))


def test_parse_a_hostile_body_of_7000_keys(benchmark):
    """Checking for repeated keys stays linear: a 60 KB object of 7,000 keys."""
    from usage_meter.api import parse_json_body

    benchmark(parse_json_body, object_of(7000))
    # Ten times the keys takes about ten times as long, side by side in this run; a check that
    # compared each key with the others (quadratic) would take a hundred times as long.
    small, large = (best_seconds(parse_json_body, object_of(n)) for n in (700, 7000))
    assert large / small < 30, (small, large)
