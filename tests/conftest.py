"""Shared fixtures: one DynamoDB Local per session, fresh tables from template.yaml per test.

- dynamodb_local (session): a running in-memory DynamoDBLocal; sets no environment variables.
- local_table: a new table on that engine, AWS_* and TABLE_NAME env pointing at it.
- moto_table: the same table under moto's mock_aws(), for fast unit tests.
Both table fixtures yield a devtools.template.TableHandle(name, endpoint_url, client).
- sam_host_build (session): `sam build` for this machine's architecture in a temporary
  directory, built once for every test that runs the built functions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from devtools.dynamodb_local import DynamoDBLocal
from devtools.local_stack import sam_build
from devtools.template import TableHandle, create_usage_table, load_template

REGION = "us-east-1"


@functools.cache
def _template() -> dict[str, Any]:
    # Parsed once per session; create_usage_table only reads it.
    return load_template()


def _table_name() -> str:
    return f"usage-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def dynamodb_local() -> Iterator[DynamoDBLocal]:
    with DynamoDBLocal() as engine:
        yield engine


@pytest.fixture
def local_table(
    dynamodb_local: DynamoDBLocal, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TableHandle]:
    name = _table_name()
    client = dynamodb_local.client()
    create_usage_table(client, name, _template())
    # Code under test builds its own clients from the environment, as it does in Lambda.
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynamodb_local.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("TABLE_NAME", name)
    yield TableHandle(name=name, endpoint_url=dynamodb_local.endpoint_url, client=client)
    with contextlib.suppress(client.exceptions.ResourceNotFoundException):
        client.delete_table(TableName=name)


@pytest.fixture
def moto_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[TableHandle]:
    # An endpoint override would send requests past moto to a real server.
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    name = _table_name()
    monkeypatch.setenv("TABLE_NAME", name)
    with mock_aws():
        # moto only intercepts clients created after mock_aws() started.
        client = boto3.client("dynamodb", region_name=REGION)
        create_usage_table(client, name, _template())
        yield TableHandle(name=name, endpoint_url=None, client=client)


@pytest.fixture(scope="session")
def sam_host_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Its own build and cache directories: a running `make dev` keeps using .aws-sam/build.
    root = tmp_path_factory.mktemp("sam-host-build")
    sam_build(root / "build", cache_dir=root / "cache")
    return root / "build"


@pytest.fixture(scope="session")
def secrets_manager_url() -> Iterator[str]:
    """A Secrets Manager on loopback (moto's server): the functions reach it over HTTP through
    AWS_ENDPOINT_URL_SECRETS_MANAGER, as they reach AWS's when deployed."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def secrets_manager(secrets_manager_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A client for that Secrets Manager; the code under test finds it through the environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", secrets_manager_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID") or "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY") or "local")
    yield boto3.client(
        "secretsmanager",
        endpoint_url=secrets_manager_url,
        region_name=REGION,
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
