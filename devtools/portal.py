"""The demo portal `make dev` serves on http://127.0.0.1:3001: a customer's billing page on another
origin than the API, showing the <usage-meter> widget (web/usage-meter.js), and the small backend
that page gets its portal token from.

The backend holds a read-scope server key (the local stack mints one for it: StackOptions
portal_origin) and, on `POST /usage-token`, asks the API for a portal token for its one demo
customer, as your app's backend would for the signed-in customer. The browser then reads usage
from the API itself, cross-origin, so the API's CORS answer for PortalOrigins is exercised for real.

    with DemoPortal(port=0) as portal:          # binds first: a taken port fails fast
        ...start the stack with portal_origin=portal.origin...
        portal.attach(stack.api_url, stack.portal_key)
"""

from __future__ import annotations

import html
import http.server
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from devtools.service import ThreadedHttpService

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
DEFAULT_PORT = 3001
DEMO_CUSTOMER = "cus_PortalDemo"
TOKEN_PATH = "/usage-token"
TOKEN_TTL_SECONDS = 900
_FILES = {
    "/usage-meter.js": ("usage-meter.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}


class PortalError(RuntimeError):
    """The demo portal cannot start as asked."""


class DemoPortal(ThreadedHttpService):
    """The demo page, the widget's script and the token endpoint, on one loopback origin."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        customer: str = DEMO_CUSTOMER,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.customer = customer
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.api_url: str | None = None
        self._read_key: str | None = None
        self.tokens_issued = 0
        try:
            self._server = _Server((host, port), self)
        except OSError as error:
            raise PortalError(f"cannot serve the demo portal on {host}:{port}: {error}") from error

    @property
    def origin(self) -> str:
        """The page's browser origin, as it goes in PortalOrigins."""
        return self.url

    def attach(self, api_url: str, read_key: str) -> Self:
        """The API the page reads and the read key its backend mints portal tokens with."""
        self.api_url, self._read_key = api_url.rstrip("/"), read_key
        return self

    def start(self) -> Self:
        if self.api_url is None or self._read_key is None:
            raise PortalError("attach(api_url, read_key) before start()")
        return super().start()

    # -- what it serves ---------------------------------------------------------------------------

    def page(self) -> bytes:
        text = (WEB_DIR / "demo.html").read_text()
        for name, value in {
            "__API_URL__": self.api_url or "",
            "__CUSTOMER__": self.customer,
            "__ORIGIN__": self.origin,
        }.items():
            text = text.replace(name, html.escape(value))
        return text.encode()

    def security_headers(self) -> list[tuple[str, str]]:
        # A strict policy, as a real portal may have: the widget needs no inline script or style.
        policy = (
            f"default-src 'self'; connect-src 'self' {self.api_url}; script-src 'self'; "
            "style-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
        )
        return [("Content-Security-Policy", policy), ("X-Content-Type-Options", "nosniff")]

    def mint_token(self) -> tuple[int, dict[str, Any]]:
        """(status, body): a portal token for the demo customer, from the API."""
        request = urllib.request.Request(
            f"{self.api_url}/v1/portal-tokens",
            data=json.dumps(
                {"stripe_customer_id": self.customer, "ttl_seconds": TOKEN_TTL_SECONDS}
            ).encode(),
            headers={
                "Authorization": f"Bearer {self._read_key}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                issued = json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return 502, {"error": f"the API answered {error.code}: {error.read()[:300]!r}"}
        except (urllib.error.URLError, OSError, ValueError) as error:
            return 502, {"error": f"the API is unreachable: {error}"}
        self.tokens_issued += 1
        return 200, {"token": issued["token"], "expires_at": issued["expires_at"]}

    def respond(self, method: str, path: str, origin: str | None) -> tuple[int, str, bytes, bool]:
        """(status, content type, body, is it the page) for one request."""
        if method == "POST" and path == TOKEN_PATH:
            # Your backend would check the session cookie here; this one checks the caller is
            # its own page (a browser sends Origin on every POST).
            if origin is not None and origin != self.origin:
                return 403, "application/json", b'{"error": "not this portal\'s page"}', False
            status, body = self.mint_token()
            return status, "application/json", json.dumps(body).encode(), False
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed", False
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self.page(), True
        if path == "/favicon.ico":
            return 204, "image/x-icon", b"", False
        if path in _FILES:
            name, content_type = _FILES[path]
            return 200, content_type, (WEB_DIR / name).read_bytes(), False
        return 404, "text/plain", b"not found", False


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], portal: DemoPortal) -> None:
        self.portal = portal
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A browser that left the page hangs up mid-answer: nothing worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        started = time.perf_counter()
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(min(length, 65536))
        portal = self.server.portal
        path = urlsplit(self.path).path
        status, content_type, body, is_page = portal.respond(
            self.command, path, self.headers.get("Origin")
        )
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if is_page:
            for name, value in portal.security_headers():
                self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        ms = (time.perf_counter() - started) * 1000
        portal.log(f"portal {self.command:<6} {path}  {status}  {ms:.0f} ms")

    do_POST = do_HEAD = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request, above


# -- sample usage for the demo customer (make dev) ---------------------------------------------

SAMPLE_REPORTED = {"ai_messages": 640, "api_calls": 245}  # recorded, then flushed
SAMPLE_PENDING = {"ai_messages": 140, "api_calls": 75}  # recorded after the flush


def _call(method: str, url: str, key: str, body: Any = None, timeout: float = 60) -> Any:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read() or b"null")


def seed_demo_usage(api_url: str, server_key: str, customer: str = DEMO_CUSTOMER) -> bool:
    """Give the demo customer some usage this period, unless it has some: record, flush, record
    again, so the page shows reported and pending units. True when it recorded anything."""
    usage = _call("GET", f"{api_url}/v1/customers/{customer}/usage", server_key)
    meters = {m["meter"] for m in usage["meters"]}
    if any(m["quantity"] for m in usage["meters"]):
        return False
    period = usage["period"]["start"]
    for step, sample in (("reported", SAMPLE_REPORTED), ("pending", SAMPLE_PENDING)):
        events = [
            {
                "stripe_customer_id": customer,
                "meter": meter,
                "quantity": quantity,
                "idempotency_key": f"portal-demo-{period}-{step}-{meter}",
            }
            for meter, quantity in sample.items()
            if meter in meters
        ]
        if events:
            _call("POST", f"{api_url}/v1/events/batch", server_key, {"events": events})
        if step == "reported":
            _call("POST", f"{api_url}/_local/flush", server_key, timeout=330)
    return True
