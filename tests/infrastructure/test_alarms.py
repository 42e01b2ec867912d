"""Every alarm and dashboard graph watches a metric that exists: for the service's own namespace,
one the code emits (captured from its EMF output) with the same name, namespace and dimensions;
for AWS's namespaces, one that AWS publishes with those dimensions, about a resource of the
stack. And every alarm reaches the alarm topic."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.fake_stripe import FakeStripe
from devtools.invoke import LambdaContext, load_handler
from devtools.template import load_template
from usage_meter.billing import (
    BillingAuthError,
    BillingError,
    PermanentBillingError,
    RateLimited,
    TransientBillingError,
)
from usage_meter.models.domain import MeterEventRequest
from usage_meter.models.output import FlushSummary

EVENTS = Path(__file__).resolve().parents[2] / "events"
Metric = tuple[str, str, frozenset[tuple[str, str]]]  # namespace, name, dimensions

# What AWS publishes, by (namespace, metric): the dimension sets it publishes it with, and the
# resource type each dimension names.
AWS_METRICS: dict[tuple[str, str], list[frozenset[str]]] = {
    ("AWS/Lambda", "Errors"): [frozenset({"FunctionName"})],
    ("AWS/Lambda", "Duration"): [frozenset({"FunctionName"})],
    ("AWS/ApiGateway", "5xx"): [frozenset({"ApiId"})],
    ("AWS/ApiGateway", "4xx"): [frozenset({"ApiId"})],
    ("AWS/ApiGateway", "Count"): [frozenset({"ApiId"})],
    ("AWS/ApiGateway", "Latency"): [frozenset({"ApiId"})],
    ("AWS/DynamoDB", "ReadThrottleEvents"): [
        frozenset({"TableName"}),
        frozenset({"TableName", "GlobalSecondaryIndexName"}),
    ],
    ("AWS/DynamoDB", "WriteThrottleEvents"): [
        frozenset({"TableName"}),
        frozenset({"TableName", "GlobalSecondaryIndexName"}),
    ],
    ("AWS/SQS", "ApproximateNumberOfMessagesVisible"): [frozenset({"QueueName"})],
}
DIMENSION_TYPES = {
    "FunctionName": "AWS::Serverless::Function",
    "ApiId": "AWS::Serverless::HttpApi",
    "TableName": "AWS::DynamoDB::Table",
    "QueueName": "AWS::SQS::Queue",
}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture(scope="module")
def namespace(template: dict[str, Any]) -> str:
    return str(
        template["Globals"]["Function"]["Environment"]["Variables"]["POWERTOOLS_METRICS_NAMESPACE"]
    )


def _emitted(output: str) -> set[Metric]:
    found = set()
    for line in output.splitlines():
        if not line.startswith("{") or '"_aws"' not in line:
            continue
        record = json.loads(line)
        for directive in record["_aws"]["CloudWatchMetrics"]:
            for dimensions in directive["Dimensions"]:
                dims = frozenset((name, str(record[name])) for name in dimensions)
                for metric in directive["Metrics"]:
                    found.add((directive["Namespace"], metric["Name"], dims))
    return found


class _Failing:
    """Billing that raises the next error of its list on each call."""

    def __init__(self, errors: list[BillingError]) -> None:
        self.errors = errors

    def send(self, request: MeterEventRequest) -> Any:
        raise self.errors.pop(0)


@pytest.fixture
def emitted(moto_table, monkeypatch, capsys) -> Iterator[set[Metric]]:
    """What the record and flush functions print as EMF: a record and its replay, a flush run,
    and a run's Stripe errors of every class."""
    monkeypatch.setenv("METERS", '{"ai_messages": {"included": 1000}, "api_calls": {}}')
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_alarms")
    monkeypatch.setenv("PORTAL_TOKEN_SECRET", "test-only")
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    event = json.loads((EVENTS / "record-event.json").read_text())
    record = load_handler("record")
    record.lambda_handler(event, LambdaContext())
    record.lambda_handler(event, LambdaContext())  # a duplicate
    with FakeStripe() as stripe:
        monkeypatch.setenv("STRIPE_API_BASE", stripe.url)
        flush = load_handler("flush")
        assert flush.lambda_handler({}, LambdaContext())["sent"] == 1
    errors = [
        RateLimited("slow down"),
        TransientBillingError("503"),
        PermanentBillingError("no such customer", code="resource_missing"),
        BillingAuthError("expired key"),
        BillingError("something else"),
    ]
    calls = flush._StripeCalls(_Failing(errors))
    request = MeterEventRequest(
        identifier="umc_x.1", event_name="ai_messages", customer="cus_A", value=1, timestamp=1
    )
    for _ in range(len(errors)):
        with pytest.raises(BillingError):
            calls.send(request)
    flush.publish(FlushSummary(), calls, seconds=1.0, left=290.0)
    flush.metrics.flush_metrics()
    yield _emitted(capsys.readouterr().out)


def _dimensions(raw: list[dict[str, Any]]) -> frozenset[tuple[str, Any]]:
    return frozenset((d["Name"], json.dumps(d["Value"], sort_keys=True)) for d in raw)


def alarm_metrics(template: dict[str, Any]) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """(alarm, namespace, metric, dimensions) for every metric an alarm reads."""
    found = []
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::CloudWatch::Alarm":
            continue
        props = resource["Properties"]
        if "MetricName" in props:
            found.append((name, props["Namespace"], props["MetricName"], props["Dimensions"]))
        for query in props.get("Metrics", []):
            if "MetricStat" in query:
                metric = query["MetricStat"]["Metric"]
                found.append(
                    (name, metric["Namespace"], metric["MetricName"], metric["Dimensions"])
                )
    return found


def dashboard_metrics(template: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(namespace, metric, dimensions) of every graph line; ${X} becomes {"Ref": X}."""
    body = template["Resources"]["UsageDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    refs: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        refs.append(match.group(1))
        return f"__ref{len(refs) - 1}__"

    numbers = re.sub(r'(?<!")\$\{[^}]+\}', "0", body)  # a Number parameter, unquoted
    data = json.loads(re.sub(r"\$\{([^}]+)\}", placeholder, numbers))
    found = []
    for widget in data["widgets"]:
        for line in widget["properties"].get("metrics", []):
            namespace, metric, *rest = [part for part in line if not isinstance(part, dict)]
            dimensions = []
            for key, value in zip(rest[::2], rest[1::2], strict=True):
                ref = re.fullmatch(r"__ref(\d+)__", value)
                dimensions.append(
                    {"Name": key, "Value": {"Ref": refs[int(ref.group(1))]} if ref else value}
                )
            found.append((namespace, metric, dimensions))
    return found


def _check(
    template: dict[str, Any],
    namespace: str,
    emitted: set[Metric],
    where: str,
    metric_namespace: str,
    metric: str,
    dimensions: list[dict[str, Any]],
) -> list[str]:
    if metric_namespace == namespace:
        if any(not isinstance(d["Value"], str) for d in dimensions):
            return [f"{where}: {metric} has a dimension no code sets: {dimensions}"]
        wanted = (metric_namespace, metric, frozenset((d["Name"], d["Value"]) for d in dimensions))
        if wanted not in emitted:
            same = sorted(str(sorted(d)) for n, m, d in emitted if m == metric)
            return [f"{where}: {metric} {dimensions} is not emitted; emitted with {same}"]
        return []
    known = AWS_METRICS.get((metric_namespace, metric))
    if known is None:
        return [f"{where}: {metric_namespace} {metric} is not a metric this test knows"]
    if frozenset(d["Name"] for d in dimensions) not in known:
        return [f"{where}: {metric_namespace} {metric} is not published with {dimensions}"]
    problems = []
    for dimension in dimensions:
        value = dimension["Value"]
        resource_id = (
            value.get("Ref") or value.get("Fn::GetAtt", [None])[0]
            if isinstance(value, dict)
            else None
        )
        kind = DIMENSION_TYPES.get(dimension["Name"])
        if kind is None:
            continue
        if resource_id not in template["Resources"]:
            problems.append(f"{where}: {metric} {dimension['Name']} names no resource: {value}")
        elif template["Resources"][resource_id]["Type"] != kind:
            problems.append(f"{where}: {metric} {dimension['Name']} is not a {kind}: {value}")
    return problems


def test_the_code_emits_its_metrics_in_the_templates_namespace(emitted, namespace):
    names = {name for ns, name, _ in emitted if ns == namespace}
    assert {"EventsAccepted", "OldestUnreportedAgeSeconds", "StripeErrors"} <= names
    # one per error class, beside the total
    classes = {dict(dims).get("ErrorClass") for _, name, dims in emitted if name == "StripeErrors"}
    assert classes == {None, "rate_limited", "unavailable", "rejected", "auth", "other"}


def test_every_alarm_watches_a_metric_that_is_published(template, namespace, emitted):
    problems = []
    for alarm, metric_namespace, metric, dimensions in alarm_metrics(template):
        problems += _check(
            template, namespace, emitted, alarm, metric_namespace, metric, dimensions
        )
    assert problems == []


def test_every_dashboard_graph_shows_a_metric_that_is_published(template, namespace, emitted):
    lines = dashboard_metrics(template)
    assert len(lines) > 20
    problems = []
    for metric_namespace, metric, dimensions in lines:
        problems += _check(
            template, namespace, emitted, "UsageDashboard", metric_namespace, metric, dimensions
        )
    assert problems == []


def test_the_issues_alarms_are_there_and_reach_the_alarm_topic(template):
    alarms = {
        name: resource["Properties"]
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert {
        "OldestUnreportedAlarm",
        "QuarantineAlarm",
        "FlushErrorsAlarm",
        "FlushDeadLetterAlarm",
        "ApiServerErrorsAlarm",
        "TableThrottlingAlarm",
    } <= set(alarms)
    topic = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    for name, props in alarms.items():
        assert props.get("AlarmActions") == topic, name
        assert props.get("OKActions") == topic, name
    # Units past the invoice grace period are not billed: the age alarm fires well before
    age = template["Parameters"]["OldestUnreportedAlarmSeconds"]
    assert age["Default"] <= 1800 and age["MaxValue"] < 3600
    assert alarms["OldestUnreportedAlarm"]["Threshold"] == {"Ref": "OldestUnreportedAlarmSeconds"}
    # and a flush that stopped reporting altogether counts as breaching
    assert alarms["OldestUnreportedAlarm"]["TreatMissingData"] == "breaching"
