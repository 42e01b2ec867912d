"""A randomized fault campaign: seeded schedules of Stripe faults, DynamoDB faults, kills,
concurrent runs and concurrent recording; after each, the invariant must hold exactly.

    make campaign                 # 200 seeds (SEEDS=1000 for more), DynamoDB Local + fake Stripe
    python -m tests.faults.campaign --seeds 200 --first 0

Exits 1 if any schedule lost or doubled a unit, or left anything unreported.
"""

import argparse
import json
import random
import sys
import threading
import time
import uuid
from typing import Any

from devtools.dynamodb_local import DynamoDBLocal
from devtools.fake_stripe import FakeStripe
from devtools.template import create_usage_table
from tests.faults.harness import Fault
from tests.faults.world import World
from usage_meter.logic.quarantine import replay

_ALL = ["put_item", "update_item", "transact_write_items", "batch_get_item", "query"]
_OPERATIONS_FOR = {
    "crash": _ALL,
    "throttle": _ALL,
    "conflict": ["transact_write_items"],
    "condition": ["put_item", "update_item", "transact_write_items"],  # conditional writes only
}


def _stripe_faults(world: World, rng: random.Random) -> list[str]:
    injected = []
    for _ in range(rng.randint(0, 4)):
        kind = rng.choice(
            ["server_error", "rate_limit", "rate_limit", "delay", "lost_response", "reject"]
        )
        options: dict[str, Any] = {}
        if kind == "rate_limit" and rng.random() < 0.5:
            options["retry_after"] = 0.05
        if kind == "delay":
            options["seconds"] = 0.4  # over the 0.25 s client timeout below
        if kind == "reject":
            options.update(code="resource_missing", message="No such customer")
        world.stripe.inject(kind, count=rng.randint(1, 3), **options)
        injected.append(kind)
    return injected


def _db_faults(rng: random.Random) -> list[Fault]:
    faults = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.choice(["crash", "throttle", "throttle", "conflict", "condition"])
        operation = rng.choice(_OPERATIONS_FOR[kind])
        faults.append(Fault(operation, rng.randint(1, 12), kind))
    return faults


def run_schedule(world: World, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    customers = rng.randint(1, 5)
    world.record_random(rng, rng.randint(10, 80), customers=customers)
    stripe_faults = _stripe_faults(world, rng)
    kills = 0
    for _ in range(rng.randint(1, 3)):
        flushes = [_db_faults(rng) for _ in range(2 if rng.random() < 0.3 else 1)]
        outcomes: list[Any] = []
        # A second flush: EventBridge delivered twice, or an operator invoked one by hand.
        threads = [
            threading.Thread(
                target=lambda faults, out: out.append(world.flush(faults, stripe_timeout=0.25)),
                args=(faults, outcomes),
            )
            for faults in flushes
        ]
        if rng.random() < 0.3:  # the app keeps recording while the flush runs
            threads.append(
                threading.Thread(
                    target=world.record_random, args=(random.Random(rng.random()), 15, customers)
                )
            )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        kills += sum(1 for outcome in outcomes if outcome is None)
    # The faults pass; the schedule keeps running; the operator replays what Stripe refused.
    world.stripe.clear_faults()
    world.settle(runs=10)
    quarantined = world.store.quarantined_batches()
    for batch in quarantined:
        replay(world.store, batch.id, now=int(time.time()))
    world.settle(runs=10)
    return {
        "seed": seed,
        "stripe_faults": stripe_faults,
        "kills": kills,
        "quarantined_then_replayed": len(quarantined),
        "stripe_events": len(world.stripe.accepted()),
        **world.invariant(),
    }


def holds(result: dict[str, Any]) -> bool:
    return result["lost"] == 0 and result["doubled"] == 0 and result["left_unreported"] == 0


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
    failures = 0
    totals = {"lost": 0, "doubled": 0, "kills": 0, "quarantined_then_replayed": 0}
    started = time.monotonic()
    with DynamoDBLocal() as engine, FakeStripe() as fake:
        client = engine.client()
        for seed in range(args.first, args.first + args.seeds):
            table = f"campaign-{uuid.uuid4().hex[:8]}"
            create_usage_table(client, table)
            fake.reset()
            result = run_schedule(World(table, engine.endpoint_url, fake), seed)
            client.delete_table(TableName=table)
            for key in totals:
                totals[key] += result[key]
            failures += not holds(result)
            print(json.dumps(result), flush=True)
    print(
        json.dumps(
            {
                "schedules": args.seeds,
                "failed": failures,
                **totals,
                "seconds": round(time.monotonic() - started, 1),
            }
        ),
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
