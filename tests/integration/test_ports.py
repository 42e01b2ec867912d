"""Servers that take their port on the command line (DynamoDB Local, the Lambda emulator) are
given a free port that another process may take before they bind it: they start again on
another, and never mistake the squatter for themselves."""

import http.server
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import dynamodb_local, local_lambda, ports
from devtools.dynamodb_local import DynamoDBLocal
from devtools.local_lambda import LambdaRuntime
from devtools.sam_app import FunctionSpec


class _LikeDynamoDB(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"TableNames": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def squatter() -> Iterator[int]:
    """Another process's server that answers ListTables, as a DynamoDB Local would; its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LikeDynamoDB)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def picks(first: int, monkeypatch: pytest.MonkeyPatch, module: object) -> list[int]:
    """Make module's free-port pick return `first` once (taken since), then real picks."""
    picked: list[int] = []
    queue = [first]

    def pick(host: str = "127.0.0.1") -> int:
        port = queue.pop() if queue else ports.free_port(host)
        picked.append(port)
        return port

    monkeypatch.setattr(module, "free_port", pick)
    return picked


def test_dynamodb_local_starts_again_when_its_port_is_taken_before_it_binds(squatter, monkeypatch):
    # Given a port that was free when picked and is taken by the time the engine binds it
    picked = picks(squatter, monkeypatch, dynamodb_local)
    monkeypatch.setattr(dynamodb_local, "_port_is_free", lambda port: True)
    engine = DynamoDBLocal()
    try:
        # When it starts
        engine.start()
        # Then it runs on another port, its own, not the squatter's that answered first
        assert picked[0] == squatter and engine.port != squatter
        assert engine._process is not None
        assert ports.listens(engine._process.pid, engine.port) is not False
        engine.client().create_table(
            TableName="mine",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        assert engine.client().list_tables()["TableNames"] == ["mine"]
    finally:
        engine.stop()


def test_a_lambda_emulator_starts_again_when_its_port_is_taken_before_it_binds(
    tmp_path: Path, monkeypatch
):
    # Given a function, and an emulator port that something else listens on by bind time
    (tmp_path / "app.py").write_text("def handler(event, context):\n    return {'echo': event}\n")
    spec = FunctionSpec("EchoFunction", "app.handler", "python3.13", 10, 128, ())
    environment = {"PATH": os.path.dirname(sys.executable), "PYTHONPATH": str(tmp_path)}
    runtime = LambdaRuntime(spec, environment, tmp_path, lambda function, line: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picked = picks(taken.getsockname()[1], monkeypatch, local_lambda)
        try:
            # When it starts
            runtime.start()
            # Then it serves on other ports, and invocations reach the function
            assert picked[0] == taken.getsockname()[1]
            assert runtime.port != picked[0] and len(picked) == 4  # two picks, twice
            assert runtime.invoke({"n": 1}).result == {"echo": {"n": 1}}
        finally:
            runtime.stop()


def test_a_benchmarked_cold_start_starts_again_when_its_port_is_taken_before_it_binds(
    tmp_path: Path, monkeypatch
):
    # Given the cold-start benchmark's emulator for a function, and a port it picked that
    # something else listens on by bind time
    from benchmarks import coldstart

    (tmp_path / "app.py").write_text("def handler(event, context):\n    return {'echo': event}\n")
    runnable = coldstart.Runnable(
        name="echo",
        handler="app.handler",
        code=tmp_path,
        environment={"PATH": os.path.dirname(sys.executable), "PYTHONPATH": str(tmp_path)},
        event={"n": 1},
        check=lambda answer: answer == {"echo": {"n": 1}},
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        squatted = taken.getsockname()[1]
        picked = picks(squatted, monkeypatch, coldstart)
        # When it measures a cold start
        sample = coldstart.cold_start(
            runnable, local_lambda.rie_binary(), tmp_path / "emulator.log", Path(sys.executable)
        )
    # Then it measured one on other ports, from the function's own answer
    assert picked[0] == squatted and squatted not in picked[1:]
    assert len(picked) == 4  # two picks, twice
    assert 0 < sample.init_ms <= sample.first_ms


def test_serves_asks_proc_first_and_probes_only_where_proc_cannot_tell(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # /proc knows this process listens on port, and on no other
        assert ports.serves(os.getpid(), {port}, port)
        assert not ports.serves(os.getpid(), {port, ports.free_port()}, port)
        # Where /proc can't tell, the probe port's answer decides
        monkeypatch.setattr(ports, "listening_ports", lambda pid: None)
        assert ports.serves(os.getpid(), {port}, port)
    assert not ports.serves(os.getpid(), {port}, port)
