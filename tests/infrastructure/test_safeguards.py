"""What the checkov findings led to, as CloudFormation would deploy it: a dead-letter queue and a
retry policy on the flush schedule, reserved concurrency, and an optional customer KMS key.

The template goes through the SAM transform offline, then its parameters and conditions are
evaluated here the way CloudFormation evaluates them (Ref, Fn::If, Fn::Not, Fn::Equals).
"""

import re
from typing import Any

import pytest
from samtranslator.translator.transform import transform

from devtools.sam_app import rate_seconds
from tests.infrastructure.test_template import _NoManagedPolicies, packaged

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
API_FUNCTIONS = ("RecordFunction", "ReadFunction", "AuthorizerFunction")
NO_VALUE = object()  # AWS::NoValue: the property is left out


@pytest.fixture(scope="module")
def transformed() -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        return transform(packaged(), {"AWS::Region": "us-east-1"}, _NoManagedPolicies())


def deployed(template: dict[str, Any], **overrides: str) -> dict[str, Any]:
    """The resources with the parameters' values (defaults, then overrides) and conditions
    applied; intrinsics that need a stack (GetAtt, Sub...) stay as they are."""
    parameters = {
        name: str(spec["Default"])
        for name, spec in template["Parameters"].items()
        if "Default" in spec
    }
    parameters.update(overrides)
    conditions = template.get("Conditions", {})

    def holds(name: str) -> bool:
        return bool(evaluate(conditions[name]))

    def evaluate(value: Any) -> Any:
        if isinstance(value, list):
            return [v for v in map(evaluate, value) if v is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if set(value) == {"Ref"}:
            name = value["Ref"]
            return NO_VALUE if name == "AWS::NoValue" else parameters.get(name, value)
        if set(value) == {"Fn::If"}:
            condition, when_true, when_false = value["Fn::If"]
            return evaluate(when_true if holds(condition) else when_false)
        if set(value) == {"Fn::Not"}:
            return not evaluate(value["Fn::Not"][0])
        if set(value) == {"Fn::Equals"}:
            left, right = value["Fn::Equals"]
            return str(evaluate(left)) == str(evaluate(right))
        if set(value) == {"Condition"}:
            return holds(value["Condition"])
        items = {key: evaluate(item) for key, item in value.items()}
        return {key: item for key, item in items.items() if item is not NO_VALUE}

    return {
        logical_id: evaluate(resource)
        for logical_id, resource in template["Resources"].items()
        if "Condition" not in resource or holds(resource["Condition"])
    }


def of_type(resources: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {k: r["Properties"] for k, r in resources.items() if r["Type"] == type_}


def flush_target(resources: dict[str, Any]) -> dict[str, Any]:
    [schedule] = of_type(resources, "AWS::Scheduler::Schedule").values()
    target: dict[str, Any] = schedule["Target"]
    return target


def granted(role: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for policy in role.get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            actions = statement["Action"]
            for action in [actions] if isinstance(actions, str) else actions:
                out.append((action, statement["Resource"]))
    return out


def test_a_flush_run_the_scheduler_cannot_start_lands_in_an_alarmed_queue(transformed):
    resources = deployed(transformed)

    target = flush_target(resources)
    queue_arn = {"Fn::GetAtt": ["FlushDeadLetterQueue", "Arn"]}
    assert target.get("DeadLetterConfig") == {"Arn": queue_arn}
    role = resources[target["RoleArn"]["Fn::GetAtt"][0]]["Properties"]
    assert ("sqs:SendMessage", queue_arn) in granted(role)

    queue = resources["FlushDeadLetterQueue"]["Properties"]
    assert queue["SqsManagedSseEnabled"] is True
    assert queue["MessageRetentionPeriod"] == 14 * 24 * 3600
    [alarm] = [
        a
        for a in of_type(resources, "AWS::CloudWatch::Alarm").values()
        if a.get("Dimensions")  # metric-math alarms have none
        == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["FlushDeadLetterQueue", "QueueName"]}}]
    ]
    assert alarm["Namespace"] == "AWS/SQS"
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["Threshold"] == 1


def test_the_scheduler_retries_a_start_only_until_the_next_run_is_due(transformed):
    resources = deployed(transformed)

    retry = flush_target(resources).get("RetryPolicy", {})

    interval = rate_seconds(transformed["Parameters"]["FlushSchedule"]["Default"])
    assert retry.get("MaximumRetryAttempts", 0) >= 1, retry
    assert 60 <= retry.get("MaximumEventAgeInSeconds", 86400) < interval, retry


def test_by_default_the_flush_runs_one_at_a_time_and_the_api_is_not_capped(transformed):
    functions = of_type(deployed(transformed), "AWS::Lambda::Function")

    assert functions["FlushFunction"].get("ReservedConcurrentExecutions") == "1"
    for name in API_FUNCTIONS:
        assert "ReservedConcurrentExecutions" not in functions[name], name


def test_reservations_follow_their_parameters(transformed):
    functions = of_type(
        deployed(transformed, FlushReservedConcurrency="0", ApiReservedConcurrency="5"),
        "AWS::Lambda::Function",
    )

    assert "ReservedConcurrentExecutions" not in functions["FlushFunction"]
    for name in API_FUNCTIONS:
        assert functions[name].get("ReservedConcurrentExecutions") == "5", name


def test_a_kms_key_encrypts_the_table_the_logs_and_the_portal_secret(transformed):
    resources = deployed(transformed, KmsKeyArn=KEY_ARN)

    table = resources["UsageTable"]["Properties"]["SSESpecification"]
    assert table == {"SSEEnabled": True, "SSEType": "KMS", "KMSMasterKeyId": KEY_ARN}
    log_groups = of_type(resources, "AWS::Logs::LogGroup")
    assert log_groups and all(group["KmsKeyId"] == KEY_ARN for group in log_groups.values())
    assert resources["PortalTokenSecret"]["Properties"]["KmsKeyId"] == KEY_ARN


def test_without_a_kms_key_aws_keys_encrypt_everything(transformed):
    resources = deployed(transformed)

    assert resources["UsageTable"]["Properties"]["SSESpecification"] == {
        "SSEEnabled": True,
        "SSEType": "KMS",
    }
    assert not any("KmsKeyId" in g for g in of_type(resources, "AWS::Logs::LogGroup").values())
    assert "KmsKeyId" not in resources["PortalTokenSecret"]["Properties"]


def test_a_kms_key_adds_no_grant_to_any_role(transformed):
    # The key policy lets the account's principals use the key through DynamoDB and Secrets
    # Manager (see the KmsKeyArn parameter): no role of the stack needs kms:* of its own.
    resources = deployed(transformed, KmsKeyArn=KEY_ARN)

    roles = of_type(resources, "AWS::IAM::Role")
    assert roles
    for name, role in roles.items():
        assert not [a for a, _ in granted(role) if a.startswith("kms:")], name


def test_the_kms_key_parameter_takes_a_key_arn_or_nothing(transformed):
    pattern = transformed["Parameters"]["KmsKeyArn"]["AllowedPattern"]

    assert re.fullmatch(pattern, KEY_ARN) and re.fullmatch(pattern, "")
    # Log groups take only a key ARN, not an alias nor a bare key id.
    assert not re.fullmatch(pattern, "alias/usage-meter")
    assert not re.fullmatch(pattern, "1234abcd-12ab-34cd-56ef-1234567890ab")
