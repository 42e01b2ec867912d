"""A loopback fake of Stripe's meter-event API that the real ``stripe`` SDK can talk to.

It serves ``POST /v1/billing/meter_events`` the way Stripe does where the service depends on it:
API-key check, parameter validation, identifier dedupe, Idempotency-Key replay, one concurrent
call per (customer, event_name), and it can inject faults (5xx, 429, delays, lost responses,
permanent rejections) so tests can prove exactly-once delivery.

Point a client at it with::

    stripe.StripeClient("sk_test_x", base_addresses={"api": fake.url, "meter_events": fake.url})

Run it by hand with ``python -m devtools.fake_stripe --port 12111``. ``GET /_fake/meter_events``
lists what it accepted and ``POST /_fake/reset`` forgets everything (neither is Stripe API).

Standard library only, so the local stack and the tests need nothing beyond Python.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import ipaddress
import json
import logging
import re
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from email.message import Message
from types import FrameType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from devtools.service import Service

log = logging.getLogger(__name__)

METER_EVENTS_PATH = "/v1/billing/meter_events"
FAULT_KINDS = (
    "server_error",
    "saved_server_error",
    "rate_limit",
    "delay",
    "lost_response",
    "reject",
)
MAX_IDENTIFIER_LENGTH = 100
MAX_VALUE_DIGITS = 15
MAX_PAST_SECONDS = 35 * 24 * 3600
MAX_FUTURE_SECONDS = 5 * 60
RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. You can learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)

_API_KEY = re.compile(r"(sk|rk)_(test|live)_\S+")
# Length caps keep int() away from absurd inputs (zero-padded values, garbage timestamps).
_WHOLE_NUMBER = re.compile(r"-?(\d{1,64})")
_UNSIGNED_INTEGER = re.compile(r"\d{1,12}")
# Options each fault accepts; `customer`/`event_name` restrict a fault to matching requests.
_FAULT_OPTIONS: dict[str, frozenset[str]] = {
    "server_error": frozenset({"message"}),
    # A 500 from inside the endpoint: Stripe saves it under the request's Idempotency-Key and
    # answers every retry with that key the same 500 for 24 hours.
    "saved_server_error": frozenset({"message"}),
    "rate_limit": frozenset({"message", "retry_after"}),
    "delay": frozenset({"seconds"}),
    "lost_response": frozenset(),
    "reject": frozenset({"message", "code"}),
}
_FILTER_OPTIONS = frozenset({"customer", "event_name"})


@dataclass(frozen=True)
class MeterEvent:
    """One accepted meter event."""

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    created: int


@dataclass(frozen=True, eq=False)  # identity equality: deque.remove() takes this very fault
class _Fault:
    kind: str
    options: dict[str, Any]

    def matches(self, customer: str, event_name: str) -> bool:
        return self.options.get("customer", customer) == customer and (
            self.options.get("event_name", event_name) == event_name
        )


@dataclass(frozen=True)
class _Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    # Stripe saves an idempotent result only once the endpoint started executing: not for
    # validation errors, 429s or 5xx.
    storable: bool = False
    # lost_response: close the socket instead of answering.
    drop: bool = False


@dataclass(frozen=True)
class _StoredResponse:
    params_hash: str
    response: _Response


def _error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    storable: bool = False,
) -> _Response:
    error: dict[str, Any] = {"type": type_, "message": message}
    if code is not None:
        error["code"] = code
    if param is not None:
        error["param"] = param
    return _Response(status, {"error": error}, dict(headers or {}), storable=storable)


def _request_id() -> str:
    return "req_" + secrets.token_hex(7)


def _mask_key(key: str) -> str:
    return key[:8] + "*" * max(len(key) - 12, 0) + key[-4:] if len(key) > 12 else "****"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FakeStripe(Service):
    """Threaded HTTP server on loopback that behaves like Stripe's meter-event endpoint."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        now: Callable[[], float] = time.time,
        sleep_while_serving: float = 0.0,
    ) -> None:
        if not _is_loopback(host):
            raise ValueError(f"FakeStripe binds loopback only, not {host!r}")
        self._host = host
        self._port = port
        self._now = now
        self._sleep_while_serving = sleep_while_serving
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Everything below is guarded by self._lock.
        self._events: dict[str, MeterEvent] = {}  # insertion order = acceptance order
        self._faults: deque[_Fault] = deque()
        self._rejected_customers: dict[str, str] = {}
        self._expired_api_keys: set[str] = set()
        self._idempotent: dict[str, _StoredResponse] = {}
        self._idempotency_in_flight: set[str] = set()
        self._in_flight: dict[tuple[str, str], int] = {}
        self._calls = 0
        self._max_concurrent_per_pair = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), self)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},  # how long stop() waits for the loop
            name="fake-stripe",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        # Keep-alive connections would otherwise hold handler threads (and the port) open.
        server.close_connections()
        server.server_close()
        thread.join()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeStripe is not started")
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- inspection and control --------------------------------------------------------------

    def accepted(self) -> list[MeterEvent]:
        with self._lock:
            return list(self._events.values())

    def totals(self) -> dict[tuple[str, str], int]:
        totals: dict[tuple[str, str], int] = {}
        for event in self.accepted():
            pair = (event.customer, event.event_name)
            totals[pair] = totals.get(pair, 0) + event.value
        return totals

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def max_concurrent_per_pair(self) -> int:
        with self._lock:
            return self._max_concurrent_per_pair

    def inject(self, fault: str, count: int = 1, **options: Any) -> None:
        """Queue `fault` for the next `count` meter-event requests (FIFO).

        Options: server_error(message), saved_server_error(message: a 500 saved under the
        request's Idempotency-Key, as Stripe v1 saves one once the endpoint began executing),
        rate_limit(message, retry_after), delay(seconds), reject(message, code); any fault also
        takes customer= and/or event_name= to hit only matching requests.
        """
        if fault not in _FAULT_OPTIONS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULT_KINDS}")
        if count < 1:
            raise ValueError("count must be at least 1")
        unknown = set(options) - _FAULT_OPTIONS[fault] - _FILTER_OPTIONS
        if unknown:
            raise ValueError(f"fault {fault!r} does not take {sorted(unknown)}")
        if fault == "delay" and not options.get("seconds", 0) > 0:
            raise ValueError("delay needs seconds > 0")
        with self._lock:
            self._faults.extend(_Fault(fault, dict(options)) for _ in range(count))

    def reject_customer(self, customer: str, message: str = "No such customer") -> None:
        with self._lock:
            self._rejected_customers[customer] = message

    def accept_customer(self, customer: str) -> None:
        """Undo reject_customer: the customer now exists."""
        with self._lock:
            self._rejected_customers.pop(customer, None)

    def expire_api_key(self, api_key: str) -> None:
        """Refuse `api_key` from now on (401), as Stripe does a rolled key once it expires."""
        with self._lock:
            self._expired_api_keys.add(api_key)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        with self._lock:
            self._events.clear()
            self._faults.clear()
            self._rejected_customers.clear()
            self._expired_api_keys.clear()
            self._idempotent.clear()
            self._calls = 0
            self._max_concurrent_per_pair = 0
            # In-flight bookkeeping stays: requests still running will release their entries.

    def snapshot(self) -> dict[str, Any]:
        """The admin listing served at GET /_fake/meter_events."""
        return {
            "data": [asdict(event) for event in self.accepted()],
            "totals": [
                {"customer": customer, "event_name": event_name, "value": value}
                for (customer, event_name), value in self.totals().items()
            ],
        }

    # -- POST /v1/billing/meter_events -------------------------------------------------------

    def _meter_event(
        self, authorization: str | None, idempotency_key: str | None, body: bytes
    ) -> _Response:
        request_id = _request_id()
        response = self._meter_event_response(authorization, idempotency_key, body, request_id)
        headers = {"Request-Id": request_id, **response.headers}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return replace(response, headers=headers)

    def _meter_event_response(
        self, authorization: str | None, idempotency_key: str | None, body: bytes, request_id: str
    ) -> _Response:
        with self._lock:
            self._calls += 1
        api_key = (authorization or "").removeprefix("Bearer ").strip()
        if not authorization:
            log.info("meter_event 401 no API key")
            return _error(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth.",
            )
        if not authorization.startswith("Bearer ") or not _API_KEY.fullmatch(api_key):
            log.info("meter_event 401 invalid API key %s", _mask_key(api_key))
            return _error(401, f"Invalid API Key provided: {_mask_key(api_key)}")
        with self._lock:
            expired = api_key in self._expired_api_keys
        if expired:
            log.info("meter_event 401 expired API key %s", _mask_key(api_key))
            return _error(
                401, f"Expired API Key provided: {_mask_key(api_key)}", code="api_key_expired"
            )

        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params = dict(pairs)
        customer = params.get("payload[stripe_customer_id]", "")
        event_name = params.get("event_name", "")
        fault = self._take_fault(customer, event_name)
        if fault is not None and fault.kind == "server_error":
            log.info("meter_event 500 injected server_error customer=%s", customer)
            message = fault.options.get("message", "An unknown error occurred")
            return _error(500, message, type_="api_error")
        if fault is not None and fault.kind == "rate_limit":
            log.info("meter_event 429 injected rate_limit customer=%s", customer)
            retry_after = fault.options.get("retry_after")
            headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            message = fault.options.get("message", RATE_LIMIT_MESSAGE)
            return _error(429, message, code="rate_limit", headers=headers)

        params_hash = hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()
        if idempotency_key:
            early = self._claim_idempotency_key(idempotency_key, params_hash)
            if early is not None:
                return early
        response: _Response | None = None
        try:
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.options["seconds"])  # provokes client read timeouts
            response = self._create(params, fault, livemode="_live_" in api_key)
            # Keep the Request-Id in the stored copy: replays name it as Original-Request.
            response = replace(response, headers={"Request-Id": request_id, **response.headers})
        finally:
            if idempotency_key:
                with self._lock:
                    self._idempotency_in_flight.discard(idempotency_key)
                    if response is not None and response.storable:
                        self._idempotent[idempotency_key] = _StoredResponse(params_hash, response)
        if fault is not None and fault.kind == "lost_response":
            log.info("meter_event dropping the response (injected lost_response)")
            return replace(response, drop=True)
        return response

    def _take_fault(self, customer: str, event_name: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(customer, event_name):
                    self._faults.remove(fault)
                    return fault
        return None

    def _claim_idempotency_key(self, key: str, params_hash: str) -> _Response | None:
        """Replay, refuse, or mark `key` in flight (returns None: go ahead and execute)."""
        with self._lock:
            stored = self._idempotent.get(key)
            if stored is None:
                if key in self._idempotency_in_flight:
                    # Stripe answers 409 here; the SDK retries 409 with the same key.
                    return _error(
                        409,
                        "There is currently another in-progress request using this "
                        f"Stripe-Idempotency-Key (that probably means you submitted twice, "
                        f"and the other request is still going through): {key}. "
                        "Please try again later.",
                        type_="idempotency_error",
                    )
                self._idempotency_in_flight.add(key)
                return None
        if stored.params_hash != params_hash:
            return _error(
                400,
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
                type_="idempotency_error",
            )
        log.info("meter_event %s replayed for Idempotency-Key %s", stored.response.status, key)
        original = stored.response
        headers = {
            **original.headers,
            "Idempotent-Replayed": "true",
            "Original-Request": original.headers.get("Request-Id", ""),
        }
        headers.pop("Request-Id", None)
        return replace(original, headers=headers)

    def _create(self, params: dict[str, str], fault: _Fault | None, *, livemode: bool) -> _Response:
        now = self._now()
        invalid = self._validate(params, now)
        if invalid is not None:
            log.info("meter_event 400 %s", invalid.body["error"]["message"])
            return invalid
        event_name = params["event_name"]
        customer = params["payload[stripe_customer_id]"]
        identifier = params.get("identifier") or str(uuid.uuid4())
        value = int(params["payload[value]"])
        timestamp = int(params["timestamp"]) if "timestamp" in params else int(now)
        if fault is not None and fault.kind == "saved_server_error":
            log.info("meter_event 500 injected saved_server_error identifier=%s", identifier)
            message = fault.options.get("message", "An unknown error occurred")
            return _error(500, message, type_="api_error", storable=True)
        if fault is not None and fault.kind == "reject":
            log.info("meter_event 400 injected reject identifier=%s", identifier)
            message = fault.options.get("message", "The request was rejected (injected fault).")
            return _error(400, message, code=fault.options.get("code"), storable=True)

        pair = (customer, event_name)
        with self._lock:
            overlapping = self._in_flight.get(pair, 0) + 1
            self._in_flight[pair] = overlapping
            self._max_concurrent_per_pair = max(self._max_concurrent_per_pair, overlapping)
        try:
            if overlapping > 1:
                # Stripe allows one concurrent call per customer per meter.
                log.info("meter_event 429 concurrent call for %s/%s", customer, event_name)
                return _error(429, RATE_LIMIT_MESSAGE, code="rate_limit")
            if self._sleep_while_serving:
                time.sleep(self._sleep_while_serving)  # hold the pair so overlaps are certain
            return self._record(
                MeterEvent(identifier, event_name, customer, value, timestamp, int(now)),
                raw_value=params["payload[value]"],
                livemode=livemode,
            )
        finally:
            with self._lock:
                self._in_flight[pair] -= 1
                if not self._in_flight[pair]:
                    del self._in_flight[pair]

    def _record(self, event: MeterEvent, *, raw_value: str, livemode: bool) -> _Response:
        with self._lock:
            rejection = self._rejected_customers.get(event.customer)
            duplicate = event.identifier in self._events
            if rejection is None and not duplicate:
                self._events[event.identifier] = event
        if rejection is not None:
            log.info("meter_event 400 rejected customer %s", event.customer)
            return _error(
                400,
                rejection,
                code="resource_missing",
                param="payload[stripe_customer_id]",
                storable=True,
            )
        if duplicate:
            log.info("meter_event 400 duplicate identifier=%s", event.identifier)
            return _error(
                400,
                f"An event already exists with identifier {event.identifier}.",
                param="identifier",
                headers={"Stripe-Should-Retry": "false"},
                storable=True,
            )
        log.info(
            "meter_event 200 %s customer=%s value=%s identifier=%s timestamp=%s",
            event.event_name,
            event.customer,
            event.value,
            event.identifier,
            event.timestamp,
        )
        body = {
            "object": "billing.meter_event",
            "created": event.created,
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": livemode,
            "payload": {"stripe_customer_id": event.customer, "value": raw_value},
            "timestamp": event.timestamp,
        }
        return _Response(200, body, storable=True)

    @staticmethod
    def _validate(params: dict[str, str], now: float) -> _Response | None:
        for name in params:
            known = name in ("event_name", "identifier", "timestamp") or name.startswith(
                ("payload[", "expand[")
            )
            if not known:
                return _error(
                    400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                )
        for required in ("event_name", "payload[stripe_customer_id]", "payload[value]"):
            if not params.get(required):
                return _error(
                    400,
                    f"Missing required param: {required}.",
                    code="parameter_missing",
                    param=required,
                )
        value = _WHOLE_NUMBER.fullmatch(params["payload[value]"])
        if value is None or len(value.group(1).lstrip("0")) > MAX_VALUE_DIGITS:
            return _error(
                400,
                f"Invalid value: payload[value] must be a whole number with at most "
                f"{MAX_VALUE_DIGITS} digits, got {params['payload[value]'][:32]!r}.",
                code="meter_event_invalid_value",
                param="payload[value]",
            )
        identifier = params.get("identifier")
        if identifier is not None and not 0 < len(identifier) <= MAX_IDENTIFIER_LENGTH:
            return _error(
                400,
                f"Invalid identifier: must be 1 to {MAX_IDENTIFIER_LENGTH} characters long.",
                code="parameter_invalid_string_length",
                param="identifier",
            )
        if "timestamp" in params:
            raw = params["timestamp"]
            if not _UNSIGNED_INTEGER.fullmatch(raw):
                return _error(
                    400,
                    f"Invalid integer: {raw}",
                    code="parameter_invalid_integer",
                    param="timestamp",
                )
            if int(raw) < now - MAX_PAST_SECONDS:
                return _error(
                    400,
                    "Timestamp must be within the past 35 calendar days.",
                    code="timestamp_too_far_in_past",
                    param="timestamp",
                )
            if int(raw) > now + MAX_FUTURE_SECONDS:
                return _error(
                    400,
                    "Timestamp must not be more than 5 minutes in the future.",
                    code="timestamp_in_future",
                    param="timestamp",
                )
        return None

    # -- routing -----------------------------------------------------------------------------

    def _route(self, method: str, target: str, headers: Message, body: bytes) -> _Response:
        path = urlsplit(target).path
        if method == "POST" and path == METER_EVENTS_PATH:
            return self._meter_event(
                headers.get("Authorization"), headers.get("Idempotency-Key"), body
            )
        if method == "GET" and path == "/_fake/meter_events":
            return _Response(200, self.snapshot())
        if method == "POST" and path == "/_fake/reset":
            self.reset()
            return _Response(200, {"reset": True})
        return _error(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a stuck "delay" request must not block shutdown

    def __init__(self, address: tuple[str, int], fake: FakeStripe) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, stop()) are expected here; keep test output clean.
        log.debug("fake Stripe connection error from %s", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the SDK's pooled connections expect
    timeout = 60  # idle keep-alive connections do not pin a thread forever
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid 40 ms stalls
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(_error(400, "Invalid Content-Length header."))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        try:
            response = self.server.fake._route(self.command, self.path, self.headers, body)
        except Exception:
            # A bug in the fake must not pass for an injected lost response.
            log.exception("fake Stripe failed on %s %s", self.command, self.path)
            response = _error(500, "The fake Stripe server crashed.", type_="api_error")
        self._send(response)

    def _send(self, response: _Response) -> None:
        if response.drop:
            self.close_connection = True  # the server closes the socket: no status line at all
            return
        payload = json.dumps(response.body).encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        headers = {"Request-Id": _request_id(), **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def version_string(self) -> str:
        return "FakeStripe"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake Stripe: " + format, *args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fake_stripe",
        description="Loopback stand-in for Stripe's meter-event API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=12111, help="0 picks a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger(__name__).setLevel(logging.INFO)

    stopping = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    fake = FakeStripe(args.host, args.port)
    try:
        fake.start()
    except OSError as error:
        print(f"fake Stripe cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    print(f"fake Stripe listening on {fake.url} (Ctrl-C to stop)", flush=True)
    try:
        while not stopping.wait(0.5):  # a timed wait keeps Ctrl-C responsive
            pass
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    print("fake Stripe stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
