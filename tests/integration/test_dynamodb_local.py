"""DynamoDB Local runs, and the table built from template.yaml behaves like the real one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.dynamodb_local import DynamoDBLocal, DynamoDBLocalError
from devtools.template import TableHandle, create_usage_table, load_template

INDEX = "backlog"


def _usage_table_properties() -> dict[str, Any]:
    properties: dict[str, Any] = load_template()["Resources"]["UsageTable"]["Properties"]
    return properties


def _backlog(table: TableHandle, backlog_pk: str) -> list[dict[str, Any]]:
    response = table.client.query(
        TableName=table.name,
        IndexName=INDEX,
        KeyConditionExpression="backlog_pk = :shard",
        ExpressionAttributeValues={":shard": {"S": backlog_pk}},
    )
    items: list[dict[str, Any]] = response["Items"]
    return items


COUNTER_SK = "PERIOD#2026-11-01T00:00:00Z#METER#api_calls#0"


def _counter(pk: str, *, backlog: bool) -> dict[str, Any]:
    """A period counter, shaped as the store writes it."""
    item = {
        "pk": {"S": pk},
        "sk": {"S": COUNTER_SK},
        "customer": {"S": "cus_1"},
        "meter": {"S": "api_calls"},
        "quantity": {"N": "3"},
    }
    if backlog:
        item |= {"backlog_pk": {"S": "U#0"}, "backlog_sk": {"S": COUNTER_SK}}
    return item


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has already exited


def test_engine_serves_table_with_the_templates_backlog_index(local_table: TableHandle) -> None:
    # Given the table created from template.yaml on DynamoDB Local
    expected = next(
        index
        for index in _usage_table_properties()["GlobalSecondaryIndexes"]
        if index["IndexName"] == INDEX
    )

    # When the engine describes it
    table = local_table.client.describe_table(TableName=local_table.name)["Table"]

    # Then the backlog index has the template's key schema and projects keys only
    (index,) = [i for i in table["GlobalSecondaryIndexes"] if i["IndexName"] == INDEX]
    assert index["KeySchema"] == expected["KeySchema"]
    assert index["Projection"] == {"ProjectionType": "KEYS_ONLY"} == expected["Projection"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"


def test_ttl_is_enabled_on_expires_at(local_table: TableHandle) -> None:
    # Given the table created from template.yaml
    # When its TTL setting is read
    ttl = local_table.client.describe_time_to_live(TableName=local_table.name)

    # Then TTL is on, on the template's attribute
    assert ttl["TimeToLiveDescription"] == {
        "TimeToLiveStatus": "ENABLED",
        "AttributeName": _usage_table_properties()["TimeToLiveSpecification"]["AttributeName"],
    }
    assert ttl["TimeToLiveDescription"]["AttributeName"] == "expires_at"


def test_item_without_backlog_keys_is_not_in_the_index(local_table: TableHandle) -> None:
    # Given a counter without backlog_pk/backlog_sk
    local_table.client.put_item(TableName=local_table.name, Item=_counter("E#1", backlog=False))

    # When the backlog shard is queried
    # Then the index does not hold it
    assert _backlog(local_table, "U#0") == []


def test_item_with_backlog_keys_is_in_the_index_with_its_keys_only(
    local_table: TableHandle,
) -> None:
    # Given a counter carrying backlog_pk/backlog_sk
    local_table.client.put_item(TableName=local_table.name, Item=_counter("E#2", backlog=True))

    # When the backlog shard is queried
    items = _backlog(local_table, "U#0")

    # Then the index holds it, keys only: the flush reads the counter itself, consistently
    assert items == [
        {
            "pk": {"S": "E#2"},
            "sk": {"S": COUNTER_SK},
            "backlog_pk": {"S": "U#0"},
            "backlog_sk": {"S": COUNTER_SK},
        }
    ]


def test_removing_backlog_keys_takes_the_item_out_of_the_index(local_table: TableHandle) -> None:
    # Given a counter in the backlog
    local_table.client.put_item(TableName=local_table.name, Item=_counter("E#3", backlog=True))
    assert len(_backlog(local_table, "U#0")) == 1

    # When its backlog keys are removed, as the flush's release does
    local_table.client.update_item(
        TableName=local_table.name,
        Key={"pk": {"S": "E#3"}, "sk": {"S": COUNTER_SK}},
        UpdateExpression="REMOVE backlog_pk, backlog_sk",
    )

    # Then it leaves the index but stays in the table
    assert _backlog(local_table, "U#0") == []
    item = local_table.client.get_item(
        TableName=local_table.name, Key={"pk": {"S": "E#3"}, "sk": {"S": COUNTER_SK}}
    )
    assert item["Item"]["quantity"] == {"N": "3"}


def test_data_dir_keeps_tables_across_restarts(tmp_path: Path) -> None:
    # Given an engine with a data directory and a table holding an item
    engine = DynamoDBLocal(data_dir=tmp_path / "dynamodb")
    with engine:
        create_usage_table(engine.client(), "kept")
        engine.client().put_item(TableName="kept", Item=_counter("E#4", backlog=True))

    # When the engine is stopped and started again
    with engine:
        client = engine.client()

        # Then the table, its item and its index are still there
        assert client.list_tables()["TableNames"] == ["kept"]
        index = client.query(
            TableName="kept",
            IndexName=INDEX,
            KeyConditionExpression="backlog_pk = :shard",
            ExpressionAttributeValues={":shard": {"S": "U#0"}},
        )
        assert [item["pk"]["S"] for item in index["Items"]] == ["E#4"]
    assert (tmp_path / "dynamodb" / "shared-local-instance.db").is_file()


def test_stop_is_idempotent_and_ends_the_java_process() -> None:
    # Given a running engine
    engine = DynamoDBLocal().start()
    pid = engine._process.pid if engine._process else -1

    # When it is stopped twice
    engine.stop()
    engine.stop()

    # Then its Java process is gone and its log file removed
    assert not _is_alive(pid)
    assert not engine.running
    assert engine.log_path is None


def test_busy_explicit_port_fails_clearly() -> None:
    # Given a port something else listens on
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        # When an engine is asked to start there
        # Then it refuses instead of talking to the squatter
        with pytest.raises(DynamoDBLocalError, match="already in use"):
            DynamoDBLocal(port=port).start()


def test_failed_start_reports_the_engines_log() -> None:
    # Given an engine whose JVM cannot start
    engine = DynamoDBLocal(java_opts=("-Xmx1k",))  # too little heap for a JVM to start

    # When it starts
    # Then the error carries the engine's own output
    with pytest.raises(
        DynamoDBLocalError,
        match=r"(?s)exited with code \d+ while starting:.*Too small maximum heap",
    ):
        engine.start()
    assert not engine.running


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_engine_dies_with_a_killed_parent() -> None:
    # Given a Python process running an engine
    script = (
        "from devtools.dynamodb_local import DynamoDBLocal\n"
        "engine = DynamoDBLocal().start()\n"
        "print(engine._process.pid, engine.log_path, flush=True)\n"
        "import time; time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert parent.stdout is not None
    pid, log_path = parent.stdout.readline().split()
    java_pid = int(pid)

    try:
        # When the parent is killed without a chance to clean up
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()

        # Then the engine goes with it
        deadline = time.monotonic() + 10
        while _is_alive(java_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _is_alive(java_pid)
    finally:
        if _is_alive(java_pid):  # don't leak it when the assertion fails
            os.kill(java_pid, signal.SIGKILL)
        Path(log_path).unlink(missing_ok=True)  # the killed parent couldn't remove it


def test_load_template_turns_short_forms_into_long_forms() -> None:
    # Given template.yaml, written with !Ref, !Sub and !GetAtt
    # When it is loaded
    template = load_template()

    # Then those tags are CloudFormation's long-form dicts
    assert template["Globals"]["Function"]["Environment"]["Variables"]["TABLE_NAME"] == {
        "Ref": "UsageTable"
    }
    assert template["Resources"]["RecordFunctionLogs"]["Properties"]["LogGroupName"] == {
        "Fn::Sub": "/aws/lambda/${RecordFunction}"
    }
    assert template["Resources"]["UsageApi"]["Properties"]["AccessLogSettings"][
        "DestinationArn"
    ] == {"Fn::GetAtt": ["ApiAccessLogs", "Arn"]}
