"""Invoke functions in-process: HTTP API 2.0 events, a Lambda context, handlers loaded as at
cold start. Used by the demo and the tests."""

import base64
import gc
import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The authorizer's context for a server key with every scope.
SERVER_KEY: dict[str, Any] = {"kind": "key", "id": "0123456789ab", "scopes": "admin"}


def http_event(
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw_body: str | None = None,
    base64_encoded: bool = False,
    principal: dict[str, Any] | None = SERVER_KEY,
) -> dict[str, Any]:
    """The event a function gets behind API Gateway, after the authorizer let `principal` in
    (its context; None: no authorizer ran)."""
    text = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
    if text is not None and base64_encoded:
        text = base64.b64encode(text.encode()).decode()
    return {
        "version": "2.0",
        "routeKey": f"{method} {path}",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {
            "content-type": "application/json",
            **{k.lower(): v for k, v in (headers or {}).items()},
        },
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": "localhost",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "pytest",
            },
            "requestId": "req-1",
            "routeKey": f"{method} {path}",
            "stage": "$default",
            "time": "26/Nov/2026:08:00:00 +0000",
            "timeEpoch": 1795680000000,
            **({"authorizer": {"lambda": principal}} if principal is not None else {}),
        },
        "body": text,
        "isBase64Encoded": base64_encoded,
    }


def response_json(response: dict[str, Any]) -> Any:
    return json.loads(response["body"])


def load_handler(function: str) -> ModuleType:
    """Import functions/<function>/app.py anew, so it reads the current environment."""
    spec = importlib.util.spec_from_file_location(
        f"{function}_app", ROOT / "functions" / function / "app.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        # A handler pauses the collector for its init, then freezes what init made, as fits a
        # container (usage_meter.config.init_done). A test process loads many handlers, and
        # fails some inits on purpose: it keeps its usual collector.
        gc.unfreeze()
        gc.enable()
    return module


class LambdaContext:
    """The parts of Lambda's context object that the handlers and Powertools read."""

    function_name = "usage-meter-test"
    function_version = "$LATEST"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:usage-meter-test"
    aws_request_id = "00000000-0000-0000-0000-000000000000"

    def __init__(self, timeout_seconds: float = 300.0) -> None:
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))
