"""The IAM model the local gates enforce: which permissions a call needs, what a role allows."""

import pytest

from devtools.iam import (
    Access,
    PolicyError,
    Statement,
    TableKeys,
    accesses,
    template_roles,
)
from devtools.sam_app import parameter_values
from devtools.template import load_template

TABLE = "arn:aws:dynamodb:us-east-1:123456789012:table/t"
TABLES = {"t": TableKeys(TABLE, "pk", {"unreported": "backlog_pk"})}


def needs(operation, **params):
    return accesses("dynamodb", operation, params, tables=TABLES)


def test_a_transaction_needs_each_items_own_action_and_key():
    # Given a transaction that puts an event and updates its counter
    params = {
        "TransactItems": [
            {"Put": {"TableName": "t", "Item": {"pk": {"S": "EVENT#1"}, "sk": {"S": "E"}}}},
            {"Update": {"TableName": "t", "Key": {"pk": {"S": "COUNTER#c"}, "sk": {"S": "C"}}}},
            {"ConditionCheck": {"TableName": "t", "Key": {"pk": {"S": "X"}, "sk": {"S": "X"}}}},
        ]
    }
    # Then IAM checks PutItem, UpdateItem and ConditionCheckItem, not a transaction action
    assert needs("TransactWriteItems", **params) == [
        Access("dynamodb:PutItem", TABLE, ("EVENT#1",)),
        Access("dynamodb:UpdateItem", TABLE, ("COUNTER#c",)),
        Access("dynamodb:ConditionCheckItem", TABLE, ("X",)),
    ]


def test_a_batch_get_needs_batch_get_item_with_every_key():
    keys = [{"pk": {"S": "EVENT#2"}, "sk": {"S": "E"}}, {"pk": {"S": "EVENT#1"}, "sk": {"S": "E"}}]
    assert needs("BatchGetItem", RequestItems={"t": {"Keys": keys}}) == [
        Access("dynamodb:BatchGetItem", TABLE, ("EVENT#1", "EVENT#2"))
    ]


def test_a_query_on_an_index_needs_query_on_the_index_with_its_partition_value():
    found = needs(
        "Query",
        TableName="t",
        IndexName="unreported",
        KeyConditionExpression="#p = :s AND backlog_sk > :k",
        ExpressionAttributeNames={"#p": "backlog_pk"},
        ExpressionAttributeValues={":s": {"S": "U#3"}, ":k": {"S": "a"}},
    )
    assert found == [Access("dynamodb:Query", f"{TABLE}/index/unreported", ("U#3",))]


def test_a_secret_named_by_name_is_checked_by_its_arn():
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:s-AbC123"
    found = accesses(
        "secretsmanager", "GetSecretValue", {"SecretId": "s"}, tables={}, secret_arns={"s": arn}
    )
    assert found == [Access("secretsmanager:GetSecretValue", arn)]


def test_another_service_needs_a_grant_no_role_gives():
    [access] = accesses("sqs", "SendMessage", {}, tables={})
    assert access.action == "sqs:SendMessage"


def test_statements_match_actions_resources_and_every_leading_key():
    statement = Statement(("dynamodb:GetItem",), (TABLE,), leading_keys=("APIKEY#*",))
    assert statement.allows(Access("dynamodb:GetItem", TABLE, ("APIKEY#a",)))
    assert not statement.allows(Access("dynamodb:GetItem", TABLE, ("EVENT#a",)))
    assert not statement.allows(Access("dynamodb:GetItem", TABLE, ("APIKEY#a", "EVENT#a")))
    assert not statement.allows(Access("dynamodb:PutItem", TABLE, ("APIKEY#a",)))
    assert not statement.allows(Access("dynamodb:GetItem", f"{TABLE}/index/i", ("APIKEY#a",)))
    secret = Statement(("secretsmanager:GetSecretValue",), ("arn:s:secret:name-??????",))
    assert secret.allows(Access("secretsmanager:GetSecretValue", "arn:s:secret:name-AbC123"))
    assert not secret.allows(Access("secretsmanager:GetSecretValue", "arn:s:secret:name-x"))


def test_the_templates_roles_resolve_to_local_arns():
    # Given the template with a local table and secret
    template = load_template()
    secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:p-AbC123"
    roles = template_roles(
        template, parameter_values(template), {"UsageTable": TABLE, "PortalTokenSecret": secret}
    )
    # Then every function and the operators' policy has a role, on the local resources
    assert {"RecordFunction", "ReadFunction", "FlushFunction", "AuthorizerFunction"} <= set(roles)
    assert "OperatorPolicy" in roles
    assert roles["AuthorizerFunction"].allows(
        Access("dynamodb:GetItem", TABLE, ("APIKEY#k",))
    ) and not roles["AuthorizerFunction"].allows(Access("dynamodb:GetItem", TABLE, ("EVENT#e",)))
    assert roles["ReadFunction"].allows(Access("secretsmanager:GetSecretValue", secret))
    assert not roles["RecordFunction"].allows(Access("secretsmanager:GetSecretValue", secret))


def test_a_statement_the_model_cannot_judge_is_refused_not_ignored():
    template = {
        "Resources": {
            "F": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "Policies": [
                        {
                            "Statement": [
                                {
                                    "Effect": "Allow",
                                    "Action": "dynamodb:GetItem",
                                    "Resource": "*",
                                    "Condition": {"StringEquals": {"aws:SourceIp": "1.2.3.4"}},
                                }
                            ]
                        }
                    ]
                },
            }
        }
    }
    with pytest.raises(PolicyError):
        template_roles(template, {}, {})
