"""`make dev`: the application on http://127.0.0.1:3000 as it runs in AWS, without Docker.

`sam build` for this machine, then DynamoDB Local (data kept in .local/dynamodb unless
--in-memory), the loopback Stripe stand-in (or Stripe test mode when STRIPE_API_KEY is set),
every function in AWS's Lambda Runtime Interface Emulator, the HTTP API from template.yaml's
routes and the flush on the template's schedule. `POST /_local/flush` runs the flush now.
The demo portal (devtools.portal) shows the usage widget on http://127.0.0.1:3001, another
origin than the API's. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from datetime import datetime
from types import FrameType

from devtools.local_lambda import readable_log_line
from devtools.local_stack import (
    DEFAULT_DATA_DIR,
    FLUSH_ROUTE,
    REPO_ROOT,
    STATE_FILE,
    LocalStack,
    StackError,
    StackOptions,
    read_live_state,
    sam_build,
)
from devtools.portal import DEFAULT_PORT as PORTAL_PORT
from devtools.portal import DemoPortal, PortalError, seed_demo_usage

_print_lock = threading.Lock()


def say(line: str) -> None:
    """A console line with the time, so request, log and flush lines read as one story."""
    with _print_lock:
        for part in line.splitlines() or [""]:
            print(f"{datetime.now():%H:%M:%S}  {part}", flush=True)


def function_log(function: str, line: str) -> None:
    text = readable_log_line(line)
    if text is not None:
        say("\n".join(f"  {function:<15} {part}" for part in text.splitlines()))


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"{pair!r} is not KEY=VALUE")
        overrides[name] = value
    return overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make dev", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--port", type=int, default=3000, help="API port (default 3000)")
    parser.add_argument(
        "--in-memory", action="store_true", help="keep no data: DynamoDB Local in memory"
    )
    parser.add_argument(
        "--flush-every",
        type=float,
        metavar="SECONDS",
        help="run the flush this often instead of the template's FlushSchedule\n"
        "(0: only on POST /_local/flush)",
    )
    parser.add_argument("--no-build", action="store_true", help="use .aws-sam/build as it is")
    parser.add_argument(
        "--portal-port",
        type=int,
        default=PORTAL_PORT,
        help=f"the demo portal's port (default {PORTAL_PORT}; 0: no demo portal)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="runtimes per function (default 1)"
    )
    parser.add_argument(
        "--parameter-overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="template parameters, as for sam (e.g. FlushSchedule='rate(1 minute)')",
    )
    return parser.parse_args(argv)


def port_taken(port: int, host: str = "127.0.0.1") -> str | None:
    """Why the API cannot listen on port, or None when it can. Checked before `sam build`, so
    a taken port fails at once rather than after the build."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the API server does
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def _row(label: str, value: str) -> str:
    return f"  {label:<15} {value}"


def banner(stack: LocalStack, in_memory: bool, portal: DemoPortal | None = None) -> list[str]:
    """The start-up lines: where everything is and how to use it."""
    assert stack.backends is not None
    lines = ["usage-meter runs locally (Ctrl-C stops everything)", _row("API", str(stack.api_url))]
    if portal is not None:
        lines.append(_row("Demo portal", f"{portal.url}  (the usage widget, from another origin)"))
        lines.append(_row("", f"  customer {portal.customer}; its backend mints portal tokens"))
    if stack.server_key:
        lines.append(_row("Server key", f"{stack.server_key}  (admin scope, for this run)"))
        lines.append(_row("", '  send it as  -H "Authorization: Bearer <server key>"'))
    for route in sorted(stack.routes.routes, key=lambda r: r.path):
        lines.append(_row("", f"  {route.method:<6} {route.path:<44} {route.function}"))
    scheduled = ", ".join(s.function for s in stack.schedules) or "nothing"
    lines.append(_row("", f"  {'POST':<6} {FLUSH_ROUTE:<44} runs {scheduled} now"))
    storage = "in memory" if in_memory else f"data in {DEFAULT_DATA_DIR.relative_to(REPO_ROOT)}"
    created = " (new)" if stack.table_created else ""
    table = f"table {stack.backends.table_name}{created}, {storage}"
    lines.append(_row("DynamoDB Local", f"{stack.backends.dynamodb_url}  {table}"))
    lines.append(_row("", "  behind an IAM gate: each function may call what its role allows"))
    if stack.stripe is not None:
        lines.append(_row("Stripe", f"{stack.stripe.url}  (loopback stand-in)"))
        lines.append(_row("", f"  received meter events: {stack.stripe.url}/_fake/meter_events"))
    else:
        lines.append(_row("Stripe", "api.stripe.com with STRIPE_API_KEY (test mode)"))
    source = "--flush-every, template: " if stack.options.flush_every is not None else ""
    for schedule in stack.schedules:
        seconds = stack.schedule_seconds(schedule)
        every = f"every {seconds:g} s" if seconds else "not timed"
        timing = f"{every} ({source}{schedule.expression})"
        lines.append(_row("Schedule", f"{schedule.function} {timing}"))
    return lines


def start_portal(stack: LocalStack, portal: DemoPortal) -> None:
    """Serve the demo portal with the stack's read key; its customer gets sample usage once."""
    assert stack.api_url is not None and stack.portal_key is not None
    portal.attach(stack.api_url, stack.portal_key).start()
    if stack.server_key is None:
        return
    try:
        if seed_demo_usage(stack.api_url, stack.server_key, portal.customer):
            say(f"demo portal: sample usage recorded for {portal.customer}, part of it flushed")
    except OSError as error:  # the page still works; it shows what there is
        say(f"demo portal: could not record sample usage: {error}")


def _close(portal: DemoPortal | None) -> None:
    if portal is not None:
        portal.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    running = read_live_state(STATE_FILE)
    if running is not None:
        say(f"a local stack is already running (pid {running.pid}): {running.api_url}")
        return 1
    taken = port_taken(args.port) if args.port else None
    if taken is not None:
        say(
            f"cannot start: port {args.port} is taken ({taken}); stop what uses it, or choose "
            f'another: make dev ARGS="--port {args.port + 100}"'
        )
        return 1
    portal: DemoPortal | None = None
    try:
        if args.portal_port:  # bound first: a taken port fails fast
            portal = DemoPortal(port=args.portal_port, log=say)
        options = StackOptions(
            api_port=args.port,
            data_dir=None if args.in_memory else DEFAULT_DATA_DIR,
            stripe_api_key=os.environ.get("STRIPE_API_KEY") or None,
            stripe_webhook_secret=os.environ.get("STRIPE_WEBHOOK_SECRET") or None,
            parameter_overrides=parse_overrides(args.parameter_overrides),
            flush_every=args.flush_every,
            concurrency=args.concurrency,
            state_file=STATE_FILE,
            log=say,
            function_log=function_log,
            portal_origin=portal.origin if portal else None,
        )
        if not args.no_build:
            say("sam build (no Docker) ...")
            say(f"built in {sam_build():.1f} s")
        if stopping.is_set():
            _close(portal)
            return 130
        stack = LocalStack(options)
        stack.start()
    except (StackError, PortalError, ValueError, argparse.ArgumentTypeError) as error:
        _close(portal)
        say(f"cannot start: {error}")
        return 1
    try:
        if portal is not None:
            start_portal(stack, portal)
        for line in banner(stack, args.in_memory, portal):
            say(line)
        while not stopping.wait(0.5):  # a timed wait: signals are handled promptly
            pass
    finally:
        say("stopping ...")
        _close(portal)
        stack.stop()
        say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
