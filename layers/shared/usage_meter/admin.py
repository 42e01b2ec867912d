"""Operators' command line, run from a checkout with AWS credentials for the stack's account.

    python -m usage_meter.admin --table TABLE status [--json] [--no-cloudwatch]
    python -m usage_meter.admin --table TABLE quarantine list
    python -m usage_meter.admin --table TABLE quarantine replay COUNTER_ID [--restamp] [--fresh]
    python -m usage_meter.admin --table TABLE quarantine replay --all [--restamp]
    python -m usage_meter.admin --table TABLE keys create --name NAME --scopes record,read
    python -m usage_meter.admin --table TABLE keys list
    python -m usage_meter.admin --table TABLE keys revoke KEY_ID
    STRIPE_API_KEY=sk_... python -m usage_meter.admin --table TABLE stripe sync
    STRIPE_API_KEY=sk_... python -m usage_meter.admin stripe setup [--price-amount CENTS
        --currency usd] [--webhook-url URL] [--event-destination-url URL] [--meters JSON]
    STRIPE_API_KEY=sk_... python -m usage_meter.admin stripe check [--webhook-url URL]

`make admin ARGS="..."` runs it with the project's virtualenv. Output is one JSON object per line
(`status`: a readable summary; `--json`: one object). `--local` instead of `--table` works on the
stack `make dev` runs, with no AWS credentials or region: `make admin ARGS="--local keys list"`.
"""

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from usage_meter.errors import UsageMeterError
from usage_meter.logic import quarantine, subscriptions
from usage_meter.logic.auth import create_api_key
from usage_meter.models.auth import ApiKey, Scope
from usage_meter.models.domain import Counter
from usage_meter.store.dynamodb import DynamoStore

# `make dev` records its endpoints here (devtools/local_stack.py); --local reads them.
LOCAL_STACK_FILE = ".local/stack.json"
# The local IAM gate enforces the role named by the caller's access key: --local signs as the
# holder of OperatorPolicy, so a call the deployed policy refuses is refused locally too.
LOCAL_OPERATOR = "OperatorPolicy"
LOCAL_REGION = "us-east-1"
NO_REGION = (
    "no AWS region: set AWS_DEFAULT_REGION (AWS_REGION also works here), or AWS_PROFILE to a "
    "profile with a region; for the stack `make dev` runs, use --local"
)
NO_CREDENTIALS = (
    "no AWS credentials: set AWS_PROFILE (after `aws configure` or `aws sso login`), or "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; for the stack `make dev` runs, use --local"
)


class SetupError(Exception):
    """The command cannot reach the stack; the message is the one line the operator sees."""


def aws_session() -> tuple[botocore.session.Session, str]:
    """The operator's AWS session and region; SetupError, with what to set, when either is
    missing. botocore itself reads AWS_DEFAULT_REGION only: AWS_REGION is honoured here too."""
    session = botocore.session.get_session()
    region = session.get_config_variable("region") or os.environ.get("AWS_REGION")
    if not region:
        raise SetupError(NO_REGION)
    if session.get_credentials() is None:
        raise SetupError(NO_CREDENTIALS)
    return session, region


def local_backends(stack_file: str = LOCAL_STACK_FILE) -> dict[str, Any]:
    """The endpoints and table of the running `make dev`, from the file it writes."""
    path = Path(stack_file)
    try:
        state = json.loads(path.read_text())
        pid, backends = int(state["pid"]), dict(state["backends"])
        if not (backends["dynamodb_url"] and backends["table_name"]):
            raise ValueError("no DynamoDB endpoint or table")
    except FileNotFoundError:
        raise SetupError(
            f"no local stack: {path} does not exist; start one with `make dev` (in another "
            "terminal), then run this again"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SetupError(f"{path} is not a local stack's state file ({error!r})") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise SetupError(
            f"the local stack in {path} (pid {pid}) is not running any more; start `make dev`"
        ) from None
    except PermissionError:
        pass  # alive, someone else's
    return backends


def open_store(
    table: str | None, *, local: bool = False, stack_file: str = LOCAL_STACK_FILE
) -> DynamoStore:
    """The stack's usage table: the deployed one, with the operator's AWS credentials and
    region; or, with local, the one `make dev` runs (its table unless one is named)."""
    if local:
        backends = local_backends(stack_file)
        client = botocore.session.get_session().create_client(
            "dynamodb",
            endpoint_url=backends["dynamodb_url"],
            region_name=LOCAL_REGION,
            aws_access_key_id=LOCAL_OPERATOR,
            aws_secret_access_key="local",
            config=Config(connect_timeout=2, retries={"mode": "standard", "max_attempts": 2}),
        )
        return DynamoStore(table or backends["table_name"], client=client)
    if not table:
        raise SetupError(
            "name the table: --table <UsageTableName> (a stack output) or TABLE_NAME; "
            "for the stack `make dev` runs, use --local"
        )
    session, region = aws_session()
    client = session.create_client(
        "dynamodb",
        region_name=region,
        config=Config(retries={"mode": "standard", "max_attempts": 6}),
    )
    return DynamoStore(table, client=client)


def answers_in_one_line(command: Callable[..., int]) -> Callable[..., int]:
    """A missing region, missing credentials, an unreachable endpoint or AWS's refusal is one
    line on stderr and exit code 2, not a traceback."""

    @functools.wraps(command)
    def answered(argv: list[str] | None = None) -> int:
        try:
            return command(argv)
        except SetupError as error:
            problem = str(error)
        except NoCredentialsError:
            problem = NO_CREDENTIALS
        except EndpointConnectionError as error:
            problem = f"cannot reach {error.kwargs.get('endpoint_url')}: is it running, online?"
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            message = error.response.get("Error", {}).get("Message", "")
            problem = f"AWS refused {error.operation_name}: {code}: {message}"
            if code == "ResourceNotFoundException":
                problem += " (check --table, the stack's UsageTableName output, and the region)"
        except BotoCoreError as error:
            problem = str(error)
        except UsageMeterError as error:  # the table stayed busy
            problem = error.message
        print(f"error: {problem}", file=sys.stderr)
        return 2

    return answered


def _show(counter: Counter) -> str:
    shown = {"id": counter.id, **counter.model_dump(mode="json", exclude={"sending"})}
    if counter.held is not None:
        shown["held_identifier"] = counter.identifier(counter.held)
    return json.dumps(shown)


# Stripe's meter event summaries are eventually consistent; leave them this long to settle.
SETTLE_MINUTES = 10


@answers_in_one_line
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
    parser.add_argument(
        "--local",
        action="store_true",
        help="the stack `make dev` runs: its DynamoDB Local and table, from --stack-file; no AWS "
        "credentials or region needed",
    )
    parser.add_argument(
        "--stack-file",
        default=LOCAL_STACK_FILE,
        help=f"where `make dev` records its endpoints (default {LOCAL_STACK_FILE})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status",
        help="one summary: the backlog, its oldest decision in flight, the quarantine, and the "
        "flush's last hour from CloudWatch",
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.add_argument(
        "--no-cloudwatch", action="store_true", help="the table only (no CloudWatch call)"
    )
    status.add_argument(
        "--namespace",
        default=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "UsageMeter"),
        help="the metrics' namespace (default: the template's, UsageMeter)",
    )
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
    _stripe_account_parsers(stripe_actions)
    check = commands.add_parser(
        "reconcile",
        help="compare, per customer, meter and billing period that ended, the units Stripe "
        "confirmed to the flush with Stripe's meter event summaries; exit 1 on any mismatch",
    )
    check.add_argument("--since", required=True, help="periods that ended after: RFC 3339 date")
    check.add_argument("--until", help="and up to (default: now, less the settling delay)")
    check.add_argument(
        "--settle-minutes",
        type=int,
        default=SETTLE_MINUTES,
        help="Stripe's summaries are eventually consistent: skip periods that ended this "
        f"recently (default {SETTLE_MINUTES})",
    )
    args = parser.parse_args(argv)
    if args.command == "stripe" and args.action in ("setup", "check"):  # no table needed
        return _stripe_account(args, parser)
    store = open_store(args.table, local=args.local, stack_file=args.stack_file)

    if args.command == "status":
        return _status(args, store)
    if args.command == "keys":
        return _keys(args, store, parser)
    if args.command == "stripe":
        return _stripe_sync(store)
    if args.command == "reconcile":
        return _reconcile(args, store, parser)
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


def table_status(store: DynamoStore, now: int) -> dict[str, Any]:
    """What the table holds: the backlog (read page by page, never held at once) and the
    quarantine."""
    status: dict[str, Any] = {
        "counters_in_backlog": 0,
        "units_unsent": 0,
        "decisions_in_flight": 0,
        "units_in_flight": 0,
        "oldest_decision_in_flight_seconds": None,
    }
    for page in store.backlog():
        status["counters_in_backlog"] += len(page)
        status["units_unsent"] += sum(max(c.unsent, 0) for c in page)
        for counter in page:
            if counter.sending is not None:
                status["decisions_in_flight"] += 1
                status["units_in_flight"] += counter.sending.value
                age = max(now - counter.sending.decided_at, 0)
                oldest = status["oldest_decision_in_flight_seconds"]
                status["oldest_decision_in_flight_seconds"] = max(oldest or 0, age)
    quarantined = store.quarantined()
    status["quarantined_counters"] = len(quarantined)
    status["units_quarantined"] = sum(c.quarantined for c in quarantined)
    status["quarantined_pairs"] = len({(c.customer, c.meter) for c in quarantined})
    return status


# The flush's metrics (functions/flush/app.py) and the record function's, over the last hour:
# (key, metric, statistic).
_FLUSH_METRICS = (
    ("runs", "FlushDurationSeconds", "SampleCount"),
    ("longest_run_seconds", "FlushDurationSeconds", "Maximum"),
    ("least_time_left_seconds", "FlushTimeLeftSeconds", "Minimum"),
    ("runs_stopped_early", "FlushStoppedEarly", "Sum"),
    ("run_errors", "FlushErrors", "Sum"),
    ("oldest_unreported_seconds", "OldestUnreportedAgeSeconds", "Maximum"),
    ("units_reported", "UnitsReported", "Sum"),
    ("units_quarantined", "UnitsQuarantined", "Sum"),
    ("stripe_calls", "StripeCalls", "Sum"),
    ("stripe_errors", "StripeErrors", "Sum"),
    ("stripe_latency_p50_ms", "StripeCallLatency", "p50"),
    ("stripe_latency_p99_ms", "StripeCallLatency", "p99"),
    ("events_accepted", "EventsAccepted", "Sum"),
)
STATUS_HOURS = 1


def cloudwatch_status(namespace: str, now: int) -> dict[str, Any]:
    """The last hour of the service's metrics, and when the last flush run reported."""
    session, region = aws_session()
    client: Any = session.create_client(
        "cloudwatch",
        region_name=region,
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}),
    )
    period = STATUS_HOURS * 3600
    queries: list[dict[str, Any]] = [
        {
            "Id": f"m{index}",
            "MetricStat": {
                "Metric": {
                    "Namespace": namespace,
                    "MetricName": metric,
                    "Dimensions": [{"Name": "service", "Value": "usage-meter"}],
                },
                "Period": period,
                "Stat": stat,
            },
        }
        for index, (_, metric, stat) in enumerate(_FLUSH_METRICS)
    ]
    queries.append({**queries[0], "Id": "lastrun"})
    queries[-1]["MetricStat"] = {**queries[0]["MetricStat"], "Period": 60}
    answer = client.get_metric_data(
        MetricDataQueries=queries,
        StartTime=now - period,
        EndTime=now,
        ScanBy="TimestampDescending",
    )
    values = {r["Id"]: r for r in answer["MetricDataResults"]}
    found: dict[str, Any] = {"hours": STATUS_HOURS}
    for index, (key, _, stat) in enumerate(_FLUSH_METRICS):
        points = values.get(f"m{index}", {}).get("Values", [])
        if stat in ("Sum", "SampleCount"):
            found[key] = round(sum(points))
        else:
            found[key] = round(points[0], 1) if points else None
    last = values.get("lastrun", {}).get("Timestamps", [])
    found["last_run_seconds_ago"] = int(now - last[0].timestamp()) if last else None
    return found


def _status(args: argparse.Namespace, store: DynamoStore) -> int:
    now = int(time.time())
    table = args.table or (local_backends(args.stack_file)["table_name"] if args.local else "")
    status = {"table": table, **table_status(store, now)}
    if args.local:
        status["cloudwatch"] = {"skipped": "local: the metrics are in `make dev`'s output"}
    elif args.no_cloudwatch or os.environ.get("AWS_ENDPOINT_URL_DYNAMODB"):
        status["cloudwatch"] = {"skipped": "--no-cloudwatch, or the table is not AWS's"}
    else:
        try:
            status["cloudwatch"] = cloudwatch_status(args.namespace, now)
        except (BotoCoreError, ClientError, SetupError) as error:
            status["cloudwatch"] = {"error": str(error)}
    if args.json:
        print(json.dumps(status))
    else:
        print("\n".join(_readable(table, status)))
    return 0


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}".replace(".0 ", " ")
    return f"{seconds:.0f} s"


def _readable(table: str, status: dict[str, Any]) -> list[str]:
    """The status as an operator reads it: what waits, what is stuck, what to do."""
    row = "  {:<30} {}".format
    lines = [f"usage-meter status of table {table}", "backlog"]
    lines.append(row("counters waiting for Stripe", f"{status['counters_in_backlog']:,}"))
    lines.append(row("units not sent yet", f"{status['units_unsent']:,}"))
    in_flight = f"{status['decisions_in_flight']:,} ({status['units_in_flight']:,} units)"
    if status["decisions_in_flight"]:
        oldest = _ago(status["oldest_decision_in_flight_seconds"])
        in_flight += f", the oldest made {oldest} ago"
    lines.append(row("decisions sent, unconfirmed", in_flight))
    quarantine = f"{status['quarantined_counters']:,}"
    if status["quarantined_counters"]:
        quarantine += (
            f" ({status['units_quarantined']:,} units, {status['quarantined_pairs']:,} "
            "customer-meter pairs): `quarantine list` shows why"
        )
    lines += ["quarantine", row("counters Stripe refused", quarantine)]
    metrics = status["cloudwatch"]
    if "skipped" in metrics or "error" in metrics:
        reason = metrics.get("skipped") or metrics.get("error")
        lines += ["metrics", row("not read", reason)]
    else:
        lines.append(f"last {metrics['hours']} h (CloudWatch)")
        runs = f"{metrics['runs']:,}, the last {_ago(metrics['last_run_seconds_ago'])} ago"
        if metrics["runs"]:
            runs += (
                f", the longest {_ago(metrics['longest_run_seconds'])}, at least "
                f"{_ago(metrics['least_time_left_seconds'])} left"
            )
        lines.append(row("flush runs", runs))
        lines.append(
            row(
                "runs with errors / cut short",
                f"{metrics['run_errors']:,} / {metrics['runs_stopped_early']:,}",
            )
        )
        lines.append(row("oldest unreported unit", _ago(metrics["oldest_unreported_seconds"])))
        lines.append(row("events accepted", f"{metrics['events_accepted']:,}"))
        lines.append(
            row(
                "units reported / quarantined",
                f"{metrics['units_reported']:,} / {metrics['units_quarantined']:,}",
            )
        )
        p50, p99 = metrics["stripe_latency_p50_ms"], metrics["stripe_latency_p99_ms"]
        latency = f", p50 {p50:g} ms, p99 {p99:g} ms" if p50 is not None else ""
        calls = f"{metrics['stripe_calls']:,}, {metrics['stripe_errors']:,} errors{latency}"
        lines.append(row("Stripe calls", calls))
    problems = []
    if status["quarantined_counters"]:
        problems.append("units are quarantined")
    if (status["oldest_decision_in_flight_seconds"] or 0) > 30 * 60:
        problems.append("a decision has waited for Stripe over 30 min")
    if metrics.get("runs") == 0:
        problems.append("no flush run reported in the last hour")
    if metrics.get("run_errors"):
        problems.append("flush runs failed")
    lines.append("verdict: " + ("; ".join(problems) if problems else "OK"))
    return lines


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


def _stripe_account_parsers(actions: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    setup = actions.add_parser(
        "setup",
        help="create in Stripe what is missing: a meter per configured meter, optionally a "
        "metered price each and the webhook endpoint; changes nothing that exists, safe to run "
        "again",
    )
    setup.add_argument("--price-amount", type=int, metavar="CENTS", help="also a monthly price")
    setup.add_argument("--currency", help="the price's currency (default usd)")
    setup.add_argument(
        "--event-destination-url",
        help="the stack's StripeEventDestinationUrl: registers an event destination (thin) for "
        "Stripe's asynchronous meter event errors if none has that URL",
    )
    check = actions.add_parser(
        "check",
        help="verify the meters, the webhook endpoint and the event destinations; exits 1 on "
        "any problem",
    )
    for command in (setup, check):
        command.add_argument(
            "--webhook-url",
            help="the stack's StripeWebhookUrl (setup registers it if no endpoint has it)",
        )
        command.add_argument(
            "--meters",
            default=os.environ.get("METERS"),
            help="JSON, as the Meters parameter (default: $METERS, else the template's default)",
        )


def _stripe_account(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from usage_meter.logic import stripe_setup
    from usage_meter.stripe_account import AccountError, StripeAccount  # imports stripe

    try:
        meters = stripe_setup.configured_meters(args.meters)
    except ValueError as error:
        parser.error(str(error))
    price = None
    if args.action == "setup" and args.price_amount is not None:
        currency = (args.currency or "usd").lower()
        if args.price_amount < 0 or len(currency) != 3 or not currency.isalpha():
            parser.error("--price-amount takes whole cents (0 or more), --currency e.g. usd")
        price = stripe_setup.PriceSpec(args.price_amount, currency)
    elif args.action == "setup" and args.currency is not None:
        parser.error("--currency needs --price-amount")
    api_key = os.environ.get("STRIPE_API_KEY")
    if not api_key:
        print("set STRIPE_API_KEY to the account's secret key", file=sys.stderr)
        return 2
    account = StripeAccount(api_key, api_base=os.environ.get("STRIPE_API_BASE") or None)
    failed = False
    try:
        if args.action == "setup":
            lines = stripe_setup.setup(
                account,
                meters,
                price=price,
                webhook_url=args.webhook_url,
                event_destination_url=args.event_destination_url,
            )
        else:
            lines = stripe_setup.check(account, meters, webhook_url=args.webhook_url)
        for line in lines:
            print(json.dumps(line), flush=True)
            failed |= "misconfigured" in (line.get("status"), line.get("webhook_endpoint"))
            failed |= "problem" in line
            if "secret" in line:
                print("Store the signing secret now: it is not shown again.", file=sys.stderr)
    except AccountError as error:
        print(json.dumps({"error": "stripe", "message": str(error)}))
        return 2
    return 1 if failed else 0


def _reconcile(
    args: argparse.Namespace, store: DynamoStore, parser: argparse.ArgumentParser
) -> int:
    from usage_meter.billing.stripe_summaries import StripeSummaries  # imports stripe
    from usage_meter.logic.reconcile import reconcile

    api_key = os.environ.get("STRIPE_API_KEY")
    if not api_key:
        parser.error("set STRIPE_API_KEY to a key that may read meters")
    settled = int(time.time()) - args.settle_minutes * 60
    try:
        since = _moment(args.since)
        until = min(_moment(args.until), settled) if args.until else settled
    except ValueError as error:
        parser.error(str(error))
    stripe = StripeSummaries(api_key, api_base=os.environ.get("STRIPE_API_BASE") or None)
    totals = {"periods": 0, "mismatches": 0, "in_flight": 0, "not_checked": 0}
    for check in reconcile(store, stripe, since=since, until=until):
        totals["periods"] += 1
        if check.status == "ok":
            continue
        print(json.dumps(check.line()))
        key = {"mismatch": "mismatches", "in_flight": "in_flight"}.get(check.status)
        totals[key or "not_checked"] += 1
    print(json.dumps({**totals, "since": args.since, "until": _rfc3339(until)}))
    return 1 if totals["mismatches"] or totals["in_flight"] else 0


def _moment(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def _rfc3339(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _public(key: ApiKey) -> dict[str, object]:
    return key.model_dump(mode="json", exclude={"secret_hash"}) | {"scopes": sorted(key.scopes)}


if __name__ == "__main__":
    sys.exit(main())
