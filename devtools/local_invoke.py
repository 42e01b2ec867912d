"""`make invoke FN=FlushFunction EVENT=events/flush-schedule.json`: a Docker-free
`sam local invoke`. The function runs once in AWS's Lambda Runtime Interface Emulator, with the
environment template.yaml gives it, and its result is printed as JSON on stdout.

While `make dev` runs, the function uses its DynamoDB Local and Stripe (stand-in or test mode)
and its build, so it sees what the API stored. Otherwise it builds, starts DynamoDB Local on
the same data (.local/dynamodb) and a Stripe stand-in of its own, and stops them afterwards.
Without FN the function is the one the event is for (its routeKey, or the schedule's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from devtools.local_lambda import FunctionError, InvocationError
from devtools.local_stack import (
    DEFAULT_DATA_DIR,
    STATE_FILE,
    LocalStack,
    StackError,
    StackOptions,
    read_live_state,
    sam_build,
)
from devtools.sam_app import function_for_event, parameter_values, route_table, schedules
from devtools.template import load_template


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_event(source: str | None) -> Any:
    if source is None:
        return {}
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    return json.loads(text)


def options_for(function: str, build: bool) -> StackOptions:
    """Attach to a running `make dev` when there is one; else a stack of our own."""
    running = read_live_state(STATE_FILE)
    if running is not None:
        if not running.backends.stripe_api_key:
            raise StackError("`make dev` uses Stripe test mode: set STRIPE_API_KEY here too")
        _say(f"using the running local stack (pid {running.pid}) and its build")
        return StackOptions(
            api_port=None,
            run_schedules=False,
            functions=[function],
            attach=running.backends,
            parameter_overrides=running.parameter_overrides,  # the same environment as its API
        )
    if build:
        _say(f"built in {sam_build():.1f} s")
    return StackOptions(
        api_port=None,
        run_schedules=False,
        functions=[function],
        data_dir=DEFAULT_DATA_DIR,
        stripe_api_key=os.environ.get("STRIPE_API_KEY") or None,
        state_file=STATE_FILE,  # so a `make dev` started meanwhile won't open the same data
    )


def event_function(event: Any) -> str:
    """The function a sample event is for, by the template's routes and schedules."""
    template = load_template()
    parameters = parameter_values(template)
    return function_for_event(event, route_table(template), schedules(template, parameters))


def invoke(function: str | None, event: Any, build: bool) -> int:
    function = function or event_function(event)
    with LocalStack(options_for(function, build)) as stack:
        try:
            result = stack.invoke(function, event)
        except FunctionError as error:
            print(json.dumps(error.payload, indent=2), flush=True)
            return 1
        print(json.dumps(result, indent=2), flush=True)
        if stack.stripe is not None and stack.stripe.accepted():
            totals = " ".join(f"{c}/{m}={v}" for (c, m), v in sorted(stack.stripe.totals().items()))
            _say(f"the Stripe stand-in received: {totals}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make invoke", description=__doc__)
    parser.add_argument("function", nargs="?", help="logical id, e.g. FlushFunction")
    parser.add_argument("-e", "--event", help="event JSON file, - for stdin (default {})")
    parser.add_argument("--no-build", action="store_true", help="use .aws-sam/build as it is")
    args = parser.parse_args(argv)
    try:
        return invoke(args.function, read_event(args.event), build=not args.no_build)
    except (StackError, InvocationError, LookupError, ValueError, OSError) as error:
        _say(f"invoke failed: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
