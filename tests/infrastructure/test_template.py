"""The template: lint-clean, transforms offline, and grants each function only what it needs."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from samtranslator.translator.managed_policy_translator import ManagedPolicyLoader
from samtranslator.translator.transform import transform

from devtools.template import load_template

ROOT = Path(__file__).resolve().parents[2]


FUNCTIONS = (
    "RecordFunction",
    "FlushFunction",
    "ReadFunction",
    "AuthorizerFunction",
    "StripeWebhookFunction",
)


class _NoManagedPolicies(ManagedPolicyLoader):
    """The template names no managed policies by name, so nothing needs IAM to resolve."""

    def __init__(self) -> None:
        pass

    def load(self) -> dict[str, str]:
        return {}


def packaged() -> dict[str, Any]:
    """The template as `sam package` hands it to CloudFormation: code already in S3."""
    template = load_template()
    for logical_id, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if key in props:
                props[key] = f"s3://artifacts/{logical_id}.zip"
    return template


@pytest.fixture(scope="module")
def transformed() -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the transform builds ARNs for a region
        return transform(packaged(), {"AWS::Region": "us-east-1"}, _NoManagedPolicies())


def statements(transformed: dict[str, Any], function: str) -> list[dict[str, Any]]:
    role = transformed["Resources"][f"{function}Role"]["Properties"]
    return [s for p in role.get("Policies", []) for s in p["PolicyDocument"]["Statement"]]


def actions(transformed: dict[str, Any], function: str) -> set[str]:
    out: set[str] = set()
    for statement in statements(transformed, function):
        acts = statement["Action"]
        out.update([acts] if isinstance(acts, str) else acts)
    return out


def test_cfn_lint_reports_nothing():
    result = subprocess.run(
        [Path(sys.executable).parent / "cfn-lint", "template.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_sam_transform_yields_the_designed_resources(transformed):
    resources = transformed["Resources"]
    for logical_id in (*FUNCTIONS, "UsageTable", "UsageApi"):
        assert logical_id in resources
    for function in FUNCTIONS:
        props = resources[function]["Properties"]
        assert props["Runtime"] == "python3.13" and props["Handler"] == "app.lambda_handler"
        assert props["Architectures"] == [{"Ref": "Architecture"}]
        assert f"{function}Logs" in resources  # a log group with retention per function


def test_routes_are_the_contracts_routes(transformed):
    paths = transformed["Resources"]["UsageApi"]["Properties"]["Body"]["paths"]
    routes = {f"{method.upper()} {path}" for path, methods in paths.items() for method in methods}
    assert routes == {
        "POST /v1/events",
        "POST /v1/events/batch",
        "GET /v1/customers/{stripe_customer_id}/usage",
        "POST /v1/portal-tokens",
        "OPTIONS /v1/customers/{stripe_customer_id}/usage",
        "POST /v1/stripe/webhook",
        "POST /v1/stripe/events",
    }


def test_every_route_is_guarded_by_the_lambda_authorizer(transformed):
    body = transformed["Resources"]["UsageApi"]["Properties"]["Body"]
    for path, methods in body["paths"].items():
        for method, operation in methods.items():
            if method != "options" and not path.startswith("/v1/stripe/"):
                assert operation.get("security") == [{"KeyOrToken": []}], (method, path)
    authorizer = body["components"]["securitySchemes"]["KeyOrToken"][
        "x-amazon-apigateway-authorizer"
    ]
    assert authorizer["type"] == "request" and authorizer["enableSimpleResponses"] is True
    assert authorizer["authorizerResultTtlInSeconds"] > 0  # cached
    assert "$request.header.Authorization" in authorizer["identitySource"]


def test_only_the_usage_routes_cors_preflight_skips_the_authorizer(transformed):
    paths = transformed["Resources"]["UsageApi"]["Properties"]["Body"]["paths"]
    preflight = paths["/v1/customers/{stripe_customer_id}/usage"]["options"]
    assert preflight["security"] == [{"NONE": []}]  # SAM's spelling of "no authorizer"
    read = transformed["Resources"]["ReadFunction"]["Properties"]["Environment"]["Variables"]
    assert read["PORTAL_ORIGINS"] == {"Ref": "PortalOrigins"}


def test_the_table_is_on_demand_recoverable_expiring_with_a_sparse_index():
    table = load_template()["Resources"]["UsageTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    [index, periods] = table["GlobalSecondaryIndexes"]
    # Keys only: the flush reads each counter consistently anyway, and a record into a counter
    # already in the backlog then writes nothing to the index.
    assert index["IndexName"] == "backlog"
    assert index["Projection"] == {"ProjectionType": "KEYS_ONLY"}
    assert index["KeySchema"] == [
        {"AttributeName": "backlog_pk", "KeyType": "HASH"},
        {"AttributeName": "backlog_sk", "KeyType": "RANGE"},
    ]
    # Reconciliation's: counters by the day their period ends, keys only, set once per counter
    assert periods["IndexName"] == "periods"
    assert periods["Projection"] == {"ProjectionType": "KEYS_ONLY"}
    assert periods["KeySchema"] == [
        {"AttributeName": "period_pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]


def table_grants(transformed: dict[str, Any], function: str) -> dict[str, set[str]]:
    """DynamoDB action -> the resources granted it, as written in the role."""
    grants: dict[str, set[str]] = {}
    for statement in statements(transformed, function):
        acts = statement["Action"]
        resources = statement["Resource"]
        for action in [acts] if isinstance(acts, str) else acts:
            if action.startswith("dynamodb:"):
                for resource in resources if isinstance(resources, list) else [resources]:
                    grants.setdefault(action, set()).add(str(resource))
    return grants


def test_the_flush_queries_only_the_backlog_index_and_writes_only_counters_and_markers(
    transformed,
):
    grants = table_grants(transformed, "FlushFunction")
    table = str({"Fn::GetAtt": ["UsageTable", "Arn"]})
    # Query the index; read counters in batches; decide, confirm, release, quarantine (whose
    # marker is a put). Nothing scans, deletes or queries the table itself.
    assert grants == {
        "dynamodb:Query": {str({"Fn::Sub": "${UsageTable.Arn}/index/backlog"})},
        "dynamodb:BatchGetItem": {table},
        "dynamodb:PutItem": {table},
        "dynamodb:UpdateItem": {table},
    }


def test_the_quarantine_alarm_watches_the_metric_the_flush_emits():
    template = load_template()
    alarm = template["Resources"]["QuarantineAlarm"]["Properties"]
    namespace = template["Globals"]["Function"]["Environment"]["Variables"][
        "POWERTOOLS_METRICS_NAMESPACE"
    ]
    flush_code = (ROOT / "functions" / "flush" / "app.py").read_text()
    assert (alarm["Namespace"], alarm["MetricName"]) == (namespace, "CountersQuarantined")
    assert 'name="CountersQuarantined"' in flush_code


def test_the_flush_runs_on_a_schedule_parameter(transformed):
    schedules = [
        r for r in transformed["Resources"].values() if r["Type"] == "AWS::Scheduler::Schedule"
    ]
    assert [s["Properties"]["ScheduleExpression"] for s in schedules] == [{"Ref": "FlushSchedule"}]


def test_no_statement_grants_a_wildcard_resource(transformed):
    for function in FUNCTIONS:
        for statement in statements(transformed, function):
            resources = statement["Resource"]
            for resource in resources if isinstance(resources, list) else [resources]:
                assert resource != "*", (function, statement)
            assert not any(
                "*" in a
                for a in (
                    [statement["Action"]]
                    if isinstance(statement["Action"], str)
                    else statement["Action"]
                )
            )


def test_the_read_function_cannot_write(transformed):
    assert {a for a in actions(transformed, "ReadFunction") if a.startswith("dynamodb:")} == {
        "dynamodb:Query",
        "dynamodb:BatchGetItem",
    }


def test_stripes_webhook_is_signed_not_keyed_and_its_function_touches_only_customers(
    transformed,
):
    paths = transformed["Resources"]["UsageApi"]["Properties"]["Body"]["paths"]
    assert paths["/v1/stripe/webhook"]["post"]["security"] == [{"NONE": []}]
    assert paths["/v1/stripe/events"]["post"]["security"] == [{"NONE": []}]
    [table, secrets] = statements(transformed, "StripeWebhookFunction")
    keys = ["USAGE#*", "STRIPE_EVENT#*", "SENT#*", "QUARANTINE"]
    assert table["Condition"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": keys}}
    assert secrets["Action"] == ["secretsmanager:GetSecretValue"]


def test_the_record_function_writes_but_cannot_read_the_backlog_or_secrets(transformed):
    granted = actions(transformed, "RecordFunction")
    assert "dynamodb:PutItem" in granted and "dynamodb:Query" not in granted
    assert not any(a.startswith("secretsmanager:") for a in granted)


def secrets_readable_by(transformed: dict[str, Any], function: str) -> list[str]:
    return [
        str(s["Resource"])
        for s in statements(transformed, function)
        if "secretsmanager:GetSecretValue" in s["Action"]
    ]


def test_only_the_flush_and_the_webhook_can_read_the_stripe_secret(transformed):
    readers = {
        f
        for f in FUNCTIONS
        if any("StripeSecretName" in r for r in secrets_readable_by(transformed, f))
    }
    # The flush sends usage; the webhook reads subscriptions back from Stripe
    assert readers == {"FlushFunction", "StripeWebhookFunction"}


def test_the_portal_token_secret_is_read_by_the_authorizer_and_the_issuer_only(transformed):
    readers = {
        f
        for f in FUNCTIONS
        if any("PortalTokenSecret" in r for r in secrets_readable_by(transformed, f))
    }
    assert readers == {"AuthorizerFunction", "ReadFunction"}


def test_the_authorizer_reads_only_key_items(transformed):
    [table, _secret] = statements(transformed, "AuthorizerFunction")
    assert table["Action"] == ["dynamodb:GetItem"]
    assert table["Condition"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["APIKEY#*"]}}


def test_outputs_name_the_api_url_and_the_table():
    assert {"ApiUrl", "UsageTableName"} <= set(load_template()["Outputs"])
