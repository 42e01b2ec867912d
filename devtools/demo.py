"""Run usage-meter end to end on this machine: record sample usage, flush it, print the usage.

Embedded defaults: DynamoDB Local in memory (table built from template.yaml) and a loopback
Stripe stand-in. With STRIPE_API_KEY set (a test-mode key), the flush reports to real Stripe:
the customers and meters named by DEMO_CUSTOMERS / METERS must exist in that account.
"""

import json
import os
import random
import sys
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

from devtools.dynamodb_local import DynamoDBLocal
from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, http_event, load_handler
from devtools.template import create_usage_table

DEFAULT_METERS = '{"ai_messages": {"included": 1000}, "api_calls": {"included": 0}}'


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


def main() -> int:
    customers = os.environ.get("DEMO_CUSTOMERS", "cus_Demo1,cus_Demo2").split(",")
    with ExitStack() as stack:
        engine = stack.enter_context(DynamoDBLocal())
        create_usage_table(engine.client(), "usage-meter-demo")
        os.environ.update(
            TABLE_NAME="usage-meter-demo",
            AWS_ENDPOINT_URL_DYNAMODB=engine.endpoint_url,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ACCESS_KEY_ID="local",
            AWS_SECRET_ACCESS_KEY="local",
            POWERTOOLS_LOG_LEVEL=os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
        )
        os.environ.setdefault("METERS", DEFAULT_METERS)
        stand_in = None
        if not os.environ.get("STRIPE_API_KEY"):
            stand_in = stack.enter_context(FakeStripe())
            os.environ.update(STRIPE_API_KEY="sk_test_local_stand_in", STRIPE_API_BASE=stand_in.url)
        _say(f"DynamoDB Local  {engine.endpoint_url}")
        stripe_where = f"{stand_in.url} (loopback stand-in)" if stand_in else "real API (test key)"
        _say(f"Stripe          {stripe_where}")

        record, flush, read = (load_handler(name) for name in ("record", "flush", "read"))
        meters = sorted(json.loads(os.environ["METERS"]))
        events = _sample_events(customers, meters, datetime.now(UTC))
        for start in range(0, len(events), 40):
            batch = {"events": events[start : start + 40]}
            response = record.lambda_handler(
                http_event("POST", "/v1/events/batch", batch), LambdaContext()
            )
            if response["statusCode"] != 202:
                _say(f"record failed: {response['body']}")
                return 1
        _say(f"recorded        {len(events)} events, {sum(e['quantity'] for e in events)} units")

        summary = flush.lambda_handler({}, LambdaContext())
        _say(
            f"flushed         {summary['groups_sent']} Stripe meter events for "
            f"{summary['events_reported']} usage events ({summary['units_reported']} units)"
        )
        if stand_in:
            _say(f"Stripe received {stand_in.totals()}")
        for customer in customers:
            path = f"/v1/customers/{customer}/usage"
            response = read.lambda_handler(http_event("GET", path), LambdaContext())
            _say(f"GET {path}")
            print(json.dumps(json.loads(response["body"]), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
