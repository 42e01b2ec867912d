"""Operators' command line, run from a checkout with AWS credentials for the stack's account.

    python -m usage_meter.admin --table TABLE status
    python -m usage_meter.admin --table TABLE quarantine list
    python -m usage_meter.admin --table TABLE quarantine replay BATCH_ID [--restamp]
    python -m usage_meter.admin --table TABLE quarantine replay --all [--restamp]

`make admin ARGS="..."` runs it with the project's virtualenv. Output is one JSON object per line.
"""

import argparse
import json
import os
import sys
import time

from usage_meter.errors import UsageMeterError
from usage_meter.logic import quarantine
from usage_meter.models.domain import Batch
from usage_meter.store.dynamodb import DynamoStore


def _show(batch: Batch) -> str:
    return json.dumps(
        batch.model_dump(mode="json", exclude={"event_ids"}) | {"events": len(batch.event_ids)}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m usage_meter.admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--table",
        default=os.environ.get("TABLE_NAME"),
        help="the stack's UsageTableName output (default: $TABLE_NAME)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="backlog, open and quarantined batches")
    batches = commands.add_parser("quarantine", help="batches Stripe refused for good")
    actions = batches.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every quarantined batch with its reason")
    replay = actions.add_parser("replay", help="send quarantined batches again on the next flush")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("batch_id", nargs="?")
    which.add_argument("--all", action="store_true")
    replay.add_argument(
        "--restamp",
        action="store_true",
        help="send batches too old for Stripe with the current time",
    )
    args = parser.parse_args(argv)
    if not args.table:
        parser.error("--table (or TABLE_NAME) is required")
    store = DynamoStore(args.table)

    if args.command == "status":
        print(
            json.dumps(
                {
                    "unreported_events": sum(1 for _ in store.backlog()),
                    "open_batches": len(store.open_batches()),
                    "quarantined_batches": len(store.quarantined_batches()),
                }
            )
        )
        return 0
    if args.action == "list":
        for batch in store.quarantined_batches():
            print(_show(batch))
        return 0
    ids = [b.id for b in store.quarantined_batches()] if args.all else [args.batch_id]
    failed = 0
    for batch_id in ids:
        try:
            print(
                _show(
                    quarantine.replay(store, batch_id, now=int(time.time()), restamp=args.restamp)
                )
            )
        except UsageMeterError as error:
            failed += 1
            print(json.dumps({"id": batch_id, "error": error.code, "message": error.message}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
