"""Every file in events/ drives its function: the samples users pass to `invoke` stay true."""

import json
from pathlib import Path

import pytest

from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, load_handler
from devtools.template import load_template

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


@pytest.mark.usefixtures("quiet_clock")  # records, then reads the period current on the clock
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


def deployed_operations() -> list[str]:
    """What a sample stands for, from template.yaml: each HTTP API route by its route key, and
    "Scheduled Event" for each schedule. A CORS preflight (OPTIONS) needs no sample: the
    function answers every preflight alike. Any other kind of trigger is listed by its type,
    so it has no sample until this rule learns how to match one."""
    operations = []
    for resource in load_template()["Resources"].values():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        for trigger in (resource["Properties"].get("Events") or {}).values():
            kind, properties = trigger["Type"], trigger.get("Properties") or {}
            if kind == "HttpApi":
                method = str(properties["Method"]).upper()
                if method != "OPTIONS":
                    operations.append(f"{method} {properties['Path']}")
            elif kind in ("Schedule", "ScheduleV2"):
                operations.append("Scheduled Event")
            else:
                operations.append(kind)
    return operations


def test_there_is_one_sample_for_each_route_and_schedule_of_the_template():
    # What each events/*.json file stands for: its route key, or its EventBridge detail-type
    samples = [json.loads(path.read_text()) for path in sorted(EVENTS.glob("*.json"))]
    covered = [sample.get("routeKey") or sample.get("detail-type") for sample in samples]
    assert sorted(covered) == sorted(deployed_operations())
