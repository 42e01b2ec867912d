"""A local stand-in for API Gateway's HTTP API: each HTTP request becomes a payload-format-2.0
event for the function whose HttpApi route matches, and the function's answer becomes the HTTP
response. Unknown routes answer 404 {"message":"Not Found"}, as API Gateway does.

The mapping (api_event, http_response) is pure; LocalApiServer puts it on a loopback socket.
"""

from __future__ import annotations

import base64
import http.server
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from devtools.local_lambda import FunctionTimeout, InvocationError
from devtools.sam_app import Authorizer, RouteMatch, RouteTable
from devtools.service import ThreadedHttpService

ACCOUNT_ID = "123456789012"
API_ID = "local"
# Bodies API Gateway passes as text; anything else arrives base64-encoded.
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript")
_TEXT_SUFFIXES = ("+json", "+xml", "x-www-form-urlencoded")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str  # path and query, as sent: /v1/customers/cus_1/usage?x=1
    headers: list[tuple[str, str]]
    body: bytes = b""
    source_ip: str = "127.0.0.1"
    protocol: str = "HTTP/1.1"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def json_response(status: int, body: Any) -> HttpResponse:
    return HttpResponse(status, [("Content-Type", "application/json")], json.dumps(body).encode())


NOT_FOUND = json_response(404, {"message": "Not Found"})
BAD_REQUEST = json_response(400, {"message": "Bad Request"})
INTERNAL_ERROR = json_response(500, {"message": "Internal Server Error"})
UNAVAILABLE = json_response(503, {"message": "Service Unavailable"})
UNAUTHORIZED = json_response(401, {"message": "Unauthorized"})
FORBIDDEN = json_response(403, {"message": "Forbidden"})


def is_text(content_type: str | None) -> bool:
    mime = (content_type or "").split(";")[0].strip().lower()
    return mime.startswith(_TEXT_TYPES) or mime.endswith(_TEXT_SUFFIXES)


def _event_headers(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names; repeated headers joined with commas, as API Gateway does."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _query_parameters(query: str) -> dict[str, str]:
    parameters: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        parameters[name] = f"{parameters[name]},{value}" if name in parameters else value
    return parameters


def _body(raw: bytes, content_type: str | None) -> tuple[str | None, bool]:
    """(body, isBase64Encoded): text for textual types that decode as UTF-8, else base64."""
    if not raw:
        return None, False
    if is_text(content_type):
        try:
            return raw.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.b64encode(raw).decode("ascii"), True


def api_event(
    request: HttpRequest,
    match: RouteMatch,
    *,
    request_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The API Gateway HTTP API (payload format 2.0) event for request on match's route."""
    now = now or datetime.now(UTC)
    parts = urlsplit(request.target)
    headers = _event_headers(request.headers)
    cookies = headers.pop("cookie", None)  # 2.0 moves cookies out of the headers
    body, encoded = _body(request.body, headers.get("content-type"))
    host = headers.get("host", "localhost").rsplit(":", 1)[0]  # API Gateway's has no port
    http = {
        "method": request.method.upper(),
        "path": parts.path,
        "protocol": request.protocol,
        "sourceIp": request.source_ip,
        "userAgent": headers.get("user-agent", ""),
    }
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": match.route.route_key,
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": headers,
        "requestContext": {
            "accountId": ACCOUNT_ID,
            "apiId": API_ID,
            "domainName": host,
            "domainPrefix": host.split(".")[0],
            "http": http,
            "requestId": request_id or uuid.uuid4().hex,
            "routeKey": match.route.route_key,
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": encoded,
    }
    # API Gateway leaves out what is empty rather than sending {} or [].
    if cookies:
        event["cookies"] = [c.strip() for c in cookies.split(";")]
    if parts.query:
        event["queryStringParameters"] = _query_parameters(parts.query)
    if match.path_parameters:
        event["pathParameters"] = match.path_parameters
    if body is not None:
        event["body"] = body
    return event


def http_response(result: Any) -> HttpResponse:
    """The HTTP response for a function's result, per payload format 2.0.

    A dict with statusCode is used as given; any other result is the 200 JSON body, as API
    Gateway infers it.
    """
    if not (isinstance(result, dict) and "statusCode" in result):
        return json_response(200, result)
    headers = [(name, str(value)) for name, value in (result.get("headers") or {}).items()]
    headers += [("Set-Cookie", cookie) for cookie in result.get("cookies") or []]
    body = result.get("body") or ""
    if not isinstance(body, str):
        body = json.dumps(body)
    raw = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    return HttpResponse(int(result["statusCode"]), headers, raw)


Invoker = Callable[[str, dict[str, Any]], Any]  # (function logical id, event) → result
LocalRoute = Callable[[HttpRequest], HttpResponse]


def handle(
    request: HttpRequest,
    routes: RouteTable,
    invoke: Invoker,
    cache: AuthorizerCache | None = None,
) -> tuple[HttpResponse, str]:
    """Route request to its function; (response, function logical id or '-')."""
    match = routes.match(request.method, urlsplit(request.target).path)
    if match is None:
        return NOT_FOUND, "-"
    function = match.route.function
    event = api_event(request, match)
    if match.route.authorizer is not None:
        denied = _authorize(event, match.route.authorizer, invoke, cache or AuthorizerCache())
        if denied is not None:
            return denied, match.route.authorizer.function
    try:
        result = invoke(function, event)
    except FunctionTimeout:
        return UNAVAILABLE, function
    except InvocationError:
        # API Gateway hides the error from the caller; the function's log shows it.
        return INTERNAL_ERROR, function
    try:
        return http_response(result), function
    except (ValueError, TypeError):
        return INTERNAL_ERROR, function  # a malformed answer, as API Gateway treats it


class AuthorizerCache:
    """API Gateway's authorizer cache: one answer per authorizer and identity-source values,
    kept for the authorizer's ReauthorizeEvery seconds. Whatever else the decision depended on
    (the path, the route) is not part of the key, so a cached answer is reused for it too.
    Errors are not cached."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._answers: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> Any | None:
        with self._lock:
            cached = self._answers.get(key)
            if cached is None or cached[0] <= self._clock():
                self._answers.pop(key, None)
                return None
            return cached[1]

    def expire(self) -> None:
        """Forget every answer, as if ReauthorizeEvery had passed."""
        with self._lock:
            self._answers.clear()

    def put(self, key: tuple[str, ...], answer: Any, ttl_seconds: int) -> None:
        if ttl_seconds > 0:
            with self._lock:
                self._answers[key] = (self._clock() + ttl_seconds, answer)


def identity_sources(event: Mapping[str, Any], authorizer: Authorizer) -> list[str] | None:
    """The values of the authorizer's identity sources, in order; None when one is missing."""
    headers = event.get("headers") or {}
    context = event.get("requestContext") or {}
    values = [headers.get(h.lower()) for h in authorizer.identity_headers]
    values += [context.get(name) for name in authorizer.identity_context]
    if not all(isinstance(v, str) and v for v in values):
        return None
    return values  # type: ignore[return-value]


def authorizer_event(event: Mapping[str, Any], authorizer: Authorizer) -> dict[str, Any]:
    """The payload-2.0 REQUEST authorizer event API Gateway sends for a route's event."""
    return {
        "version": "2.0",
        "type": "REQUEST",
        "routeArn": f"arn:aws:execute-api:us-east-1:{ACCOUNT_ID}:{API_ID}/$default/"
        + event["routeKey"].replace(" ", ""),
        "identitySource": identity_sources(event, authorizer) or [],
        **{k: v for k, v in event.items() if k not in ("body", "isBase64Encoded", "version")},
    }


def _authorize(
    event: dict[str, Any], authorizer: Authorizer, invoke: Invoker, cache: AuthorizerCache
) -> HttpResponse | None:
    """Run the route's authorizer as an HTTP API does: a missing identity source is 401 without
    calling it; any error it raises is 500 (an HTTP API has no "Unauthorized" convention);
    isAuthorized false is 403; an answer is cached per identity-source values for
    ReauthorizeEvery seconds; the context reaches the function as requestContext.authorizer.lambda.
    """
    sources = identity_sources(event, authorizer)
    if sources is None:
        return UNAUTHORIZED
    key = (authorizer.name, *sources)
    answer = cache.get(key)
    if answer is None:
        try:
            answer = invoke(authorizer.function, authorizer_event(event, authorizer))
        except InvocationError:
            return INTERNAL_ERROR
        if not isinstance(answer, dict) or not isinstance(answer.get("isAuthorized"), bool):
            return INTERNAL_ERROR  # a malformed answer is a failed authorizer
        cache.put(key, answer, authorizer.ttl_seconds)
    if not answer["isAuthorized"]:
        return FORBIDDEN
    event["requestContext"]["authorizer"] = {"lambda": answer.get("context") or {}}
    return None


def request_line(request: HttpRequest, response: HttpResponse, function: str, ms: float) -> str:
    path = urlsplit(request.target).path
    return f"{request.method:<6} {path}  {response.status}  {ms:.0f} ms  ({function})"


class LocalApiServer(ThreadedHttpService):
    """The HTTP API on http://host:port; local_routes serve /_local/... paths (POST only)."""

    def __init__(
        self,
        routes: RouteTable,
        invoke: Invoker,
        *,
        host: str = "127.0.0.1",
        port: int = 3000,
        local_routes: Mapping[str, LocalRoute] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.routes = routes
        self.invoke = invoke
        self.local_routes = dict(local_routes or {})
        self.log = log or _print_line
        self.authorizer_cache = AuthorizerCache()
        self._server = _Server((host, port), self)

    def respond(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        path = urlsplit(request.target).path
        local = self.local_routes.get(path) if request.method == "POST" else None
        if local is not None:
            response, function = local(request), "local"
        else:
            response, function = handle(request, self.routes, self.invoke, self.authorizer_cache)
        self.log(request_line(request, response, function, (time.perf_counter() - started) * 1e3))
        return response


def _print_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: LocalApiServer) -> None:
        self.api = api
        super().__init__(address, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as API Gateway offers
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def __getattr__(self, name: str) -> Any:
        # Any other method (TRACE, QUERY, ...) reaches the route table too: an unrouted one is
        # a 404, as on API Gateway, not the standard library's 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except ValueError:  # a Content-Length or chunk size that is not a number
            self.close_connection = True
            self._send(BAD_REQUEST)
            return
        request = HttpRequest(
            method=self.command,
            target=self.path,
            headers=list(self.headers.items()),
            body=body,
            source_ip=self.client_address[0],
            protocol=self.request_version,
        )
        self._send(self.server.api.respond(request))

    def _send(self, response: HttpResponse) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline().strip():  # trailers up to the blank line
            pass
        return b"".join(chunks)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # LocalApiServer logs one line per request itself
