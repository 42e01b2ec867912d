"""Every file in events/ drives its function: the samples users pass to `invoke` stay true."""

import json
from pathlib import Path

import pytest

from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, load_handler

EVENTS = Path(__file__).resolve().parents[2] / "events"


@pytest.fixture
def env(local_table, monkeypatch):
    monkeypatch.setenv("PORTAL_TOKEN_SECRET", "test-only-secret")
    monkeypatch.setenv(
        "METERS", '{"ai_messages": {"included": 1000}, "api_calls": {"included": 0}}'
    )
    with FakeStripe() as stripe:
        monkeypatch.setenv("STRIPE_API_KEY", "sk_test_events")
        monkeypatch.setenv("STRIPE_API_BASE", stripe.url)
        yield stripe


def invoke(function: str, event_file: str) -> dict:
    event = json.loads((EVENTS / event_file).read_text())
    return load_handler(function).lambda_handler(event, LambdaContext())


def test_the_sample_events_record_flush_and_read(env):
    assert invoke("record", "record-event.json")["statusCode"] == 202
    assert invoke("record", "record-event.json")["statusCode"] == 200  # its replay
    assert invoke("record", "record-batch.json")["statusCode"] == 202
    summary = invoke("flush", "flush-schedule.json")
    # 4 events over 3 (customer, meter, period) pairs: one Stripe call per pair
    assert (summary["sent"], summary["units_reported"], env.calls) == (3, 46, 3)
    assert env.totals()[("cus_Q1w2E3r4", "ai_messages")] == 5
    usage = json.loads(invoke("read", "read-usage.json")["body"])
    token = json.loads(invoke("read", "issue-portal-token.json")["body"])["token"]
    assert token.startswith("upt_")
    assert {m["meter"]: m["reported"] for m in usage["meters"]} == {
        "ai_messages": 5,
        "api_calls": 40,
    }


def test_there_is_a_sample_for_every_route_and_the_schedule():
    assert sorted(p.name for p in EVENTS.glob("*.json")) == [
        "flush-schedule.json",
        "issue-portal-token.json",
        "read-usage.json",
        "record-batch.json",
        "record-event.json",
        "stripe-event-notification.json",
        "stripe-webhook.json",
    ]
