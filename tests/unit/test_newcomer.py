"""Issue 14's newcomer findings, each guarded where a test can: what a new user meets when they
follow the README literally (the stack-level ones are in tests/e2e/test_newcomer_stack.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import demo, dev
from usage_meter import admin
from usage_meter.api import validate
from usage_meter.errors import ValidationFailed
from usage_meter.models.input import BatchIn, EventIn

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "TABLE_NAME",
)


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A machine with no AWS configuration at all, as on a fresh clone."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# -- 1. make admin: one clear line instead of botocore's tracebacks ----------------------------


def test_a_missing_region_is_one_line_that_says_what_to_set(no_aws, capsys):
    assert admin.main(["--table", "usage", "keys", "list"]) == 2
    line = one_line(capsys)
    assert line.startswith("error: no AWS region") and "AWS_DEFAULT_REGION" in line
    assert "--local" in line


def test_missing_credentials_are_one_line_that_says_what_to_set(no_aws, capsys):
    no_aws.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert admin.main(["--table", "usage", "status"]) == 2
    line = one_line(capsys)
    assert line.startswith("error: no AWS credentials") and "AWS_PROFILE" in line


def test_aws_region_is_honoured_although_botocore_reads_only_aws_default_region(no_aws):
    no_aws.setenv("AWS_REGION", "eu-central-1")
    no_aws.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    no_aws.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert admin.aws_session()[1] == "eu-central-1"


def test_no_table_is_one_line_that_mentions_local(no_aws, capsys):
    assert admin.main(["keys", "list"]) == 2
    assert "--local" in one_line(capsys)


def test_local_without_a_running_make_dev_is_one_line(no_aws, capsys, tmp_path):
    missing = tmp_path / "stack.json"
    assert admin.main(["--local", "--stack-file", str(missing), "keys", "list"]) == 2
    assert "start one with `make dev`" in one_line(capsys)
    # a state file left by a stack that died
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    state = {
        "pid": int(dead.stdout),
        "backends": {"dynamodb_url": "http://127.0.0.1:9", "table_name": "t"},
    }
    missing.write_text(json.dumps(state))
    assert admin.main(["--local", "--stack-file", str(missing), "keys", "list"]) == 2
    assert "is not running any more" in one_line(capsys)


def test_the_local_stack_file_default_is_the_one_make_dev_writes():
    from devtools.local_stack import REPO_ROOT, STATE_FILE

    assert STATE_FILE == REPO_ROOT / admin.LOCAL_STACK_FILE


# -- 4. the sample event and the README's examples ---------------------------------------------


def _readme_events() -> list[dict]:
    """Every event in a README curl example's JSON body."""
    events = []
    for body in re.findall(r"-d '(\{.*?\})'", README, flags=re.DOTALL):
        try:
            data = json.loads(body)
        except ValueError:
            continue
        events += data.get("events", [data]) if isinstance(data, dict) else []
    return [e for e in events if "stripe_customer_id" in e]


def _sample_events() -> list[dict]:
    events = []
    for path in sorted((ROOT / "events").glob("record-*.json")):
        data = json.loads(json.loads(path.read_text())["body"])
        events += data.get("events", [data])
    return events


def test_the_sample_events_never_reuse_a_readme_idempotency_key_with_another_body():
    # Following the README, then `make invoke EVENT=events/record-event.json`, must not be a 409
    def body(event: dict) -> tuple:
        return tuple(event.get(k) for k in ("meter", "quantity", "timestamp"))

    readme = {
        (e["stripe_customer_id"], e["idempotency_key"]): body(e)
        for e in _readme_events()
        if "idempotency_key" in e
    }
    assert ("cus_Q1w2E3r4", "msg_8f2c") in readme  # the examples were found
    for event in _sample_events():
        key = (event["stripe_customer_id"], event.get("idempotency_key"))
        assert readme.get(key, body(event)) == body(event), key


# -- 5. make dev: a taken port fails before the build -------------------------------------------


def test_make_dev_refuses_a_taken_port_before_building(monkeypatch, capsys):
    import socket

    def no_build(*args, **kwargs):
        raise AssertionError("sam build ran although the port is taken")

    monkeypatch.setattr(dev, "sam_build", no_build)
    monkeypatch.setattr(dev, "read_live_state", lambda path: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert dev.main(["--port", str(port), "--portal-port", "0"]) == 1
    out = capsys.readouterr().out
    assert f"port {port} is taken" in out and "--port" in out


def test_a_free_port_passes_the_early_check():
    import socket

    # A port held for the check, bound but not listening: no other process can take it
    # meanwhile, and the check, which binds as the API server does (SO_REUSEADDR), can.
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        assert dev.port_taken(held.getsockname()[1]) is None


# -- 6. small inconsistencies -------------------------------------------------------------------


def test_flush_every_0_means_the_same_in_help_and_readme(capsys):
    with pytest.raises(SystemExit):
        dev.parse_args(["--help"])
    assert "0: only on POST /_local/flush" in capsys.readouterr().out
    assert "(`0`: only on `POST /_local/flush`)" in README


def test_the_readme_counts_the_suites_parts_right():
    section = README.split("The suite has ", 1)[1]
    number, rest = section.split(" parts", 1)
    bullets = re.findall(r"^- \*\*", rest.split("\n\n", 1)[0], flags=re.MULTILINE)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert words.index(number) == len(bullets)


def test_the_readme_says_what_a_batch_of_duplicates_answers():
    assert "even when every event in it is a duplicate" in README


@pytest.mark.parametrize(("model", "data"), [(EventIn, [1]), (BatchIn, {"events": [5]})])
def test_validation_errors_name_no_python_class(model, data):
    with pytest.raises(ValidationFailed) as refused:
        validate(model, data)
    [detail] = refused.value.details
    assert detail["message"] == "Input should be a JSON object"
    assert "EventIn" not in json.dumps(refused.value.details)


def test_the_demo_prints_stripes_totals_as_json():
    totals = {("cus_A", "ai_messages"): 3, ("cus_A", "api_calls"): 2, ("cus_B", "ai_messages"): 1}
    assert json.loads(json.dumps(demo.received_totals(totals))) == {
        "cus_A": {"ai_messages": 3, "api_calls": 2},
        "cus_B": {"ai_messages": 1},
    }


def test_the_readme_says_what_the_api_examples_variables_are_locally():
    for variable in ("API_URL", "SERVER_KEY", "READ_KEY"):
        assert re.search(rf"^{variable}=", README, flags=re.MULTILINE), variable


# -- 2, 3 and 6: the Makefile ---------------------------------------------------------------------


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EVENT", "FN", "MAKEFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_make_invoke_without_an_event_says_how_to_name_one():
    done = _make("invoke")
    assert done.returncode == 2
    assert "usage: make invoke EVENT=events/<file>.json" in done.stderr
    assert "events/record-event.json" in done.stderr
    assert "cannot tell which function" not in done.stderr


def test_make_targets_print_no_java_or_chromium_version_once_installed():
    done = _make("admin", "ARGS=--help")
    assert done.returncode == 0, done.stderr
    assert "openjdk" not in done.stdout + done.stderr
    assert "Chromium" not in done.stdout + done.stderr
    assert done.stdout.startswith("usage: python -m usage_meter.admin")


def test_first_installs_say_what_they_install_and_show_progress():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -r" not in makefile  # no silent two minutes
    # Every pip install into a virtualenv shows its progress: .venv, checkov's and mutmut's
    installs = makefile.count("pip install --progress-bar off")
    assert installs == makefile.count("$(PIP_PROGRESS)") >= 2
    assert "(once" in makefile
