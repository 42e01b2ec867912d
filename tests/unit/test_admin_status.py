"""`make admin ARGS="status"`: the table and the last hour of CloudWatch as one summary, and as
one JSON object with --json. CloudWatch is a stub answering GetMetricData as AWS does."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from usage_meter import admin
from usage_meter.models.domain import Counter, Decision

NOW = 1_796_000_000


def counter(customer: str, quantity: int, **fields: Any) -> Counter:
    return Counter(
        customer=customer,
        meter="ai_messages",
        period_start="2026-11-01T00:00:00+00:00",
        period_end=NOW + 86_400,
        quantity=quantity,
        **fields,
    )


class Store:
    def __init__(self) -> None:
        flight = Decision(seq=1, value=5, timestamp=NOW - 2400, decided_at=NOW - 2400)
        self.pages = [[counter("cus_A", 3), counter("cus_B", 5, seq=1, sending=flight)]]
        self.held = [counter("cus_C", 4, quarantined=4, quarantine_reason="resource_missing")]

    def backlog(self):
        return iter(self.pages)

    def quarantined(self):
        return self.held


class CloudWatch:
    """GetMetricData over the last hour: each query's statistic, newest first."""

    def __init__(self, values: dict[tuple[str, str], float]) -> None:
        self.values = values
        self.asked: list[dict[str, Any]] = []

    def get_metric_data(self, **params: Any) -> dict[str, Any]:
        self.asked.append(params)
        results = []
        for query in params["MetricDataQueries"]:
            stat = query["MetricStat"]
            key = (stat["Metric"]["MetricName"], stat["Stat"])
            found = key in self.values
            results.append(
                {
                    "Id": query["Id"],
                    "Values": [self.values[key]] if found else [],
                    "Timestamps": [datetime.fromtimestamp(NOW - 180, UTC)] if found else [],
                }
            )
        return {"MetricDataResults": results}


class Session:
    def __init__(self, client: CloudWatch) -> None:
        self.client = client

    def create_client(self, service: str, **kwargs: Any) -> CloudWatch:
        assert service == "cloudwatch"
        return self.client


@pytest.fixture
def cloudwatch(monkeypatch) -> CloudWatch:
    client = CloudWatch(
        {
            ("FlushDurationSeconds", "SampleCount"): 12,
            ("FlushDurationSeconds", "Maximum"): 2.5,
            ("FlushTimeLeftSeconds", "Minimum"): 290.0,
            ("FlushErrors", "Sum"): 0,
            ("FlushStoppedEarly", "Sum"): 0,
            ("OldestUnreportedAgeSeconds", "Maximum"): 2400.0,
            ("UnitsReported", "Sum"): 885,
            ("StripeCalls", "Sum"): 40,
            ("StripeErrors", "Sum"): 2,
            ("StripeCallLatency", "p50"): 120.0,
            ("StripeCallLatency", "p99"): 812.5,
            ("EventsAccepted", "Sum"): 1200,
        }
    )
    monkeypatch.setattr(admin, "aws_session", lambda: (Session(client), "eu-west-1"))
    monkeypatch.setattr(admin.time, "time", lambda: NOW)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    return client


def args(**overrides: Any) -> argparse.Namespace:
    values = {
        "table": "usage-prod",
        "local": False,
        "stack_file": admin.LOCAL_STACK_FILE,
        "json": False,
        "no_cloudwatch": False,
        "namespace": "UsageMeter",
    }
    return argparse.Namespace(**{**values, **overrides})


def test_status_reads_the_flush_metrics_of_the_last_hour(cloudwatch, capsys):
    assert admin._status(args(json=True), Store()) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counters_in_backlog"] == 2 and status["units_unsent"] == 3
    assert (status["decisions_in_flight"], status["units_in_flight"]) == (1, 5)
    assert status["oldest_decision_in_flight_seconds"] == 2400
    assert (status["quarantined_counters"], status["units_quarantined"]) == (1, 4)
    assert status["cloudwatch"] == status["cloudwatch"] | {
        "runs": 12,
        "last_run_seconds_ago": 180,
        "oldest_unreported_seconds": 2400.0,
        "stripe_calls": 40,
        "stripe_errors": 2,
        "stripe_latency_p99_ms": 812.5,
        "units_quarantined": 0,
    }
    [asked] = cloudwatch.asked
    assert all(
        q["MetricStat"]["Metric"]["Namespace"] == "UsageMeter"
        and q["MetricStat"]["Metric"]["Dimensions"] == [{"Name": "service", "Value": "usage-meter"}]
        for q in asked["MetricDataQueries"]
    )


def test_the_readable_status_ends_with_what_needs_attention(cloudwatch, capsys):
    assert admin._status(args(), Store()) == 0
    out = capsys.readouterr().out
    assert "usage-meter status of table usage-prod" in out
    assert "decisions sent, unconfirmed    1 (5 units), the oldest made 40 min ago" in out
    assert "flush runs                     12, the last 3 min ago" in out
    assert "Stripe calls                   40, 2 errors, p50 120 ms, p99 812.5 ms" in out
    assert out.rstrip().endswith(
        "verdict: units are quarantined; a decision has waited for Stripe over 30 min"
    )


def test_without_cloudwatch_access_the_table_part_still_shows(monkeypatch, capsys):
    def refused():
        raise admin.SetupError(admin.NO_CREDENTIALS)

    monkeypatch.setattr(admin, "aws_session", refused)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    assert admin._status(args(), Store()) == 0
    out = capsys.readouterr().out
    assert "counters waiting for Stripe    2" in out
    assert "not read                       no AWS credentials" in out
