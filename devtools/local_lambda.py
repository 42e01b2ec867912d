"""Run a built function as a real Lambda runtime, without Docker.

AWS's Runtime Interface Emulator (the `aws-lambda-rie-*` binary SAM CLI ships) wraps
`python -m awslambdaric app.lambda_handler` and takes invocations over HTTP, exactly as
`sam local invoke` does inside its container. Here it runs in a process of its own, from
`sam build`'s output (`.aws-sam/build/<LogicalId>` plus its layers, which Lambda mounts at /opt):

    pool = FunctionPool(spec, build_dir=Path(".aws-sam/build"), environment={...})
    pool.start()
    pool.invoke({"version": "2.0", ...}).result
    pool.stop()

The emulator serves one invocation at a time (a second concurrent one crashes it), so a pool
holds `size` runtimes and a caller waits for a free one. Each runtime has its own process group,
is stopped by stop(), and on Linux dies with the thread that started it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from devtools.ports import BIND_ATTEMPTS, address_in_use, free_port, serves
from devtools.sam_app import FunctionSpec

if sys.platform == "linux":
    from devtools.dynamodb_local import _die_with

INVOKE_PATH = "/2015-03-31/functions/function/invocations"
REGION = "us-east-1"
# What a runtime sees locally besides the template's variables: AWS's own for a function, and
# no developer credentials or profiles leaking in from ~/.aws.
_ISOLATION = {
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "LANG": "C.UTF-8",
    "TZ": ":UTC",
    "PYTHONUNBUFFERED": "1",  # print() reaches the log as it happens, as in Lambda
}
_ERROR_KEYS = {"errorMessage", "errorType", "requestId", "stackTrace"}
_TIMED_OUT = "Task timed out after"
_STOP_GRACE_SECONDS = 3
# Powertools log fields that say nothing locally (they are the same on every line).
_QUIET_LOG_KEYS = {
    "level", "message", "timestamp", "service", "location", "cold_start", "function_name",
    "function_memory_size", "function_arn", "function_request_id", "xray_trace_id",
    "sampling_rate", "exception", "exception_name", "stack_trace",
}  # fmt: skip
_EMULATOR_BOOKKEEPING = ("START RequestId:", "END RequestId:", "REPORT RequestId:")

LogSink = Callable[[str, str], None]  # (function logical id, raw output line)


class InvocationError(RuntimeError):
    """An invocation produced no result."""


class FunctionError(InvocationError):
    """The handler raised; payload is Lambda's error object (errorType, errorMessage, ...)."""

    def __init__(self, function: str, payload: dict[str, Any]) -> None:
        super().__init__(f"{function} failed: {payload['errorType']}: {payload['errorMessage']}")
        self.payload = payload


class FunctionTimeout(InvocationError):
    """The handler ran past the function's Timeout."""


class RuntimeUnavailable(InvocationError):
    """The runtime process is gone or did not answer."""


class _PortTaken(RuntimeUnavailable):
    """Another process bound one of the emulator's ports before it did."""


@dataclass(frozen=True)
class Invocation:
    result: Any  # the handler's return value, as JSON
    duration_ms: float


def host_architecture(machine: str | None = None) -> str:
    """Lambda's name for this machine's instruction set: x86_64 or arm64."""
    machine = (machine or platform.machine()).lower()
    return "arm64" if machine in ("aarch64", "arm64") else "x86_64"


def rie_binary(architecture: str | None = None) -> Path:
    """The emulator inside the installed SAM CLI: samcli/local/rapid/aws-lambda-rie-<arch>."""
    spec = importlib.util.find_spec("samcli")  # found, not imported: SAM CLI is slow to import
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeUnavailable("SAM CLI is not installed; run `make setup`")
    package = Path(next(iter(spec.submodule_search_locations)))
    binary = package / "local" / "rapid" / f"aws-lambda-rie-{architecture or host_architecture()}"
    if not binary.is_file():
        raise RuntimeUnavailable(f"no Runtime Interface Emulator at {binary}")
    return binary


def code_paths(spec: FunctionSpec, build_dir: Path) -> tuple[Path, list[Path]]:
    """The function's built code and the import paths of its layers, as Lambda mounts them:
    a Python layer's `python/` and `python/lib/pythonX.Y/site-packages` under /opt."""
    code = build_dir.resolve() / spec.logical_id  # absolute: the runtime runs in another cwd
    if not (code / f"{spec.handler.rpartition('.')[0]}.py").is_file():
        raise RuntimeUnavailable(f"{code} holds no built {spec.logical_id}; run `sam build`")
    layer_paths = []
    for layer in spec.layers:
        python = build_dir.resolve() / layer / "python"
        if not python.is_dir():
            raise RuntimeUnavailable(f"{python} does not exist; run `sam build`")
        site = python / "lib" / spec.runtime / "site-packages"
        layer_paths += [python, *([site] if site.is_dir() else [])]
    return code, layer_paths


def runtime_environment(
    spec: FunctionSpec, code: Path, layer_paths: list[Path], local: Mapping[str, str]
) -> dict[str, str]:
    """The runtime's whole environment: Lambda's reserved variables, the template's, then the
    local overrides (endpoints, credentials). Nothing else is inherited from this process."""
    path = [str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]
    return {
        **_ISOLATION,
        "PATH": ":".join(path),
        "LAMBDA_TASK_ROOT": str(code),
        "PYTHONPATH": ":".join(str(p) for p in [code, *layer_paths]),
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{spec.runtime}",
        "AWS_LAMBDA_FUNCTION_NAME": spec.logical_id,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(spec.timeout_seconds),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.logical_id}",
        "AWS_LAMBDA_LOG_STREAM_NAME": "local",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        **spec.environment,
        **local,
    }


def parse_invocation_response(function: str, body: bytes) -> Any:
    """The handler's result from the emulator's answer; raise for errors and timeouts.

    The emulator answers 200 in every case: an error is Lambda's error object, a timeout is the
    plain text "Task timed out after N seconds".
    """
    text = body.decode("utf-8", errors="replace")
    try:
        result = json.loads(text)
    except ValueError:
        if text.startswith(_TIMED_OUT):
            raise FunctionTimeout(f"{function}: {text}") from None
        raise RuntimeUnavailable(f"{function} answered with no JSON: {text[:200]}") from None
    if isinstance(result, dict) and {"errorType", "errorMessage"} <= set(result) <= _ERROR_KEYS:
        raise FunctionError(function, result)
    return result


class LambdaRuntime:
    """One execution environment: the emulator and the runtime it starts, one process group."""

    def __init__(
        self,
        spec: FunctionSpec,
        environment: Mapping[str, str],
        cwd: Path,
        log: LogSink,
    ) -> None:
        self.spec = spec
        self.environment = dict(environment)
        self.cwd = cwd
        self.log = log
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=20)  # for start errors

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self, port: int, runtime_api_port: int) -> list[str]:
        return [
            str(rie_binary()),
            "--log-level",
            "error",
            "--runtime-interface-emulator-address",
            f"127.0.0.1:{port}",
            # Every emulator needs its own Runtime API port; the default 9001 is shared.
            "--runtime-api-address",
            f"127.0.0.1:{runtime_api_port}",
            sys.executable,
            "-m",
            "awslambdaric",
            self.spec.handler,
        ]

    def start(self, timeout: float = 10) -> None:
        if importlib.util.find_spec("awslambdaric") is None:
            raise RuntimeUnavailable(f"{sys.executable} has no awslambdaric; run `make setup`")
        # The emulator binds the ports we name, later: one another process took meanwhile is
        # picked again.
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                self._start(timeout)
                return
            except _PortTaken:
                self.stop()
                if attempt == BIND_ATTEMPTS:
                    raise

    def _start(self, timeout: float) -> None:
        self.port, runtime_api_port = free_port(), free_port()
        self._output.clear()
        preexec = functools.partial(_die_with, os.getpid()) if sys.platform == "linux" else None
        self._process = subprocess.Popen(
            self.command(self.port, runtime_api_port),
            env=self.environment,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own group: Ctrl-C reaches only us, and we stop it
            preexec_fn=preexec,
        )
        assert self._process.stdout is not None
        relay = threading.Thread(
            target=self._relay, args=(self._process.stdout,), daemon=True, name="lambda-log"
        )
        relay.start()
        self._wait_listening(timeout, {self.port, runtime_api_port}, relay)

    def _relay(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self._output.append(line)
            self.log(self.spec.logical_id, line)

    def _wait_listening(self, timeout: float, ports: set[int], relay: threading.Thread) -> None:
        """Until the emulator itself listens on both ports: an answer on them could come from
        another process that took one (where /proc can't tell, until the invoke port answers)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._process is None or self._process.poll() is not None:
                relay.join(timeout=1)  # its last words say why
                output = "\n".join(self._output)
                if address_in_use(output):
                    raise _PortTaken(f"the emulator for {self.spec.logical_id}: {output}")
                raise RuntimeUnavailable(f"the emulator for {self.spec.logical_id} exited")
            if serves(self._process.pid, ports, self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeUnavailable(
                    f"the emulator for {self.spec.logical_id} did not listen within {timeout} s"
                )
            time.sleep(0.02)

    def invoke(self, event: Any) -> Invocation:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeUnavailable(f"the runtime of {self.spec.logical_id} is not running")
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{INVOKE_PATH}",
            data=json.dumps(event).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        try:
            # The emulator enforces the function's Timeout; this only catches a hung emulator.
            with urllib.request.urlopen(request, timeout=self.spec.timeout_seconds + 10) as answer:
                body = answer.read()
        except urllib.error.HTTPError as error:
            # 502 when the runtime failed to start (import error): its body is the error object.
            body = error.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise RuntimeUnavailable(f"{self.spec.logical_id}: {error}") from error
        result = parse_invocation_response(self.spec.logical_id, body)
        return Invocation(result=result, duration_ms=(time.perf_counter() - started) * 1000)

    def stop(self) -> None:
        """SIGTERM to the group (the emulator kills its runtime and waits); SIGKILL if needed."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                # The emulator starts its runtime in a session of its own: kill that one by pid.
                runtimes = child_pids(process.pid)
                _signal_group(process.pid, signal.SIGKILL)
                for pid in runtimes:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                process.wait()


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (Linux /proc; empty elsewhere)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Field 4 is the parent pid; split after the ")" that ends the command name.
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                children.append(int(stat.parent.name))
    return children


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class FunctionPool:
    """`size` runtimes of one function, each serving one invocation at a time."""

    def __init__(
        self,
        spec: FunctionSpec,
        *,
        build_dir: Path,
        environment: Mapping[str, str],
        size: int = 1,
        log: LogSink | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one runtime")
        self.spec = spec
        code, layer_paths = code_paths(spec, build_dir)
        runtime_env = runtime_environment(spec, code, layer_paths, environment)
        sink = log or print_log_line
        self.runtimes = [LambdaRuntime(spec, runtime_env, code, sink) for _ in range(size)]
        self._idle: queue.Queue[LambdaRuntime] = queue.Queue()

    def start(self) -> None:
        """Start every runtime now, from this thread: see the module's note on PDEATHSIG."""
        try:
            for runtime in self.runtimes:
                runtime.start()
                self._idle.put(runtime)
        except BaseException:
            self.stop()
            raise

    def invoke(self, event: Any) -> Invocation:
        runtime = self._idle.get()
        try:
            return runtime.invoke(event)
        finally:
            self._idle.put(runtime)

    def stop(self) -> None:
        for runtime in self.runtimes:
            runtime.stop()


def readable_log_line(line: str) -> str | None:
    """A runtime's output line as a person wants to read it; None for emulator bookkeeping.

    Powertools JSON logs become `LEVEL message key=value`, with an exception's traceback below;
    metrics (CloudWatch EMF) become `metrics Name=value`.
    """
    if not line.strip() or line.startswith(_EMULATOR_BOOKKEEPING):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    if "_aws" in record:
        return _metrics_line(record)
    if "level" in record and "message" in record:
        return _log_record_line(record)
    return line


def _metrics_line(record: dict[str, Any]) -> str:
    metrics = [
        (metric["Name"], metric.get("Unit"))
        for directive in record["_aws"].get("CloudWatchMetrics", [])
        for metric in directive.get("Metrics", [])
    ]
    dimensions = [
        f"{name}={record[name]}"
        for directive in record["_aws"].get("CloudWatchMetrics", [])
        for names in directive.get("Dimensions", [])
        for name in names
        if name != "service" and name in record
    ]
    shown = " ".join(f"{name}={_number(record.get(name), unit)}" for name, unit in metrics)
    return "metrics " + (f"({' '.join(dimensions)}) " if dimensions else "") + shown


def _number(value: Any, unit: str | None = "Count") -> Any:
    """EMF holds a metric as a list of floats: [1.0] reads better as 1. Counts add up; several
    values of another unit (one latency per call) read as their range."""
    if isinstance(value, list) and len(value) > 1 and unit not in (None, "Count"):
        low, high = _number(min(value)), _number(max(value))
        return f"{low}..{high}({len(value)})"
    total = sum(value) if isinstance(value, list) else value
    return int(total) if isinstance(total, float) and total.is_integer() else total


def _log_record_line(record: dict[str, Any]) -> str:
    extras = " ".join(
        f"{key}={json.dumps(value, separators=(',', ':'), default=str)}"
        for key, value in record.items()
        if key not in _QUIET_LOG_KEYS
    )
    text = f"{record['level']:<7} {record['message']}" + (f"  {extras}" if extras else "")
    if record.get("exception"):
        text += "\n" + str(record["exception"])
    return text


_print_lock = threading.Lock()


def print_log_line(function: str, line: str) -> None:
    """The default sink: readable lines on stderr, each prefixed with its function."""
    text = readable_log_line(line)
    if text is None:
        return
    prefix = f"  {function:<16}"
    with _print_lock:
        for part in text.splitlines():
            print(f"{prefix}{part}", file=sys.stderr, flush=True)
