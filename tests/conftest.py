"""Shared fixtures: one DynamoDB Local per session, fresh tables from template.yaml per test.

- dynamodb_local (session): a running in-memory DynamoDBLocal; sets no environment variables.
- local_table: a new table on that engine, AWS_* and TABLE_NAME env pointing at it.
- moto_table: the same table under moto's mock_aws(), for fast unit tests.
Both table fixtures yield a devtools.template.TableHandle(name, endpoint_url, client).
- sam_host_build (session): `sam build` for this machine's architecture in a temporary
  directory, built once for every test that runs the built functions.
- forced_clock (session, autouse): the run's clock, real or forced near an hour or month
  boundary by USAGE_METER_TEST_CLOCK (tests/clock.py); quiet_clock and real_clock set it aside
  for one test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import time_machine
from moto import mock_aws

from devtools.dynamodb_local import DynamoDBLocal
from devtools.local_stack import sam_build
from devtools.template import TableHandle, create_usage_table, load_template
from tests.clock import (
    CLOCK_VARIABLE,
    ClockSettingError,
    forced_instant,
    on_real_clock,
    quiet_instant,
)

REGION = "us-east-1"
# Seconds for a test whose setup may run the session's `sam build` and start a local stack.
SAM_BUILD_TIMEOUT = 600
_FORCED = pytest.StashKey[datetime | None]()  # the forced clock's start, None for the real one


def pytest_configure(config: pytest.Config) -> None:
    # Read once, before collection: a mistyped setting stops the run instead of being ignored.
    setting = os.environ.get(CLOCK_VARIABLE, "")
    try:
        config.stash[_FORCED] = forced_instant(setting, datetime.now(UTC))
    except ClockSettingError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The first test (in random order) that needs the built functions pays for the build.
    for item in items:
        built = "sam_host_build" in getattr(item, "fixturenames", ())
        if built and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SAM_BUILD_TIMEOUT))


def pytest_report_header(config: pytest.Config) -> str:
    instant = config.stash.get(_FORCED, None)
    if instant is None:
        return f"clock: real ({CLOCK_VARIABLE} forces one)"
    return f"clock: {os.environ[CLOCK_VARIABLE]}, from {instant:%Y-%m-%dT%H:%M:%SZ}, ticking"


@pytest.fixture(scope="session", autouse=True)
def forced_clock(request: pytest.FixtureRequest) -> Iterator[datetime | None]:
    """The whole run on the forced clock, if one is set: this process only (threads included),
    starting at its instant when the first test starts and ticking with real time."""
    instant = request.config.stash.get(_FORCED, None)
    if instant is None:
        yield None
        return
    with time_machine.travel(instant, tick=True):
        yield instant


@pytest.fixture
def quiet_clock() -> Iterator[datetime]:
    """For a test whose code reads the clock itself (no `now` to give it) and records, then reads
    a period: mid-month and mid-hour (tests/clock.py), ticking, whatever the run's clock."""
    instant = datetime.fromtimestamp(quiet_instant(time.time()), UTC)
    with time_machine.travel(instant, tick=True):
        yield instant


@pytest.fixture
def real_clock() -> Iterator[None]:
    """For a test that compares times with another process (which keeps the real clock): the
    real clock, even when the run's is forced."""
    with on_real_clock():
        yield


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
