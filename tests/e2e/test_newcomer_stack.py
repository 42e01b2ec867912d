"""Issue 14's newcomer findings against a running local stack, as a new user meets them: `make
admin --local` with no AWS settings, `make smoke`, the README's example beside the sample event,
and function logs without tracebacks or warnings for refused requests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.local_lambda import readable_log_line
from devtools.local_stack import LocalStack, StackOptions
from tests.clock import wait_out_month_end
from tests.polling import wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"


class Logs:
    """Every line the functions print, as `make dev` shows them (devtools.dev.function_log)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.invocations: Tally[str] = Tally()  # by function: invocations whose output is in
        self._lock = threading.Lock()

    def __call__(self, function: str, line: str) -> None:
        text = readable_log_line(line)
        with self._lock:
            if text is not None:
                self.lines.append((function, text))
            # The emulator's last line for an invocation, after all the runtime printed for it
            if line.startswith("REPORT RequestId:"):
                self.invocations[function] += 1

    def invoked(self, *functions: str) -> int:
        """How many invocations of functions have all their output in."""
        with self._lock:
            return sum(self.invocations[f] for f in functions)

    def since(self, mark: int) -> str:
        with self._lock:
            return "\n".join(f"{f}: {line}" for f, line in self.lines[mark:])

    def __len__(self) -> int:
        with self._lock:
            return len(self.lines)

    def __bool__(self) -> bool:  # a sink, even while empty
        return True


@pytest.fixture(scope="module")
def logs() -> Logs:
    return Logs()


@pytest.fixture(scope="module")
def newcomer_stack(
    sam_host_build: Path, tmp_path_factory: pytest.TempPathFactory, logs: Logs
) -> Iterator[LocalStack]:
    """`make dev`'s stack, writing its state file as `make dev` does (elsewhere than
    .local/stack.json, so a developer's running `make dev` is left alone)."""
    options = StackOptions(
        build_dir=sam_host_build,
        api_port=0,
        table_name="usage-newcomer-local",
        run_schedules=False,
        state_file=tmp_path_factory.mktemp("newcomer") / "stack.json",
        function_log=logs,
        log=lambda line: None,
    )
    with LocalStack(options) as running:
        yield running


def newcomer_env(tmp: Path) -> dict[str, str]:
    """A shell with no AWS configuration at all, as on a fresh clone."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in ("TABLE_NAME", "MAKEFLAGS", "ARGS")
    }
    env["AWS_CONFIG_FILE"] = str(tmp / "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp / "no-aws-credentials")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def make(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env=newcomer_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_make_admin_local_creates_a_key_that_works_with_no_aws_settings(newcomer_stack, tmp_path):
    state = newcomer_stack.options.state_file
    assert state is not None and state.exists()
    # When a newcomer creates a key as the README says, with nothing set
    args = f"--local --stack-file {state} keys create --name 'my app' --scopes record,read"
    created = make(tmp_path, "admin", f"ARGS={args}")
    # Then the key is printed, once, as one JSON line
    assert created.returncode == 0, created.stderr
    [line] = created.stdout.splitlines()
    key = json.loads(line)
    assert key["key"].startswith("umk_") and key["scopes"] == ["read", "record"]
    assert "Traceback" not in created.stderr
    # and it works against the stack's API
    api, auth = newcomer_stack.api_url, {"Authorization": f"Bearer {key['key']}"}
    body = {"stripe_customer_id": "cus_Newcomer1", "meter": "ai_messages", "quantity": 2}
    assert requests.post(f"{api}/v1/events", json=body, headers=auth, timeout=30).status_code == 202
    usage = requests.get(f"{api}/v1/customers/cus_Newcomer1/usage", headers=auth, timeout=30)
    assert usage.status_code == 200
    # and `status` reads the same stack, as a readable summary
    status = make(tmp_path, "admin", f"ARGS=--local --stack-file {state} status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"counters waiting for Stripe\s+[1-9]", status.stdout), status.stdout
    assert "verdict: OK" in status.stdout


def test_make_admin_local_without_a_running_stack_says_so_in_one_line(tmp_path):
    missing = tmp_path / "stack.json"
    done = make(tmp_path, "admin", f"ARGS=--local --stack-file {missing} keys list")
    assert done.returncode == 2
    # make's own last word ("make: ***", or "make[1]: ***" when run from another make) aside
    said = [
        line for line in done.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)
    ]
    assert said == [
        f"error: no local stack: {missing} does not exist; start one with `make dev` (in "
        "another terminal), then run this again"
    ]


def test_make_smoke_records_flushes_and_reads_on_the_local_stack(newcomer_stack, tmp_path):
    url, key = newcomer_stack.api_url, newcomer_stack.server_key
    wait_out_month_end(120)  # the smoke reads back, in the month, the unit it recorded
    done = make(tmp_path, "smoke", f"URL={url}", f"KEY={key}")
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert steps == [
        "read",
        "record",
        "replay",
        "read",
        "flush",
        "read",
        "reported",
        "token",
        "portal",
    ]
    assert done.stdout.splitlines()[-1] == f"smoke test passed: {url}"
    assert key not in done.stdout + done.stderr  # make never echoes the key


def test_make_smoke_fails_with_a_key_that_cannot_record(newcomer_stack, tmp_path):
    done = make(tmp_path, "smoke", f"URL={newcomer_stack.api_url}", "KEY=umk_not_a_key")
    assert done.returncode != 0
    assert "FAILED  read: GET /v1/customers/cus_UsageMeterSmoke/usage answered 401" in done.stdout


def test_the_readmes_example_then_the_sample_event_is_no_conflict(newcomer_stack):
    # Given the README's example event, recorded as the README shows (without its fixed date,
    # which a run of this test must not outlive)
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"\"\$API_URL/v1/events\".*?-d '(\{.*?\})'", readme, re.DOTALL)
    assert example is not None
    body = {k: v for k, v in json.loads(example.group(1)).items() if k != "timestamp"}
    auth = {"Authorization": f"Bearer {newcomer_stack.server_key}"}
    answer = requests.post(
        f"{newcomer_stack.api_url}/v1/events", json=body, headers=auth, timeout=30
    )
    assert answer.status_code == 202
    # When the newcomer then runs `make invoke EVENT=events/record-event.json`
    sample = json.loads((EVENTS / "record-event.json").read_text())
    result = newcomer_stack.invoke("RecordFunction", sample)
    # Then it is accepted, not a 409
    assert result["statusCode"] == 202, result


def test_refused_requests_log_no_traceback_and_no_warning(newcomer_stack, logs):
    api, key = newcomer_stack.api_url, newcomer_stack.server_key
    auth = {"Authorization": f"Bearer {key}"}
    event = {"stripe_customer_id": "cus_Newcomer2", "meter": "ai_messages", "quantity": 1}
    mark, invoked = len(logs), logs.invoked("RecordFunction", "ReadFunction")
    answers = [
        requests.post(
            f"{api}/v1/events", json=event, headers={"Authorization": "Bearer umk_x"}, timeout=30
        ),
        requests.get(
            f"{api}/v1/customers/cus_A/usage", headers={"Authorization": "Bearer upt_x"}, timeout=30
        ),
        requests.post(
            f"{api}/v1/events", json={**event, "idempotency_key": "n-1"}, headers=auth, timeout=30
        ),
        requests.post(
            f"{api}/v1/events",
            json={**event, "idempotency_key": "n-1", "quantity": 2},
            headers=auth,
            timeout=30,
        ),
        requests.post(f"{api}/v1/events", json=[1], headers=auth, timeout=30),
    ]
    assert [a.status_code for a in answers] == [401, 401, 202, 409, 422]
    assert "instance of" not in answers[4].text
    # The runtimes' output arrives beside the answers: until the five functions' last lines
    wait_until(lambda: logs.invoked("RecordFunction", "ReadFunction") >= invoked + 5)
    printed = logs.since(mark)
    assert 'unauthenticated  reason="malformed key"' in printed  # the logs were captured
    for noise in ("Traceback", "[ERROR]", "UserWarning", "No application metrics"):
        assert noise not in printed, printed
