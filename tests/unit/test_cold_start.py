"""What the API functions do at init (issue 13): each handler module is imported in a fresh
interpreter with the environment template.yaml gives its function, as at a Lambda cold start, and
the modules it imported and the pydantic models it built are checked. `make bench` measures the
time; this keeps what it measured from creeping back."""

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from devtools.sam_app import function_specs, parameter_values
from devtools.template import load_template
from usage_meter.models.auth import Scope

ROOT = Path(__file__).resolve().parents[2]
API_FUNCTIONS = {
    "RecordFunction": "record",
    "ReadFunction": "read",
    "AuthorizerFunction": "authorizer",
}

PROBE = """
import gc, importlib.util, json, os, sys
import botocore

# Every directory of botocore's service data listed during init
DATA = os.path.join(os.path.dirname(botocore.__file__), "data")
listed = []
listdir = os.listdir
def counting_listdir(path="."):
    if str(path).startswith(DATA):
        listed.append(os.path.relpath(path, DATA))
    return listdir(path)
os.listdir = counting_listdir

spec = importlib.util.spec_from_file_location("app", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from pydantic import BaseModel

def models(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from models(sub)

found = {f"{m.__module__}.{m.__qualname__}": m.__pydantic_complete__ for m in models(BaseModel)}
if sys.argv[2] == "snapshot":
    # What Lambda's runtime does around a SnapStart snapshot, in its order.
    from awslambdaric import lambda_runtime_hooks_runner
    rng_state = module.rng.getstate()
    lambda_runtime_hooks_runner.run_before_snapshot()
    found = {f"{m.__module__}.{m.__qualname__}": m.__pydantic_complete__ for m in models(BaseModel)}
    lambda_runtime_hooks_runner.run_after_restore()
    found["rng reseeded"] = module.rng.getstate() != rng_state
print(json.dumps({
    "modules": sorted(sys.modules),
    "models": found,
    "listed": listed,
    "gc": {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()},
}))
"""

# Never at the init of an API function: the Stripe SDK and the code that calls it, Powertools'
# event handler (every resolver it has, and OpenAPI), boto3 (botocore does), the operators'
# command and the flush.
NEVER = (
    "stripe",
    "usage_meter.billing",
    "usage_meter.logic.flush",
    "usage_meter.admin",
    "aws_lambda_powertools.event_handler",
    "aws_lambda_powertools.utilities.data_classes",
    "boto3",
)
# Modules of one function's routes that another has no use for.
NOT_IN = {
    "RecordFunction": ("usage_meter.logic.usage", "usage_meter.secrets"),
    "ReadFunction": ("usage_meter.logic.record",),
    "AuthorizerFunction": (
        "usage_meter.api",
        "usage_meter.logic.record",
        "usage_meter.logic.usage",
    ),
}
# The only models validated at init: the environment's settings.
BUILT_AT_INIT = {"usage_meter.config.Settings", "usage_meter.config.MeterSettings"}


@cache
def environments() -> dict[str, dict[str, str]]:
    template = load_template(ROOT / "template.yaml")
    specs = function_specs(template, parameter_values(template), {"UsageTable": "usage"})
    return {name: dict(specs[name].environment) for name in API_FUNCTIONS}


@cache
def cold_start(function: str) -> dict[str, Any]:
    return init(function)


def init(function: str, mode: str = "init", **extra: str) -> dict[str, Any]:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT / "layers" / "shared"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        **environments()[function],
        **extra,
    }
    app = ROOT / "functions" / API_FUNCTIONS[function] / "app.py"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(app), mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def imported(modules: list[str], prefix: str) -> list[str]:
    return [m for m in modules if m == prefix or m.startswith(f"{prefix}.")]


@pytest.mark.parametrize("function", API_FUNCTIONS)
def test_init_imports_nothing_the_functions_requests_do_not_use(function):
    # Given a cold start of the function, with its template's environment
    modules = cold_start(function)["modules"]
    # Then none of what it has no use for is imported
    for prefix in (*NEVER, *NOT_IN[function]):
        assert imported(modules, prefix) == [], f"{function} imports {prefix} at init"


@pytest.mark.parametrize("function", API_FUNCTIONS)
def test_init_builds_no_model_but_the_settings(function):
    # Given a cold start of the function
    models = cold_start(function)["models"]
    # Then its request and domain models are defined, but built only when a request uses them
    assert {m for m, built in models.items() if built} <= BUILT_AT_INIT
    assert any(m.startswith("usage_meter.models.") for m in models)


@pytest.mark.parametrize("function", API_FUNCTIONS)
def test_init_lists_no_aws_services_data_but_dynamodbs(function):
    # botocore's default loader lists the data directory of every AWS service (over 400) before
    # it loads one model: about 25 ms of a cold start. The functions' clients skip it
    # (usage_meter.aws; test_aws_client.py shows the same count sees the survey).
    listed = cold_start(function)["listed"]
    assert listed, "the probe saw no listing at all"
    assert set(listed) == {"dynamodb"}  # its API versions, for the model and the endpoint rules


@pytest.mark.parametrize("function", API_FUNCTIONS)
def test_init_ends_with_the_collector_on_and_inits_objects_frozen(function):
    # The handler module pauses the garbage collector while it imports (about 20 ms of a cold
    # start otherwise). It must be on again when init ends, or a warm container would never
    # collect a cycle; what init made is frozen, out of every later collection.
    collector = cold_start(function)["gc"]
    assert collector["enabled"] is True
    assert collector["frozen"] > 50_000


def test_the_probe_sees_what_a_function_does_import():
    # The probe is sound: what the record function needs is there.
    modules = cold_start("RecordFunction")["modules"]
    for needed in ("usage_meter.logic.record", "usage_meter.store.dynamodb", "pydantic"):
        assert imported(modules, needed), needed


@pytest.mark.parametrize("function", API_FUNCTIONS)
def test_a_snapstart_snapshot_holds_every_model_built_and_a_restore_reseeds(function):
    # Given an init for a SnapStart snapshot, then the runtime's hooks: before it, after restore
    found = init(function, "snapshot", AWS_LAMBDA_INITIALIZATION_TYPE="snap-start")["models"]
    # Then the snapshot holds every model of the function built, and a restored environment
    # draws its own random numbers, not the snapshot's
    assert found.pop("rng reseeded") is True
    assert [m for m, built in found.items() if m.startswith("usage_meter.") and not built] == []


def test_without_snapstart_no_hook_is_registered():
    modules = cold_start("RecordFunction")["modules"]
    assert "snapshot_restore_py" not in modules


def test_a_server_key_is_checked_without_reading_the_portal_token_secret():
    # Given the authorizer's secrets as a function that must not be called for a server key
    from tests.unit.test_auth import NOW, Keys
    from usage_meter.logic.auth import create_api_key, identify, issue_portal_token

    keys = Keys()
    key, _ = create_api_key("app", {Scope.RECORD}, keys=keys, now=NOW)
    fetched: list[str] = []

    def token_secrets() -> list[bytes]:
        fetched.append("portal token secret")
        return [b"s"]

    # When a server key is identified, then a portal token
    assert identify(f"Bearer {key}", keys=keys, token_secrets=token_secrets, now=NOW).kind == "key"
    assert fetched == []  # no Secrets Manager call on a cold start for a server key
    token, _ = issue_portal_token("cus_A", 600, secret=b"s", now=NOW)
    assert identify(f"Bearer {token}", keys=keys, token_secrets=token_secrets, now=NOW).customer
    # Then only the portal token needed the secret
    assert fetched == ["portal token secret"]


def test_a_read_pages_its_queries_without_loading_a_paginator_model(moto_table, monkeypatch):
    # botocore's paginator lists every service's data directory the first time it is used: about
    # 10 ms of a read's first request after a cold start. The store pages by hand instead.
    from usage_meter.store.dynamodb import DynamoStore

    store = DynamoStore(moto_table.name, client=moto_table.client)
    for period in ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"):
        moto_table.client.put_item(
            TableName=moto_table.name,
            Item={
                "pk": {"S": "USAGE#cus_A"},
                "sk": {"S": f"PERIOD#{period}#METER#m#0"},
                "customer": {"S": "cus_A"},
                "meter": {"S": "m"},
                "period_start": {"S": period},
                "period_end": {"N": "1"},
                "shard": {"N": "0"},
                "quantity": {"N": "2"},
                "reported": {"N": "1"},
            },
        )

    def refuse(name: str) -> None:
        raise AssertionError(f"a paginator for {name}")

    monkeypatch.setattr(moto_table.client, "get_paginator", refuse)
    # Pages of one item, so the second counter is on a second page
    moto_table.client.meta.events.register(
        "provide-client-params.dynamodb.Query", lambda params, **_: params.update(Limit=1)
    )
    totals = store.period_totals("cus_A", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z~")
    assert [(t.meter, t.quantity, t.reported) for t in totals] == [("m", 4, 2)]


@pytest.mark.parametrize("table", [None, "usage"], ids=["init fails", "init succeeds"])
def test_loading_handlers_in_a_test_process_leaves_its_collector_as_it_was(monkeypatch, table):
    # devtools.invoke.load_handler imports a handler in the caller's process (the tests, the
    # local API), where freezing everything would keep every later cycle among those objects.
    import gc

    from devtools.invoke import load_handler
    from usage_meter.config import ConfigError

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("METERS", '{"ai_messages": {"included": 10}}')
    if table is None:
        monkeypatch.delenv("TABLE_NAME", raising=False)
        with pytest.raises(ConfigError):
            load_handler("record")
    else:
        monkeypatch.setenv("TABLE_NAME", table)
        assert load_handler("record").lambda_handler
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
