"""Record → flush → read through the three real handlers, DynamoDB Local and the real stripe SDK
talking to a loopback fake Stripe that dedupes identifiers like Stripe does."""

import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, http_event, load_handler, response_json

METERS = '{"ai_messages": {"included": 100}, "api_calls": {"included": 0}}'
CUSTOMERS = [f"cus_E2e{i}" for i in range(5)]


@pytest.fixture
def stripe():
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def handlers(local_table, stripe, monkeypatch):
    monkeypatch.setenv("METERS", METERS)
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_e2e")
    monkeypatch.setenv("STRIPE_API_BASE", stripe.url)
    monkeypatch.setenv("STRIPE_MAX_REQUESTS_PER_SECOND", "1000")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "UsageMeterTest")
    return {name: load_handler(name) for name in ("record", "flush", "read")}


def call(handler, event):
    return handler.lambda_handler(event, LambdaContext())


def recent_times(count: int, rng: random.Random) -> list[int]:
    """Times in the current period, spread over the last few hours."""
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = int(min(timedelta(hours=5), now - month_start).total_seconds())
    return [int(now.timestamp()) - rng.randint(0, span) for _ in range(count)]


def period_of(timestamp: int) -> tuple[int, int]:
    """The calendar month holding timestamp: its start and end, Unix seconds."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return int(start.timestamp()), int(end.timestamp())


# In-process handlers, which read the clock: recorded this month, read back in the same month.
@pytest.mark.usefixtures("quiet_clock")
def test_a_thousand_events_are_billed_with_one_stripe_call_per_pair_and_read_back(handlers, stripe):
    rng = random.Random(20261126)
    accepted: Counter[tuple[str, str]] = Counter()
    pairs: set[tuple[str, str, tuple[int, int]]] = set()
    sent: list[dict] = []
    # Given 1,000 events over 5 customers and 2 meters, some in batches
    for i, when in enumerate(recent_times(1000, rng)):
        body = {
            "stripe_customer_id": rng.choice(CUSTOMERS),
            "meter": rng.choice(["ai_messages", "api_calls"]),
            "quantity": rng.randint(1, 50),
            "timestamp": when,
            "idempotency_key": f"k{i}",
        }
        sent.append(body)
    for start in range(0, 400, 100):
        response = call(
            handlers["record"],
            http_event("POST", "/v1/events/batch", {"events": sent[start : start + 100]}),
        )
        assert response["statusCode"] == 202
    for body in sent[400:]:
        assert call(handlers["record"], http_event("POST", "/v1/events", body))["statusCode"] == 202
    for body in sent:
        accepted[(body["stripe_customer_id"], body["meter"])] += body["quantity"]
        pairs.add((body["stripe_customer_id"], body["meter"], period_of(body["timestamp"])))
    # and replays, conflicting replays and bad requests that must change nothing
    for body in rng.sample(sent, 50):
        response = call(handlers["record"], http_event("POST", "/v1/events", body))
        assert response["statusCode"] == 200 and response_json(response)["duplicate"] is True
    for body in rng.sample(sent, 5):
        conflict = {**body, "quantity": body["quantity"] + 1}
        assert (
            call(handlers["record"], http_event("POST", "/v1/events", conflict))["statusCode"]
            == 409
        )
    for bad in (
        {**sent[0], "quantity": 1.5, "idempotency_key": "x1"},
        {**sent[0], "meter": "gpu", "idempotency_key": "x2"},
    ):
        assert call(handlers["record"], http_event("POST", "/v1/events", bad))["statusCode"] == 422
    assert (
        call(handlers["record"], http_event("POST", "/v1/events", raw_body="{oops"))["statusCode"]
        == 400
    )

    # When the flush runs
    summary = call(handlers["flush"], {})

    # Then Stripe holds exactly the accepted quantities, from one call per (customer, meter,
    # period) pair with usage, whatever the number of events
    assert stripe.totals() == dict(accepted)
    assert stripe.calls == len(pairs) == summary["sent"] == summary["counters_read"]
    assert summary["units_reported"] == sum(accepted.values())
    assert (summary["quarantined"], summary["deferred"], summary["errors"]) == (0, 0, [])
    assert summary["released"] == len(pairs)
    # and each Stripe event carries a time inside its own period, under its own identifier
    delivered = stripe.accepted()
    assert len({event.identifier for event in delivered}) == len(delivered)
    for event in delivered:
        [period] = [p for c, m, p in pairs if (c, m) == (event.customer, event.event_name)]
        assert period[0] <= event.timestamp < period[1]

    # When it runs again, nothing is read and nothing is sent
    again = call(handlers["flush"], {})
    assert (again["counters_read"], again["sent"]) == (0, 0)
    assert stripe.calls == len(pairs)

    # And the portal reads the same totals, all reported
    by_customer: dict[str, dict[str, int]] = defaultdict(dict)
    for (customer, meter), quantity in accepted.items():
        by_customer[customer][meter] = quantity
    for customer in CUSTOMERS:
        response = call(handlers["read"], http_event("GET", f"/v1/customers/{customer}/usage"))
        meters = {m["meter"]: m for m in response_json(response)["meters"]}
        for meter in ("ai_messages", "api_calls"):
            expected = by_customer[customer].get(meter, 0)
            assert (
                meters[meter]["quantity"],
                meters[meter]["reported"],
                meters[meter]["pending"],
            ) == (expected, expected, 0)
