"""Operators' command line, run from a checkout with AWS credentials for the stack's account.

    python -m usage_meter.admin --table TABLE status
    python -m usage_meter.admin --table TABLE quarantine list
    python -m usage_meter.admin --table TABLE quarantine replay COUNTER_ID [--restamp] [--fresh]
    python -m usage_meter.admin --table TABLE quarantine replay --all [--restamp]
    python -m usage_meter.admin --table TABLE keys create --name NAME --scopes record,read
    python -m usage_meter.admin --table TABLE keys list
    python -m usage_meter.admin --table TABLE keys revoke KEY_ID
    STRIPE_API_KEY=sk_... python -m usage_meter.admin --table TABLE stripe sync

`make admin ARGS="..."` runs it with the project's virtualenv. Output is one JSON object per line.
"""

import argparse
import json
import os
import sys
import time

from usage_meter.errors import UsageMeterError
from usage_meter.logic import quarantine, subscriptions
from usage_meter.logic.auth import create_api_key
from usage_meter.models.auth import ApiKey, Scope
from usage_meter.models.domain import Counter
from usage_meter.store.dynamodb import DynamoStore


def _show(counter: Counter) -> str:
    shown = {"id": counter.id, **counter.model_dump(mode="json", exclude={"sending"})}
    if counter.held is not None:
        shown["held_identifier"] = counter.identifier(counter.held)
    return json.dumps(shown)


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
    commands.add_parser("status", help="counters waiting to be reported, in flight, quarantined")
    held = commands.add_parser("quarantine", help="units Stripe refused for good")
    actions = held.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every counter with quarantined units, and the reason")
    replay = actions.add_parser("replay", help="send quarantined units again on the next flush")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("counter_id", nargs="?")
    which.add_argument("--all", action="store_true")
    replay.add_argument(
        "--restamp",
        action="store_true",
        help="bill units whose period is too old for Stripe in the current period instead",
    )
    replay.add_argument(
        "--fresh",
        action="store_true",
        help="send a held decision's units under a new identifier: only after checking in Stripe "
        "that its identifier is not there",
    )
    keys = commands.add_parser("keys", help="server keys for your apps")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="a new key; it is shown once, never stored")
    create.add_argument("--name", required=True, help="who uses it, e.g. 'web app'")
    create.add_argument("--scopes", required=True, help="comma-separated: record, read, admin")
    key_actions.add_parser("list", help="every key: id, name, scopes, created, revoked")
    revoke = key_actions.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("key_id")
    stripe_command = commands.add_parser("stripe", help="the Stripe account's side")
    stripe_actions = stripe_command.add_subparsers(dest="action", required=True)
    stripe_actions.add_parser(
        "sync",
        help="read every subscription from Stripe and store its billing periods (the backfill "
        "for customers who subscribed before the webhook was set up); safe to run again",
    )
    args = parser.parse_args(argv)
    if not args.table:
        parser.error("--table (or TABLE_NAME) is required")
    store = DynamoStore(args.table)

    if args.command == "status":
        status = {"counters_in_backlog": 0, "units_unsent": 0, "decisions_in_flight": 0}
        for page in store.backlog():  # page by page: a large backlog is never held at once
            status["counters_in_backlog"] += len(page)
            status["units_unsent"] += sum(max(c.unsent, 0) for c in page)
            status["decisions_in_flight"] += sum(c.sending is not None for c in page)
        print(json.dumps({**status, "quarantined_counters": len(store.quarantined())}))
        return 0
    if args.command == "keys":
        return _keys(args, store, parser)
    if args.command == "stripe":
        return _stripe_sync(store)
    if args.action == "list":
        for counter in store.quarantined():
            print(_show(counter))
        return 0
    ids = [c.id for c in store.quarantined()] if args.all else [args.counter_id]
    failed = 0
    now = int(time.time())
    for counter_id in ids:
        try:
            replayed = quarantine.replay(
                store,
                counter_id,
                now=now,
                restamp=args.restamp,
                fresh=args.fresh,
                invoice_grace_seconds=int(float(os.environ.get("INVOICE_GRACE_HOURS", "1")) * 3600),
            )
            print(_show(replayed))
        except UsageMeterError as error:
            failed += 1
            print(json.dumps({"id": counter_id, "error": error.code, "message": error.message}))
    return 1 if failed else 0


def _keys(args: argparse.Namespace, store: DynamoStore, parser: argparse.ArgumentParser) -> int:
    now = int(time.time())
    if args.action == "create":
        try:
            scopes = {Scope(s.strip()) for s in args.scopes.split(",") if s.strip()}
        except ValueError:
            parser.error(f"--scopes takes {', '.join(Scope)}")
        full, key = create_api_key(args.name, scopes, keys=store, now=now)
        print(json.dumps({"key": full, **_public(key)}))
        print("Store the key now: it is not shown again.", file=sys.stderr)
        return 0
    if args.action == "list":
        for key in store.list_api_keys():
            print(json.dumps(_public(key)))
        return 0
    if store.revoke_api_key(args.key_id, now):
        print(json.dumps({"key_id": args.key_id, "revoked_at": now}))
        return 0
    print(json.dumps({"key_id": args.key_id, "error": "not_found_or_already_revoked"}))
    return 1


def _stripe_sync(store: DynamoStore) -> int:
    from usage_meter.billing.stripe_subscriptions import StripeSubscriptions  # imports stripe

    api_key = os.environ.get("STRIPE_API_KEY")
    if not api_key:
        print("set STRIPE_API_KEY to a key that may read subscriptions", file=sys.stderr)
        return 2
    reader = StripeSubscriptions(api_key, api_base=os.environ.get("STRIPE_API_BASE") or None)
    synced = changed = cut = 0
    for subscription in reader.all():
        result = subscriptions.sync(subscription, store, int(time.time()))
        synced += 1
        changed += not result.stale
        cut += result.counters_cut
        print(json.dumps(result.__dict__))
    print(json.dumps({"subscriptions": synced, "updated": changed, "counters_cut": cut}))
    return 0


def _public(key: ApiKey) -> dict[str, object]:
    return key.model_dump(mode="json", exclude={"secret_hash"}) | {"scopes": sorted(key.scopes)}


if __name__ == "__main__":
    sys.exit(main())
