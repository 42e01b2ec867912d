"""Run usage-meter end to end on this machine: record sample usage over HTTP, flush it, print
the usage JSON each customer's portal would show.

It builds with `sam build` and starts the same local stack as `make dev` (devtools.local_stack):
every function in AWS's Lambda Runtime Interface Emulator behind the local HTTP API, DynamoDB
Local in memory and a loopback Stripe stand-in, all on free ports, so it runs beside a
`make dev` on :3000. With STRIPE_API_KEY set (a test-mode key), the flush reports to real
Stripe: the customers named by DEMO_CUSTOMERS and the meters in METERS must exist there.
"""

import json
import os
import random
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from devtools.local_stack import LocalStack, StackError, StackOptions, read_live_state, sam_build
from devtools.portal import DEFAULT_PORT as PORTAL_PORT

BATCH_SIZE = 40


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sample_events(customers: list[str], meters: list[str], now: datetime) -> list[dict]:
    rng = random.Random(42)
    start = max(now - timedelta(hours=3), now.replace(day=1, hour=0, minute=0, second=0))
    span = max(int((now - start).total_seconds()), 1)
    return [
        {
            "stripe_customer_id": rng.choice(customers),
            "meter": rng.choice(meters),
            "quantity": rng.randint(1, 40),
            "timestamp": int(now.timestamp()) - rng.randrange(span),
            "idempotency_key": f"demo-{i}",
        }
        for i in range(120)
    ]


def _options() -> StackOptions:
    meters = os.environ.get("METERS")
    return StackOptions(
        api_port=0,  # a free port: never the :3000 of a running `make dev`
        table_name="usage-meter-demo",
        stripe_api_key=os.environ.get("STRIPE_API_KEY") or None,
        parameter_overrides={"Meters": meters} if meters else {},
        run_schedules=False,  # the demo flushes once, when it has recorded everything
        environment={
            "POWERTOOLS_LOG_LEVEL": os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
            "POWERTOOLS_METRICS_DISABLED": "true",
        },
    )


def _record(api_url: str, session: requests.Session, events: list[dict[str, Any]]) -> bool:
    for start in range(0, len(events), BATCH_SIZE):
        batch = {"events": events[start : start + BATCH_SIZE]}
        response = session.post(f"{api_url}/v1/events/batch", json=batch, timeout=30)
        if response.status_code != 202:
            _say(f"record failed: {response.status_code} {response.text}")
            return False
    return True


def received_totals(totals: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """The stand-in's totals per (customer, meter) as JSON can hold them: customer → meter."""
    nested: dict[str, dict[str, int]] = {}
    for (customer, meter), value in sorted(totals.items()):
        nested.setdefault(customer, {})[meter] = value
    return nested


def run(stack: LocalStack, customers: list[str]) -> int:
    assert stack.api_url is not None and stack.backends is not None
    stripe_where = f"{stack.stripe.url} (loopback stand-in)" if stack.stripe else "real API"
    _say(f"API             {stack.api_url}")
    _say(f"DynamoDB Local  {stack.backends.dynamodb_url}")
    _say(f"Stripe          {stripe_where}")

    # The app's side uses a server key; the portal's side a token for one customer.
    app = requests.Session()
    app.headers["Authorization"] = f"Bearer {stack.server_key}"
    meters = sorted(json.loads(stack.parameters["Meters"]))
    events = _sample_events(customers, meters, datetime.now(UTC))
    if not _record(stack.api_url, app, events):
        return 1
    _say(f"recorded        {len(events)} events, {sum(e['quantity'] for e in events)} units")

    flushed = requests.post(f"{stack.api_url}/_local/flush", timeout=330)
    if flushed.status_code != 200:
        _say(f"flush failed: {flushed.text}")
        return 1
    for function, summary in flushed.json().items():
        _say(
            f"flushed         {function}: {summary['sent']} Stripe meter events, one per "
            f"(customer, meter, period) counter, {summary['units_reported']} units"
        )
    if stack.stripe:
        _say(f"Stripe received {json.dumps(received_totals(stack.stripe.totals()))}")

    for customer in customers:
        issued = app.post(
            f"{stack.api_url}/v1/portal-tokens",
            json={"stripe_customer_id": customer, "ttl_seconds": 600},
            timeout=30,
        )
        if issued.status_code != 201:
            _say(f"portal token failed: {issued.text}")
            return 1
        path = f"/v1/customers/{customer}/usage"
        portal = {"Authorization": f"Bearer {issued.json()['token']}"}
        response = requests.get(f"{stack.api_url}{path}", headers=portal, timeout=30)
        _say(f"GET {path}  (with a portal token for {customer})")
        print(json.dumps(response.json(), indent=2), flush=True)
        if response.status_code != 200:
            return 1
    _say(portal_line())
    return 0


def portal_line() -> str:
    """Where `make dev` serves the demo portal: the usage widget on another origin."""
    url = f"http://127.0.0.1:{PORTAL_PORT}"
    running = "served by the running `make dev`" if read_live_state() else "run `make dev`"
    return f"usage widget    {url}  (the demo portal with <usage-meter>: {running})"


def main() -> int:
    customers = os.environ.get("DEMO_CUSTOMERS", "cus_Demo1,cus_Demo2").split(",")
    try:
        _say(f"sam build       {sam_build():.1f} s")
        with LocalStack(_options()) as stack:
            return run(stack, customers)
    except StackError as error:
        _say(f"demo failed: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
