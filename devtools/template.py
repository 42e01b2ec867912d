"""Read the SAM template and build local tables from it, so tests never hand-copy the schema."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = REPO_ROOT / "template.yaml"

# Short-form tag -> long-form key. !GetAtt is special-cased below ("a.b" -> [a, b]).
_INTRINSICS = {
    "Ref": "Ref",
    "Condition": "Condition",
    **{
        name: f"Fn::{name}"
        for name in (
            "Sub", "GetAtt", "If", "Join", "Select", "Equals", "Not", "And", "Or", "FindInMap",
            "Base64", "Split", "ImportValue", "GetAZs", "Cidr", "Length", "ToJsonString",
        )
    },
}  # fmt: skip

# create_table accepts these keys of a CloudFormation GSI/LSI (ContributorInsightsSpecification
# and friends are CloudFormation-only).
_GSI_KEYS = ("IndexName", "KeySchema", "Projection", "ProvisionedThroughput", "OnDemandThroughput")
_LSI_KEYS = ("IndexName", "KeySchema", "Projection")


class TableHandle(NamedTuple):
    """A table made for a test: its name, the endpoint it lives on (None under moto), a client."""

    name: str
    endpoint_url: str | None
    client: DynamoDBClient


class CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short-form tags into their long-form dicts."""


def _intrinsic(key: str) -> Callable[[CfnLoader, yaml.Node], dict[str, Any]]:
    def construct(loader: CfnLoader, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if key == "Fn::GetAtt":
                # CloudFormation splits at the first dot only: !GetAtt Stack.Outputs.Name.
                resource, dot, attribute = str(value).partition(".")
                if not dot:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"!GetAtt {value!r} needs the form Resource.Attribute",
                        node.start_mark,
                    )
                value = [resource, attribute]
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, yaml.MappingNode)
            value = loader.construct_mapping(node, deep=True)
        return {key: value}

    return construct


for _tag, _key in _INTRINSICS.items():
    CfnLoader.add_constructor(f"!{_tag}", _intrinsic(_key))


def load_template(path: Path | str = TEMPLATE_PATH) -> dict[str, Any]:
    """The template as plain data, short-form intrinsics in long form ({"Ref": ...})."""
    with Path(path).open(encoding="utf-8") as stream:
        template = yaml.load(stream, Loader=CfnLoader)  # CfnLoader is a SafeLoader
    if not isinstance(template, dict) or "Resources" not in template:
        raise ValueError(f"{path} is not a CloudFormation template (no Resources mapping)")
    return template


def _is_intrinsic(value: Any) -> bool:
    if not isinstance(value, dict) or len(value) != 1:
        return False
    (key,) = value
    return key in ("Ref", "Condition") or str(key).startswith("Fn::")


def _reject_intrinsics(value: Any, where: str) -> None:
    """Raise if value holds a function a local engine can't evaluate (no parameters, no stack)."""
    if _is_intrinsic(value):
        raise ValueError(
            f"{where} is {value!r}, an unresolved intrinsic; a local table needs literal values "
            "(hard-code it in the template or resolve it before calling)"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_intrinsics(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_intrinsics(item, f"{where}[{index}]")


def _table_properties(template: dict[str, Any], logical_id: str) -> dict[str, Any]:
    resources = template.get("Resources") or {}
    resource = resources.get(logical_id)
    if resource is None:
        tables = [k for k, v in resources.items() if v.get("Type") == "AWS::DynamoDB::Table"]
        raise KeyError(f"no resource {logical_id!r} in the template; its tables: {tables}")
    if resource.get("Type") != "AWS::DynamoDB::Table":
        raise ValueError(f"{logical_id} is a {resource.get('Type')}, not an AWS::DynamoDB::Table")
    properties: dict[str, Any] = resource.get("Properties") or {}
    return properties


def table_create_kwargs(
    template: dict[str, Any], table_name: str, logical_id: str = "UsageTable"
) -> dict[str, Any]:
    """create_table kwargs from the table's Properties (keys, indexes, billing, stream).

    The template's TableName is replaced by table_name. PITR, SSE, tags and TTL are not
    create_table parameters: TTL is applied by create_usage_table, the others don't matter locally.
    """
    properties = copy.deepcopy(_table_properties(template, logical_id))
    where = f"{logical_id}.Properties"
    for required in ("AttributeDefinitions", "KeySchema"):
        if required not in properties:
            raise ValueError(f"{where} has no {required}")

    kwargs: dict[str, Any] = {
        "TableName": table_name,
        "AttributeDefinitions": properties["AttributeDefinitions"],
        "KeySchema": properties["KeySchema"],
        # CloudFormation's default when BillingMode is absent.
        "BillingMode": properties.get("BillingMode", "PROVISIONED"),
    }
    if "GlobalSecondaryIndexes" in properties:
        kwargs["GlobalSecondaryIndexes"] = [
            {k: index[k] for k in _GSI_KEYS if k in index}
            for index in properties["GlobalSecondaryIndexes"]
        ]
    if "LocalSecondaryIndexes" in properties:
        kwargs["LocalSecondaryIndexes"] = [
            {k: index[k] for k in _LSI_KEYS if k in index}
            for index in properties["LocalSecondaryIndexes"]
        ]
    if "ProvisionedThroughput" in properties:
        kwargs["ProvisionedThroughput"] = properties["ProvisionedThroughput"]
    if "StreamSpecification" in properties:
        # CloudFormation implies StreamEnabled; the API wants it spelled out.
        view_type = properties["StreamSpecification"].get("StreamViewType")
        kwargs["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": view_type}

    for key, value in kwargs.items():
        if key != "TableName":
            _reject_intrinsics(value, f"{where}.{key}")
    return kwargs


def _time_to_live(template: dict[str, Any], logical_id: str) -> dict[str, Any] | None:
    ttl = _table_properties(template, logical_id).get("TimeToLiveSpecification")
    if ttl is None:
        return None
    _reject_intrinsics(ttl, f"{logical_id}.Properties.TimeToLiveSpecification")
    return {"AttributeName": ttl["AttributeName"], "Enabled": bool(ttl.get("Enabled", False))}


def _wait_active(client: DynamoDBClient, table_name: str, timeout: float) -> None:
    # Our own poll: the boto3 waiter sleeps 20 s between tries and ignores index status.
    deadline = time.monotonic() + timeout
    while True:
        table = client.describe_table(TableName=table_name)["Table"]
        statuses = [table["TableStatus"]]
        statuses += [index["IndexStatus"] for index in table.get("GlobalSecondaryIndexes", [])]
        if all(status == "ACTIVE" for status in statuses):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"table {table_name} not ACTIVE after {timeout} s: {statuses}")
        time.sleep(0.1)


def create_usage_table(
    client: DynamoDBClient,
    table_name: str,
    template: dict[str, Any] | None = None,
    *,
    logical_id: str = "UsageTable",
    timeout: float = 60,
) -> None:
    """Create the template's table as table_name, wait until ACTIVE, then switch TTL on."""
    template = load_template() if template is None else template
    kwargs = table_create_kwargs(template, table_name, logical_id)
    ttl = _time_to_live(template, logical_id)  # validated before anything is created
    client.create_table(**kwargs)
    _wait_active(client, table_name, timeout)
    if ttl is None or not ttl["Enabled"]:
        return
    try:
        client.update_time_to_live(TableName=table_name, TimeToLiveSpecification=ttl)
    except ClientError as error:
        message = error.response.get("Error", {}).get("Message", "")
        if "already enabled" not in message.lower():
            raise
