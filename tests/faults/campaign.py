"""A randomized fault campaign: seeded schedules of recording, flush runs killed or faulted at any
step, Stripe faults (500s, stored 500s, 429s, timeouts, lost responses), a customer Stripe
refuses, stale runs paused while an operator replays its quarantine, concurrent flushes and
recording during flushes. After each schedule the invariant (tests/faults/harness.py) must hold
exactly: nothing lost, doubled or left unreported, and the counters customers read agree.

    make campaign                 # 200 seeds (SEEDS=1000 for more), DynamoDB Local + fake Stripe
    python -m tests.faults.campaign --seeds 200 --first 0

Exits 1 if any schedule broke the invariant.
"""

import argparse
import json
import random
import sys
import threading
import time
import uuid
from collections import Counter as Tally
from typing import Any

from devtools.dynamodb_local import DynamoDBLocal
from devtools.fake_stripe import FakeStripe
from devtools.template import create_usage_table
from tests.faults.harness import CLEAN, WRITE_KINDS, Fault, Pause
from tests.faults.world import StripeClock, World, in_thread, run
from usage_meter.logic.quarantine import REPLAY_GUARD

STRIPE_FAULTS = ["server_error", "saved_server_error", "rate_limit", "delay", "lost_response"]
_FLUSH_STEPS = ["read_backlog", "read_counters", "decide", "confirm", "quarantine", "release"]
_STALE_POINTS = ["decided", "answered", "backoff"]


def _pending(stripe: FakeStripe) -> Tally[str]:
    """Faults queued and not yet met (the fake keeps them private; this is its test harness)."""
    with stripe._lock:
        return Tally(fault.kind for fault in stripe._faults)


def _stripe_faults(world: World, rng: random.Random, figures: Tally[str]) -> None:
    for _ in range(rng.randint(0, 3)):
        kind = rng.choice(STRIPE_FAULTS)
        options: dict[str, Any] = {}
        if kind == "rate_limit" and rng.random() < 0.5:
            options["retry_after"] = 0.05
        if kind == "delay":
            options["seconds"] = 0.4  # over the 0.25 s client timeout below
        count = rng.randint(1, 3)
        world.stripe.inject(kind, count=count, **options)
        figures[f"stripe_{kind}"] += count


def _db_faults(rng: random.Random) -> list[Fault]:
    faults = []
    for _ in range(rng.randint(0, 3)):
        step = rng.choice(_FLUSH_STEPS)
        kinds = ["crash", "throttle"] if step.startswith("read") else [*WRITE_KINDS, "conflict"]
        faults.append(Fault(step, rng.randint(1, 6), rng.choice(kinds)))
    return faults


def _recording_tap(world: World, rng: random.Random, customers: int) -> Any:
    """Records an event between two steps of a run now and then."""
    lock = threading.Lock()

    def tap(point: str, subject: object) -> None:
        with lock:
            go, seed = rng.random() < 0.15, rng.random()
        if go:
            world.record_random(random.Random(seed), 1, customers)

    return tap


def _sleeper(pause: Pause) -> Any:
    def sleep(seconds: float) -> None:
        pause("backoff")

    return sleep


def run_schedule(world: World, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    figures: Tally[str] = Tally()
    customers = rng.randint(1, 5)
    for customer in range(customers):  # most on Stripe periods renewed inside the usage's hours
        if rng.random() < 0.7:
            world.subscribe(f"cus_F{customer}", world.now() - rng.randrange(6 * 3600))
            figures["anchored_customers"] += 1
    world.record_random(rng, rng.randint(10, 80), customers=customers)
    rejected = None
    if rng.random() < 0.5:  # Stripe refuses one customer until the operator fixes it
        rejected = f"cus_F{rng.randrange(customers)}"
        world.stripe.reject_customer(rejected)
    stale: list[tuple[threading.Thread, Pause]] = []
    lock = threading.Lock()

    def flush(faults: list[Fault], tap: Any = None) -> None:
        flusher, db = world.flusher(faults, tap=tap, stripe_timeout=0.25)
        summary = run(flusher)
        with lock:
            figures["runs"] += 1
            figures["kills"] += db.dead
            for fault in db.fired:
                figures[f"db_{fault.kind}"] += 1
            if summary is not None:
                figures["quarantines"] += summary.quarantined

    for _ in range(rng.randint(1, 4)):
        _stripe_faults(world, rng, figures)
        if rng.random() < 0.5:  # usage between runs
            world.record_random(rng, rng.randint(1, 40), customers=customers)
        if not stale and rng.random() < 0.5:
            # A run that stalls holding what it read: by the time it resumes, an operator may
            # have replayed its decision's quarantine.
            point = rng.choice(_STALE_POINTS)
            # Mostly one that holds a decision of the customer Stripe refuses: the operator
            # replays that one
            target = rejected if point != "backoff" and rng.random() < 0.7 else None
            pause = Pause(point, customer=target)
            if point == "backoff":
                world.stripe.inject("rate_limit")
                flusher, _ = world.flusher(sleep=_sleeper(pause))
            else:
                flusher, _ = world.flusher(tap=pause)
            thread, _out = in_thread(run, flusher)
            if pause.reached.wait(10):
                stale.append((thread, pause))
                figures["stale_runs"] += 1
            else:
                thread.join()
        flushes = 2 if rng.random() < 0.3 else 1
        figures["concurrent_flushes"] += flushes == 2
        threads = []
        for _ in range(flushes):
            faults = _db_faults(rng)
            tap = None
            if rng.random() < 0.3:  # usage recorded between two steps of this run
                tap = _recording_tap(world, random.Random(rng.random()), customers)
            threads.append(in_thread(flush, faults, tap)[0])
        if rng.random() < 0.3:  # the app keeps recording while the flush runs
            figures["recording_during_flush"] += 1
            recorder = random.Random(rng.random())
            threads.append(in_thread(world.record_random, recorder, 15, customers)[0])
        for thread in threads:
            thread.join()
    # The faults pass; the schedule keeps running
    pending = _pending(world.stripe)
    for kind, left in pending.items():
        figures[f"stripe_{kind}"] -= left
    world.stripe.clear_faults()
    world.settle(runs=10)
    # After the replay guard the operator fixes the customer and replays what Stripe refused,
    # while stale runs resume before or after the replayed units are sent
    world.clock.advance(REPLAY_GUARD + 1)
    if rejected is not None:
        world.stripe.accept_customer(rejected)
    figures["replays"] += world.replay_all()
    early = rng.random() < 0.3
    for thread, pause in stale if early else []:
        pause.resume()
        thread.join()
    world.settle(runs=10)
    for thread, pause in [] if early else stale:
        pause.resume()
        thread.join()
    world.settle(runs=10)
    return {
        "seed": seed,
        **world.invariant(),
        "stripe_events": len(world.stripe.accepted()),
        **dict(sorted(figures.items())),
    }


def holds(result: dict[str, Any]) -> bool:
    return all(result[key] == 0 for key in CLEAN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args(argv)
    import stripe

    stripe._http_client.HTTPClient.INITIAL_DELAY = 0.01
    stripe._http_client.HTTPClient.MAX_DELAY = 0.02
    failures: list[int] = []
    totals: Tally[str] = Tally()
    started = time.monotonic()
    stripe_clock = StripeClock()
    with DynamoDBLocal() as engine, FakeStripe(now=stripe_clock) as fake:
        client = engine.client()
        for seed in range(args.first, args.first + args.seeds):
            table = f"campaign-{uuid.uuid4().hex[:8]}"
            create_usage_table(client, table)
            fake.reset()
            result = run_schedule(World(table, engine.endpoint_url, fake, stripe_clock), seed)
            client.delete_table(TableName=table)
            totals.update({k: v for k, v in result.items() if k != "seed"})
            if not holds(result):
                failures.append(seed)
            print(json.dumps(result), flush=True)
    summary = {
        "schedules": args.seeds,
        "failed": len(failures),
        "failed_seeds": failures,
        **dict(sorted(totals.items())),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary), flush=True)
    print(
        f"{args.seeds} schedules: {totals['lost']} lost / {totals['doubled']} doubled / "
        f"{totals['left_unreported']} left unreported / {totals['misreported']} misreported / "
        f"{totals['miscounted']} miscounted / {totals['off_period']} off period; "
        f"{totals['kills']} kills, {totals['quarantines']} quarantines, "
        f"{totals['replays']} replays, {totals['stripe_saved_server_error']} stored 500s, "
        f"{totals['stripe_lost_response']} lost responses, {totals['stale_runs']} stale runs, "
        f"{totals['concurrent_flushes']} concurrent flushes; {summary['seconds']} s",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
