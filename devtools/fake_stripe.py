"""A loopback fake of the parts of Stripe the usage meter talks to, for the real ``stripe`` SDK.

Meter events: ``POST /v1/billing/meter_events`` the way Stripe serves it where the service
depends on it: API-key check, parameter validation, identifier dedupe and Idempotency-Key
replay (each forgotten after 24 hours of the fake's clock, the least Stripe promises), one
concurrent call per (customer, event_name), and injected faults (5xx, 429, delays, lost
responses, permanent rejections) so tests can prove exactly-once delivery.

Billing periods: products, prices, meters, customers, test clocks and subscriptions (API
version 2025-03-31 and later: ``current_period_start``/``current_period_end`` live on each
subscription item), with Stripe's period arithmetic (months from the billing cycle anchor, the
day clamped to the month's end, the anchor's time of day kept to the second). A subscription
whose customer has a test clock lives on that clock's time; the others live on the fake's
clock (``clock=``, ``time.time`` by default) and renew when the fake next looks at them and
from a one-second background ticker. Every subscription change is an Event
(``customer.subscription.created|updated|deleted|paused|resumed``) delivered to the registered
webhook endpoints from a delivery thread, signed like Stripe (``Stripe-Signature``) and
retried with backoff; tests can hold, reorder and repeat deliveries and roll endpoint secrets.
``totals_by_period()`` says where Stripe would bill each accepted meter event.

Asynchronous validation (``async_validation=True``): like Stripe, the fake then answers 200 for
a meter event it can only reject later (no active meter for its event_name, an inactive one, a
customer that does not exist, a payload without the meter's keys), keeps it out of
``accepted()``, ``totals()`` and meter event summaries, lists it in ``rejected_async()``, and
``error_report_delay`` seconds later reports the failures as v2 events
(``v1.billing.meter.error_report_triggered`` per meter, ``v1.billing.meter.no_meter_found``)
whose samples name at most ``max_error_samples`` identifiers per error code. Thin event
notifications of those go to the event destinations (``POST /v2/core/event_destinations``)
signed like webhooks; ``GET /v2/core/events/{id}`` serves the full event.
``GET /v1/billing/meters/{id}/event_summaries`` aggregates the accepted events per customer
and window, each event only ``summary_delay`` seconds (fake clock) after it was accepted.

Point a client at it with::

    stripe.StripeClient("sk_test_x", base_addresses={"api": fake.url, "meter_events": fake.url})

Run it by hand with ``python -m devtools.fake_stripe --port 12111`` (add ``--webhook-url URL``
and optionally ``--webhook-secret whsec_...`` to register a webhook endpoint at start). Routes
under ``/_fake/`` are not Stripe API: ``GET /_fake/meter_events`` lists what it accepted
(and, under ``rejected_async``, what it rejected after the fact), ``GET /_fake/billing_periods``
where those events bill, ``GET /_fake/deliveries`` every webhook and event destination attempt,
``GET /_fake/error_reports`` the error report events so far, ``POST /_fake/error_reports/flush``
reports the pending failures now, ``POST /_fake/summary_offsets`` (JSON ``customer``,
``event_name``, ``delta``, optional ``timestamp``) skews meter event summaries,
``POST /_fake/subscriptions/{id}/renew`` ends a subscription's current period now and starts
the next one, and ``POST /_fake/reset`` forgets everything. ``--async-validation`` and
``--event-destination-url`` turn the asynchronous side on from the command line.

Standard library only, so the local stack and the tests need nothing beyond Python.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import copy
import datetime
import hashlib
import heapq
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import re
import secrets
import signal
import socket
import string
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from email.message import Message
from types import FrameType
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

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
# Stripe keeps a saved idempotent answer for 24 hours, and an identifier unique for "a rolling
# period of at least 24 hours": the fake keeps both for exactly that long (its clock), the
# least Stripe promises, so tests see the worst case.
IDEMPOTENCY_KEY_TTL = 24 * 3600
IDENTIFIER_WINDOW = 24 * 3600
RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. You can learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)

_API_KEY = re.compile(r"(sk|rk)_(test|live)_\S+")
# The account every key of this fake belongs to, as Stripe's permission errors name it.
ACCOUNT = "acct_1FakeStripeLocal"
# Path segments that are namespaces, not resources: /v1/billing/meters is a billing_meter.
_NAMESPACES = frozenset({"billing", "core", "test_helpers"})
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

# Asynchronous validation: the thin events it sends and the error codes in their reports.
ERROR_REPORT_EVENT = "v1.billing.meter.error_report_triggered"
NO_METER_EVENT = "v1.billing.meter.no_meter_found"
THIN_EVENT_TYPES = (ERROR_REPORT_EVENT, NO_METER_EVENT)
ASYNC_ERROR_CODES = (
    "no_meter",
    "archived_meter",
    "meter_event_no_customer_defined",
    "meter_event_invalid_value",
    "meter_event_customer_not_found",
)
DEFAULT_MAX_ERROR_SAMPLES = 3


@dataclass(frozen=True)
class MeterEvent:
    """One accepted meter event."""

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    created: int


@dataclass(frozen=True)
class RejectedMeterEvent:
    """A meter event answered 200, then rejected by asynchronous validation."""

    identifier: str
    code: str  # one of ASYNC_ERROR_CODES
    message: str
    customer: str
    event_name: str
    value: int
    timestamp: int
    created: int


@dataclass(frozen=True)
class _PendingError:
    """A rejection waiting for the next error report."""

    rejected: RejectedMeterEvent
    meter_id: str | None  # the meter the report is about; None: no_meter_found
    at: float  # the fake's clock when it failed


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
    saved_at: float  # the fake's clock


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
        # "every Error object links to this list in its doc_url attribute" (Stripe's error codes)
        error["code"] = code
        error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if param is not None:
        error["param"] = param
    return _Response(status, {"error": error}, dict(headers or {}), storable=storable)


def _request_id() -> str:
    return "req_" + secrets.token_hex(7)


def _permission(method: str, path: str) -> str:
    """The restricted-key permission a request needs, as Stripe's 403 names it: the resource
    (its collection, singular, under its namespace), `read` for GET and `write` otherwise."""
    parts = [part for part in path.split("/")[2:] if part]  # after /v1 or /v2
    collection = parts[:2] if parts[:1] and parts[0] in _NAMESPACES else parts[:1]
    resource = "_".join(collection).removesuffix("s")
    return f"{resource}_{'read' if method == 'GET' else 'write'}"


def _mask_key(key: str) -> str:
    return key[:8] + "*" * max(len(key) - 12, 0) + key[-4:] if len(key) > 12 else "****"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- billing periods, parameters, lists: pure helpers -------------------------------------------

API_VERSION = "2026-10-28.endive"  # what stripe-python 16.1.0 pins; Events carry it
INTERVALS = ("day", "week", "month", "year")
SUBSCRIPTION_EVENT_TYPES = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
)
TICK_SECONDS = 1.0
DEFAULT_LIST_LIMIT = 10
MAX_LIST_LIMIT = 100
TEST_CLOCK_LIFETIME = 7 * 24 * 3600
DEFAULT_V2_LIST_LIMIT = 20
WEBHOOK_USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"

_DAY = 24 * 3600
_MAX_INTERVAL_DAYS = {"day": 1095, "week": 156, "month": 36, "year": 3}  # three years at most
_ID_ALPHABET = string.ascii_letters + string.digits
_PARAM_NAME = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
_INTEGER = re.compile(r"-?\d{1,18}")
_DECIMAL = re.compile(r"\d{1,18}(\.\d{1,12})?")
_CURRENCY = re.compile(r"[a-z]{3}")
_EVENT_TYPE = re.compile(r"[a-z_]+(\.[a-z_]+)+")
_THIN_EVENT_TYPE = re.compile(r"v[12](\.[a-z_]+)+")
_GROUPING_SECONDS = {"hour": 3600, "day": _DAY}
_SUBSCRIPTION_STATUSES = (
    "active",
    "all",
    "canceled",
    "ended",
    "incomplete",
    "incomplete_expired",
    "past_due",
    "paused",
    "trialing",
    "unpaid",
)
_PRORATION_BEHAVIORS = ("always_invoice", "create_prorations", "none")
_PAYMENT_BEHAVIORS = (
    "allow_incomplete",
    "default_incomplete",
    "error_if_incomplete",
    "pending_if_incomplete",
)


def next_period_end(anchor: int, interval: str, interval_count: int, after: int) -> int:
    """The first period end strictly after `after` on the schedule anchored at `anchor`.

    The schedule is anchor + k * interval_count intervals for k = 0, 1, 2, ..., so the result is
    never before the anchor: while `after` is before it, the anchor itself ends the first (short)
    period. Months and years count from the anchor with the day clamped to the month's end
    (anchor Jan 31 -> Feb 28/29 -> Mar 31 -> Apr 30) and the anchor's UTC time of day kept to
    the second; a day is 86,400 seconds and a week 604,800, as Stripe bills in UTC.
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, not {interval!r}")
    if interval_count < 1:
        raise ValueError(f"interval_count must be at least 1, not {interval_count}")
    if after < anchor:
        return anchor
    if interval in ("day", "week"):
        step = interval_count * (_DAY if interval == "day" else 7 * _DAY)
        return anchor + ((after - anchor) // step + 1) * step
    months = interval_count * (12 if interval == "year" else 1)
    start = datetime.datetime.fromtimestamp(anchor, datetime.UTC)
    target = datetime.datetime.fromtimestamp(after, datetime.UTC)
    elapsed = (target.year - start.year) * 12 + target.month - start.month
    # The (k-1)-th end falls in an earlier month than `after`, so counting starts at k.
    k = max(1, elapsed // months)
    while True:
        end = _add_months(start, k * months)
        if end > after:
            return end
        k += 1


def _add_months(start: datetime.datetime, months: int) -> int:
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def _signature(payload: bytes, secret: str, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def _new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def _rfc3339(seconds: float) -> str:
    """A v2 API timestamp: UTC, milliseconds, ``Z`` (``2024-09-26T17:46:22.134Z``)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _parse_rfc3339(value: str, param: str) -> float:
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise _invalid(f"Invalid timestamp: {value[:40]}", param=param) from None
    if moment.tzinfo is None:
        raise _invalid(f"Invalid timestamp: {value[:40]} has no time zone", param=param)
    return moment.timestamp()


class _ApiError(Exception):
    """Raised inside an API handler: the request is answered with this Stripe error."""

    def __init__(self, response: _Response) -> None:
        super().__init__(response.body["error"]["message"])
        self.response = response


def _invalid(
    message: str, *, param: str | None = None, code: str | None = None, status: int = 400
) -> _ApiError:
    return _ApiError(_error(status, message, code=code, param=param))


def _no_such(kind: str, object_id: str, *, param: str = "id", status: int = 404) -> _ApiError:
    """Stripe's resource_missing: 404 for the id in the URL, 400 for an id in a parameter."""
    return _invalid(
        f"No such {kind}: '{object_id}'", param=param, code="resource_missing", status=status
    )


def _missing(param: str) -> _ApiError:
    return _invalid(f"Missing required param: {param}.", param=param, code="parameter_missing")


def _required(params: dict[str, Any], key: str, param: str | None = None) -> Any:
    if key not in params:
        raise _missing(param or key)
    return params[key]


def _param_name(parts: Sequence[str]) -> str:
    return parts[0] + "".join(f"[{part}]" for part in parts[1:])


def _nest(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Form pairs (``items[0][price]=p``, ``expand[]=x``) as nested dicts of strings.

    Arrays stay dicts keyed "0", "1", ... (``[]`` appends) until _coerce() reads them.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _PARAM_NAME.fullmatch(key)
        if match is None:
            raise _invalid(f"Invalid parameter name: {key}", param=key)
        parts = [match.group(1), *_BRACKETED.findall(match.group(2))]
        node = root
        for index, part in enumerate(parts):
            name = part if part else str(len(node))
            parts[index] = name
            if index == len(parts) - 1:
                if isinstance(node.get(name), dict):
                    raise _invalid(
                        f"Invalid object: {_param_name(parts)}", param=_param_name(parts)
                    )
                node[name] = value  # a repeated scalar: the last one wins
                break
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                where = _param_name(parts[: index + 1])
                raise _invalid(f"Invalid object: {where}", param=where)
            node = child
    return root


# A parameter spec: "string" | "integer" | "boolean" | "metadata" | "strings" (an array of
# strings) | ("enum", values) | {key: spec} (an object) | [spec] (an array of objects).
_Spec = Any


def _coerce(value: Any, spec: _Spec, param: str) -> Any:
    """Check `value` (from _nest) against `spec` and convert it, failing like Stripe does."""
    if isinstance(spec, dict):
        if value == "" and param:
            return {}
        if not isinstance(value, dict):
            raise _invalid(f"Invalid object: {param}", param=param)
        result: dict[str, Any] = {}
        for key, item in value.items():
            name = f"{param}[{key}]" if param else key
            if key not in spec:
                raise _invalid(
                    f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
                )
            result[key] = _coerce(item, spec[key], name)
        return result
    if isinstance(spec, list):
        return [
            _coerce(item, spec[0], f"{param}[{index}]")
            for index, item in enumerate(_as_list(value, param))
        ]
    if spec == "metadata":
        return _metadata(value, param)
    if spec == "strings":
        items = _as_list(value, param)
        for index, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise _invalid(f"Invalid string: {param}[{index}]", param=f"{param}[{index}]")
        return items
    if not isinstance(value, str):
        raise _invalid(f"Invalid {param}: expected a string, not an object", param=param)
    if value == "":
        raise _invalid(
            f"You passed an empty string for '{param}'. We assume empty values are an attempt "
            f"to unset a parameter; however '{param}' cannot be unset. You should remove "
            f"'{param}' from your request or supply a non-empty value.",
            param=param,
            code="parameter_invalid_empty",
        )
    if spec == "string":
        return value
    if spec == "integer":
        if not _INTEGER.fullmatch(value):
            raise _invalid(
                f"Invalid integer: {value[:32]}", param=param, code="parameter_invalid_integer"
            )
        return int(value)
    if spec == "boolean":
        if value not in ("true", "false"):
            raise _invalid(f"Invalid boolean: {value[:32]}", param=param)
        return value == "true"
    kind, choices = spec
    assert kind == "enum"
    if value not in choices:
        raise _invalid(f"Invalid {param}: must be one of {', '.join(choices)}", param=param)
    return value


def _as_list(value: Any, param: str) -> list[Any]:
    if value == "":
        return []
    if not isinstance(value, dict) or not all(key.isdigit() for key in value):
        raise _invalid(f"Invalid array: {param}", param=param)
    return [value[key] for key in sorted(value, key=int)]


def _coerce_json(value: Any, spec: _Spec, param: str) -> Any:
    """Check a v2 JSON body (typed values, dotted names) against `spec`, as _coerce does forms.

    A null is as good as leaving the key out.
    """
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _invalid(f"Invalid object: {param}", param=param)
        result: dict[str, Any] = {}
        for key, item in value.items():
            name = f"{param}.{key}" if param else key
            if key not in spec:
                raise _invalid(
                    f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
                )
            if item is not None:
                result[key] = _coerce_json(item, spec[key], name)
        return result
    if spec == "strings":
        if not isinstance(value, list) or not all(isinstance(i, str) and i for i in value):
            raise _invalid(f"Invalid array of strings: {param}", param=param)
        return list(value)
    if spec == "metadata":
        if not isinstance(value, dict):
            raise _invalid(f"Invalid object: {param}", param=param)
        return _metadata(value, param)
    if spec == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(
                f"Invalid integer: {param}", param=param, code="parameter_invalid_integer"
            )
        return value
    if spec == "boolean":
        if not isinstance(value, bool):
            raise _invalid(f"Invalid boolean: {param}", param=param)
        return value
    if not isinstance(value, str):
        raise _invalid(f"Invalid string: {param}", param=param)
    if spec == "string":
        return value
    kind, choices = spec
    assert kind == "enum"
    if value not in choices:
        raise _invalid(f"Invalid {param}: must be one of {', '.join(choices)}", param=param)
    return value


def _metadata(value: Any, param: str) -> dict[str, str] | None:
    """Metadata to merge: "" values delete a key; None (``metadata=""``) clears them all."""
    if value == "":
        return None
    if not isinstance(value, dict):
        raise _invalid(f"Invalid object: {param}", param=param)
    if len(value) > 50:
        raise _invalid("Metadata can have at most 50 keys.", param=param)
    for key, item in value.items():
        if not isinstance(item, str):
            raise _invalid(f"Invalid string: {param}[{key}]", param=f"{param}[{key}]")
        if len(key) > 40 or len(item) > 500:
            raise _invalid(
                "Metadata keys can be at most 40 characters and values at most 500.",
                param=f"{param}[{key}]",
            )
    return dict(value)


def _apply_metadata(target: dict[str, str], changes: dict[str, str] | None) -> None:
    if changes is None:
        target.clear()
        return
    for key, value in changes.items():
        if value:
            target[key] = value
        else:
            target.pop(key, None)


def _newest_first(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stripe lists newest first; among equal `created`, the later-made object first."""
    return sorted(objects, key=lambda obj: obj["created"])[::-1]


def _page(
    objects: list[dict[str, Any]],
    params: dict[str, Any],
    url: str,
    kind: str,
    keep: Callable[[dict[str, Any]], bool] = lambda obj: True,
) -> dict[str, Any]:
    """One page of `objects` (newest first) as a Stripe list, honouring the cursor params."""
    limit = params.get("limit", DEFAULT_LIST_LIMIT)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise _invalid(f"Invalid limit: must be between 1 and {MAX_LIST_LIMIT}.", param="limit")
    after, before = params.get("starting_after"), params.get("ending_before")
    if after is not None and before is not None:
        raise _invalid(
            "You may only specify one of these parameters: ending_before, starting_after.",
            code="parameters_exclusive",
        )
    ids = [obj["id"] for obj in objects]
    cursor = after if after is not None else before
    if cursor is not None and cursor not in ids:
        param = "starting_after" if after is not None else "ending_before"
        raise _no_such(kind, cursor, param=param, status=400)
    if before is not None:
        candidates = [obj for obj in objects[: ids.index(before)] if keep(obj)]
        data, has_more = candidates[-limit:], len(candidates) > limit
    else:
        start = ids.index(after) + 1 if after is not None else 0
        candidates = [obj for obj in objects[start:] if keep(obj)]
        data, has_more = candidates[:limit], len(candidates) > limit
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def _v2_page(
    objects: list[dict[str, Any]],
    params: dict[str, Any],
    path: str,
    query: Sequence[tuple[str, str]],
) -> dict[str, Any]:
    """One page of `objects` (newest first) as a v2 list: data and next_page_url.

    The page token is opaque to clients; here it names the last object of the previous page,
    and next_page_url repeats the request's other query parameters.
    """
    limit = params.get("limit", DEFAULT_V2_LIST_LIMIT)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise _invalid(f"Invalid limit: must be between 1 and {MAX_LIST_LIMIT}.", param="limit")
    start = 0
    page = params.get("page")
    if page is not None:
        ids = [obj["id"] for obj in objects]
        if page not in ids:
            raise _invalid(f"Invalid page token: {page[:100]}", param="page")
        start = ids.index(page) + 1
    data = objects[start : start + limit]
    next_page_url = None
    if len(objects) > start + limit:
        kept = [(key, value) for key, value in query if key != "page"]
        next_page_url = f"{path}?{urlencode([*kept, ('page', data[-1]['id'])])}"
    return {"data": data, "next_page_url": next_page_url, "previous_page_url": None}


def _includes(values: list[str], allowed: Sequence[str]) -> list[str]:
    for index, value in enumerate(values):
        if value not in allowed:
            raise _invalid(
                f"Invalid include[{index}]: must be one of {', '.join(allowed)}",
                param=f"include[{index}]",
            )
    return values


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Stripe's previous_attributes: the old value of every top-level field that changed."""
    return {key: value for key, value in before.items() if after.get(key) != value}


def _cut(periods: list[list[int]], at: int) -> None:
    """End the last period at `at` if it runs past it (dropping it if it had not begun)."""
    if periods and periods[-1][1] > at:
        if periods[-1][0] < at:
            periods[-1][1] = at
        else:
            periods.pop()


def _subscribes(endpoint: _Endpoint, event_type: str) -> bool:
    enabled = endpoint.obj["enabled_events"]
    return endpoint.obj["status"] == "enabled" and ("*" in enabled or event_type in enabled)


def _target_url(obj: dict[str, Any]) -> str:
    """Where a webhook endpoint or an event destination receives its deliveries."""
    url: str = obj["url"] if obj["object"] == "webhook_endpoint" else obj["webhook_endpoint"]["url"]
    return url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Stripe does not follow redirects from a webhook endpoint: a 3xx is a failed attempt."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxies: deliveries go where the endpoint says (usually loopback), never via a proxy.
_WEBHOOK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


@dataclass
class _ItemState:
    """What a subscription item's object does not show: its periods and its meters over time."""

    subscription: str
    # [start, end] of every period the item has had; the last is the current (or final) one.
    periods: list[list[int]]
    # (since, event_name of the price's meter or None) each time the item's price changed.
    meters: list[tuple[int, str | None]]

    def event_name_at(self, timestamp: int) -> str | None:
        name = None
        for since, event_name in self.meters:
            if since > timestamp:
                break
            name = event_name
        return name


@dataclass
class _Endpoint:
    # the webhook_endpoint object without its secret, or the v2.core.event_destination object
    # (its webhook_endpoint.url unredacted, signing_secret None)
    obj: dict[str, Any]
    # (secret, the fake-clock time it stops signing or None), the newest first
    secrets: list[tuple[str, float | None]]


@dataclass(order=True)
class _Delivery:
    due: float  # time.monotonic()
    seq: int
    event_id: str = field(compare=False)
    endpoint_id: str = field(compare=False)
    attempt: int = field(compare=False, default=1)
    generation: int = field(compare=False, default=0)


@dataclass(frozen=True)
class _Request:
    params: dict[str, Any]
    request_id: str
    idempotency_key: str | None
    query: tuple[tuple[str, str], ...] = ()  # the raw query string pairs (v2 next_page_url)


_LIST_PARAMS: dict[str, _Spec] = {
    "limit": "integer",
    "starting_after": "string",
    "ending_before": "string",
    "expand": "strings",
}
_PRODUCT_PARAMS: dict[str, _Spec] = {
    "id": "string",
    "name": "string",
    "description": "string",
    "active": "boolean",
    "metadata": "metadata",
    "expand": "strings",
}
_PRICE_PARAMS: dict[str, _Spec] = {
    "currency": "string",
    "unit_amount": "integer",
    "unit_amount_decimal": "string",
    "product": "string",
    "product_data": {"name": "string", "metadata": "metadata"},
    "recurring": {
        "interval": ("enum", INTERVALS),
        "interval_count": "integer",
        "usage_type": ("enum", ("licensed", "metered")),
        "meter": "string",
    },
    "billing_scheme": ("enum", ("per_unit",)),
    "nickname": "string",
    "lookup_key": "string",
    "active": "boolean",
    "tax_behavior": ("enum", ("exclusive", "inclusive", "unspecified")),
    "metadata": "metadata",
    "expand": "strings",
}
_PRICE_LIST_PARAMS: dict[str, _Spec] = {
    **_LIST_PARAMS,
    "active": "boolean",
    "currency": "string",
    "product": "string",
    "type": ("enum", ("one_time", "recurring")),
    "recurring": {
        "interval": ("enum", INTERVALS),
        "meter": "string",
        "usage_type": ("enum", ("licensed", "metered")),
    },
}
_METER_PARAMS: dict[str, _Spec] = {
    "display_name": "string",
    "event_name": "string",
    "default_aggregation": {"formula": ("enum", ("count", "last", "sum"))},
    "customer_mapping": {"event_payload_key": "string", "type": ("enum", ("by_id",))},
    "value_settings": {"event_payload_key": "string"},
    "event_time_window": ("enum", ("day", "hour")),
    "expand": "strings",
}
_METER_LIST_PARAMS: dict[str, _Spec] = {
    **_LIST_PARAMS,
    "status": ("enum", ("active", "inactive")),
}
_CUSTOMER_PARAMS: dict[str, _Spec] = {
    "name": "string",
    "email": "string",
    "description": "string",
    "phone": "string",
    "metadata": "metadata",
    "test_clock": "string",
    "expand": "strings",
}
_TEST_CLOCK_PARAMS: dict[str, _Spec] = {
    "frozen_time": "integer",
    "name": "string",
    "expand": "strings",
}
_ADVANCE_PARAMS: dict[str, _Spec] = {"frozen_time": "integer", "expand": "strings"}
_SUBSCRIPTION_CREATE_PARAMS: dict[str, _Spec] = {
    "customer": "string",
    "items": [{"price": "string", "quantity": "integer", "metadata": "metadata"}],
    "billing_cycle_anchor": "integer",
    "backdate_start_date": "integer",
    "cancel_at_period_end": "boolean",
    "description": "string",
    "metadata": "metadata",
    "proration_behavior": ("enum", _PRORATION_BEHAVIORS),
    "payment_behavior": ("enum", _PAYMENT_BEHAVIORS),
    "expand": "strings",
}
_SUBSCRIPTION_UPDATE_PARAMS: dict[str, _Spec] = {
    "items": [{"id": "string", "price": "string", "quantity": "integer", "metadata": "metadata"}],
    "billing_cycle_anchor": ("enum", ("now", "unchanged")),
    "cancel_at_period_end": "boolean",
    "description": "string",
    "metadata": "metadata",
    "proration_behavior": ("enum", _PRORATION_BEHAVIORS),
    "payment_behavior": ("enum", _PAYMENT_BEHAVIORS),
    "expand": "strings",
}
_SUBSCRIPTION_LIST_PARAMS: dict[str, _Spec] = {
    **_LIST_PARAMS,
    "customer": "string",
    "price": "string",
    "status": ("enum", _SUBSCRIPTION_STATUSES),
    "test_clock": "string",
}
_SUBSCRIPTION_CANCEL_PARAMS: dict[str, _Spec] = {
    "invoice_now": "boolean",
    "prorate": "boolean",
    "cancellation_details": {
        "comment": "string",
        "feedback": (
            "enum",
            (
                "customer_service",
                "low_quality",
                "missing_features",
                "other",
                "switched_service",
                "too_complex",
                "too_expensive",
                "unused",
            ),
        ),
    },
    "expand": "strings",
}
_RESUME_PARAMS: dict[str, _Spec] = {
    "billing_cycle_anchor": ("enum", ("now", "unchanged")),
    "proration_behavior": ("enum", _PRORATION_BEHAVIORS),
    "proration_date": "integer",
    "expand": "strings",
}
_WEBHOOK_ENDPOINT_PARAMS: dict[str, _Spec] = {
    "url": "string",
    "enabled_events": "strings",
    "description": "string",
    "metadata": "metadata",
    "expand": "strings",
}
_EVENT_LIST_PARAMS: dict[str, _Spec] = {**_LIST_PARAMS, "type": "string", "types": "strings"}
_EVENT_SUMMARY_PARAMS: dict[str, _Spec] = {
    **_LIST_PARAMS,
    "customer": "string",
    "start_time": "integer",
    "end_time": "integer",
    "value_grouping_window": ("enum", tuple(_GROUPING_SECONDS)),
}
# v2: JSON bodies, checked by _coerce_json.
_DESTINATION_INCLUDES = ("webhook_endpoint.signing_secret", "webhook_endpoint.url")
_EVENT_DESTINATION_PARAMS: dict[str, _Spec] = {
    "name": "string",
    "description": "string",
    "type": ("enum", ("amazon_eventbridge", "azure_event_grid", "webhook_endpoint")),
    "event_payload": ("enum", ("snapshot", "thin")),
    "enabled_events": "strings",
    "events_from": "strings",
    "include": "strings",
    "metadata": "metadata",
    "snapshot_api_version": "string",
    "webhook_endpoint": {"url": "string"},
}
# v2 query strings, checked by _coerce.
_EVENT_DESTINATION_LIST_PARAMS: dict[str, _Spec] = {
    "include": "strings",
    "limit": "integer",
    "page": "string",
}
_EVENT_DESTINATION_GET_PARAMS: dict[str, _Spec] = {"include": "strings"}
_V2_EVENT_LIST_PARAMS: dict[str, _Spec] = {
    "limit": "integer",
    "page": "string",
    "object_id": "string",
    "types": "strings",
    "created": {"gt": "string", "gte": "string", "lt": "string", "lte": "string"},
}
_GET_PARAMS: dict[str, _Spec] = {"expand": "strings"}
_EXPANDABLE_PREFIXES = ("cus_", "clock_", "prod_", "price_", "sub_", "mtr_")


# (method, path pattern, FakeStripe method): the Stripe API routes besides meter events.
_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", r"/v1/products", "_api_create_product"),
    ("GET", r"/v1/products/([^/]+)", "_api_get_product"),
    ("POST", r"/v1/prices", "_api_create_price"),
    ("GET", r"/v1/prices", "_api_list_prices"),
    ("GET", r"/v1/prices/([^/]+)", "_api_get_price"),
    ("POST", r"/v1/billing/meters", "_api_create_meter"),
    ("GET", r"/v1/billing/meters", "_api_list_meters"),
    ("GET", r"/v1/billing/meters/([^/]+)", "_api_get_meter"),
    ("GET", r"/v1/billing/meters/([^/]+)/event_summaries", "_api_list_event_summaries"),
    ("POST", r"/v1/billing/meters/([^/]+)/deactivate", "_api_deactivate_meter"),
    ("POST", r"/v1/billing/meters/([^/]+)/reactivate", "_api_reactivate_meter"),
    ("POST", r"/v1/customers", "_api_create_customer"),
    ("GET", r"/v1/customers/([^/]+)", "_api_get_customer"),
    ("POST", r"/v1/test_helpers/test_clocks", "_api_create_test_clock"),
    ("GET", r"/v1/test_helpers/test_clocks/([^/]+)", "_api_get_test_clock"),
    ("POST", r"/v1/test_helpers/test_clocks/([^/]+)/advance", "_api_advance_test_clock"),
    ("POST", r"/v1/subscriptions", "_api_create_subscription"),
    ("GET", r"/v1/subscriptions", "_api_list_subscriptions"),
    ("GET", r"/v1/subscriptions/([^/]+)", "_api_get_subscription"),
    ("POST", r"/v1/subscriptions/([^/]+)", "_api_update_subscription"),
    ("DELETE", r"/v1/subscriptions/([^/]+)", "_api_cancel_subscription"),
    ("POST", r"/v1/subscriptions/([^/]+)/resume", "_api_resume_subscription"),
    ("POST", r"/v1/webhook_endpoints", "_api_create_webhook_endpoint"),
    ("GET", r"/v1/webhook_endpoints", "_api_list_webhook_endpoints"),
    ("GET", r"/v1/webhook_endpoints/([^/]+)", "_api_get_webhook_endpoint"),
    ("DELETE", r"/v1/webhook_endpoints/([^/]+)", "_api_delete_webhook_endpoint"),
    ("GET", r"/v1/events", "_api_list_events"),
    ("GET", r"/v1/events/([^/]+)", "_api_get_event"),
    ("POST", r"/v2/core/event_destinations", "_api_create_event_destination"),
    ("GET", r"/v2/core/event_destinations", "_api_list_event_destinations"),
    ("GET", r"/v2/core/event_destinations/([^/]+)", "_api_get_event_destination"),
    ("DELETE", r"/v2/core/event_destinations/([^/]+)", "_api_delete_event_destination"),
    ("POST", r"/v2/core/event_destinations/([^/]+)/disable", "_api_disable_event_destination"),
    ("POST", r"/v2/core/event_destinations/([^/]+)/enable", "_api_enable_event_destination"),
    ("GET", r"/v2/core/events", "_api_list_v2_events"),
    ("GET", r"/v2/core/events/([^/]+)", "_api_get_v2_event"),
)


class FakeStripe(Service):
    """Threaded HTTP server on loopback that behaves like the parts of Stripe we use."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.time,
        now: Callable[[], float] | None = None,
        sleep_while_serving: float = 0.0,
        webhook_retry_seconds: float = 1.0,
        webhook_max_attempts: int = 4,
        webhook_timeout: float = 5.0,
        tick_seconds: float = TICK_SECONDS,
        async_validation: bool = False,
        error_report_delay: float = 0.0,
        max_error_samples: int = DEFAULT_MAX_ERROR_SAMPLES,
        summary_delay: float = 0.0,
    ) -> None:
        """`clock` is Stripe's wall clock (`now` is its older name; pass one of them).

        A failed webhook delivery is retried after webhook_retry_seconds, then twice that, and
        so on, webhook_max_attempts attempts in all.

        async_validation (also an attribute, changeable at any time): answer 200 for meter
        events Stripe rejects only after the fact, and report them error_report_delay real
        seconds after the first one of a batch (from the delivery thread), with at most
        max_error_samples sample errors per error code. summary_delay: seconds of the fake's
        clock before an accepted event counts in meter event summaries.
        """
        if not _is_loopback(host):
            raise ValueError(f"FakeStripe binds loopback only, not {host!r}")
        if now is not None and clock is not time.time:
            raise TypeError("pass clock= or its older name now=, not both")
        if webhook_max_attempts < 1 or webhook_retry_seconds < 0 or tick_seconds <= 0:
            raise ValueError("webhook_max_attempts >= 1, webhook_retry_seconds >= 0, tick > 0")
        if error_report_delay < 0 or summary_delay < 0 or max_error_samples < 1:
            raise ValueError("error_report_delay >= 0, summary_delay >= 0, max_error_samples >= 1")
        self.async_validation = async_validation
        self._error_report_delay = error_report_delay
        self._max_error_samples = max_error_samples
        self._summary_delay = summary_delay
        self._host = host
        self._port = port
        self._now = now if now is not None else clock
        self._sleep_while_serving = sleep_while_serving
        self._webhook_retry_seconds = webhook_retry_seconds
        self._webhook_max_attempts = webhook_max_attempts
        self._webhook_timeout = webhook_timeout
        self._tick_seconds = tick_seconds
        self._lock = threading.Lock()
        # The delivery thread and wait_for_deliveries() sleep on this; it shares the one lock.
        self._wakeup = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._api_routes = [
            (method, re.compile(pattern), getattr(self, name)) for method, pattern, name in _ROUTES
        ]
        # Everything below is guarded by self._lock.
        self._stopping = False
        # (event, the fake's clock at acceptance), in acceptance order
        self._events: list[tuple[MeterEvent, float]] = []
        # identifier -> the fake's clock when an event took it (accepted or rejected later)
        self._identifiers: dict[str, float] = {}
        self._faults: deque[_Fault] = deque()
        self._rejected_customers: dict[str, str] = {}
        self._expired_api_keys: set[str] = set()
        self._restricted_api_keys: dict[str, frozenset[str]] = {}  # key -> permissions held
        self._idempotent: dict[str, _StoredResponse] = {}
        self._idempotency_in_flight: set[str] = set()
        self._in_flight: dict[tuple[str, str], int] = {}
        self._calls = 0
        self._max_concurrent_per_pair = 0
        # Billing objects, each dict in creation order and shaped as the API returns it.
        self._products: dict[str, dict[str, Any]] = {}
        self._prices: dict[str, dict[str, Any]] = {}
        self._meters: dict[str, dict[str, Any]] = {}
        self._customers: dict[str, dict[str, Any]] = {}
        self._test_clocks: dict[str, dict[str, Any]] = {}
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._item_states: dict[str, _ItemState] = {}
        # Events and webhooks.
        self._stripe_events: dict[str, dict[str, Any]] = {}
        self._event_payloads: dict[str, bytes] = {}  # the exact body every delivery sends
        self._endpoints: dict[str, _Endpoint] = {}
        self._queue: list[_Delivery] = []  # heap by (due, seq)
        self._delivery_seq = 0
        self._delivering = 0
        self._deliveries_held = False
        self._deliveries: list[dict[str, Any]] = []
        self._generation = 0  # bumped by reset(): attempts under way then are not recorded
        # Asynchronous validation, v2 events and event destinations.
        self._rejected_async: list[RejectedMeterEvent] = []
        self._pending_errors: list[_PendingError] = []
        self._errors_due: float | None = None  # time.monotonic() of the next error report
        self._error_reports: list[dict[str, Any]] = []
        self._v2_events: dict[str, dict[str, Any]] = {}
        self._destinations: dict[str, _Endpoint] = {}
        # (customer, event_name, timestamp, delta) from inject_summary_offset()
        self._summary_offsets: list[tuple[str, str, int, float]] = []

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
        with self._lock:
            self._stopping = False
        self._workers = [
            threading.Thread(
                target=self._deliver_forever, name="fake-stripe-webhooks", daemon=True
            ),
            threading.Thread(target=self._tick_forever, name="fake-stripe-ticker", daemon=True),
        ]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        server.shutdown()
        # Keep-alive connections would otherwise hold handler threads (and the port) open.
        server.close_connections()
        server.server_close()
        thread.join()
        for worker in self._workers:
            worker.join()  # an attempt under way ends within webhook_timeout
        self._workers = []

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
            return [event for event, _ in self._events]

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

    def restrict_api_key(self, api_key: str, permissions: Iterable[str]) -> None:
        """Make `api_key` a restricted key that holds only `permissions`, named as Stripe's 403s
        name them: `<resource>_<read|write>` (`billing_meter_event_write`, `subscription_read`),
        write implying read. Any other request with it gets Stripe's 403."""
        if not api_key.startswith("rk_"):
            raise ValueError(f"a restricted key starts with rk_, not {api_key[:3]}")
        held = set(permissions)
        held |= {p.removesuffix("_write") + "_read" for p in held if p.endswith("_write")}
        with self._lock:
            self._restricted_api_keys[api_key] = frozenset(held)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget everything but the clock and the options: events, faults, billing objects,
        webhooks, event destinations, error reports."""
        with self._lock:
            self._events.clear()
            self._identifiers.clear()
            self._faults.clear()
            self._rejected_customers.clear()
            self._expired_api_keys.clear()
            self._restricted_api_keys.clear()
            self._idempotent.clear()
            self._calls = 0
            self._max_concurrent_per_pair = 0
            # In-flight bookkeeping stays: requests still running will release their entries.
            self._products.clear()
            self._prices.clear()
            self._meters.clear()
            self._customers.clear()
            self._test_clocks.clear()
            self._subscriptions.clear()
            self._item_states.clear()
            self._stripe_events.clear()
            self._event_payloads.clear()
            self._endpoints.clear()
            self._queue.clear()
            self._deliveries.clear()
            self._deliveries_held = False
            self._rejected_async.clear()
            self._pending_errors.clear()
            self._errors_due = None
            self._error_reports.clear()
            self._v2_events.clear()
            self._destinations.clear()
            self._summary_offsets.clear()
            self._generation += 1
            self._wakeup.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """The admin listing served at GET /_fake/meter_events."""
        return {
            "data": [asdict(event) for event in self.accepted()],
            "totals": [
                {"customer": customer, "event_name": event_name, "value": value}
                for (customer, event_name), value in self.totals().items()
            ],
            "rejected_async": [asdict(event) for event in self.rejected_async()],
        }

    # -- asynchronous validation: test helpers -----------------------------------------------

    def rejected_async(self) -> list[RejectedMeterEvent]:
        """The meter events answered 200 and then rejected by asynchronous validation."""
        with self._lock:
            return list(self._rejected_async)

    @property
    def error_reports(self) -> list[dict[str, Any]]:
        """Every error report so far, oldest first: the v2 events as GET /v2/core/events/{id}
        returns them (v1.billing.meter.error_report_triggered and no_meter_found)."""
        with self._lock:
            return copy.deepcopy(self._error_reports)

    def flush_error_reports(self) -> list[dict[str, Any]]:
        """Report the pending asynchronous failures now instead of after error_report_delay.

        Returns the new reports (none when nothing was pending); their notifications are
        queued for the event destinations.
        """
        with self._lock:
            return copy.deepcopy(self._flush_errors_locked())

    def inject_summary_offset(
        self, customer: str, event_name: str, delta: float, *, timestamp: int | None = None
    ) -> None:
        """Make Stripe's meter event summaries disagree with the events it accepted.

        `delta` counts as if an event of that value had `timestamp` (the fake's clock now by
        default): every summary of the customer on a meter for `event_name` whose window
        contains that second shows it, whatever the meter's aggregation, right away.
        """
        with self._lock:
            at = int(self._now()) if timestamp is None else timestamp
            self._summary_offsets.append((customer, event_name, at, delta))

    def add_event_destination(
        self,
        url: str,
        enabled_events: Sequence[str] = THIN_EVENT_TYPES,
        secret: str | None = None,
        *,
        name: str = "usage-meter",
    ) -> dict[str, Any]:
        """Register a thin-event webhook destination like POST /v2/core/event_destinations.

        The result is the v2.core.event_destination with webhook_endpoint.url and
        webhook_endpoint.signing_secret filled in, and the secret under `secret` too.
        """
        if secret is not None and not (secret.startswith("whsec_") and len(secret) > 6):
            raise ValueError("a signing secret looks like whsec_...")
        with self._lock:
            try:
                destination = self._create_destination_locked(
                    name, url, list(enabled_events), secret
                )
            except _ApiError as error:
                raise ValueError(str(error)) from None
            signing_secret = destination.secrets[0][0]
            view = self._destination_view(destination, _DESTINATION_INCLUDES, signing_secret)
            return {**view, "secret": signing_secret}

    # -- billing objects: test helpers -------------------------------------------------------

    def add_customer(
        self,
        customer_id: str,
        test_clock: str | None = None,
        *,
        name: str | None = None,
        email: str | None = None,
    ) -> dict[str, Any]:
        """Create a customer with a fixed id (cus_...), optionally on a test clock."""
        if not customer_id.startswith("cus_"):
            raise ValueError(f"customer ids start with cus_, not {customer_id!r}")
        with self._lock:
            if customer_id in self._customers:
                raise ValueError(f"customer {customer_id} already exists")
            if test_clock is not None and test_clock not in self._test_clocks:
                raise ValueError(f"no such test clock {test_clock!r}")
            customer = self._new_customer_locked(customer_id, test_clock, name=name, email=email)
            return copy.deepcopy(customer)

    def add_meter(
        self,
        event_name: str,
        *,
        display_name: str | None = None,
        formula: str = "sum",
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
    ) -> dict[str, Any]:
        """Create an active billing meter for `event_name` (which no active meter may have)."""
        params = {
            "display_name": display_name or event_name,
            "event_name": event_name,
            "default_aggregation": {"formula": formula},
            "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
            "value_settings": {"event_payload_key": value_key},
        }
        with self._lock:
            try:
                meter = self._create_meter_locked(params)
            except _ApiError as error:
                raise ValueError(str(error)) from None
            return copy.deepcopy(meter)

    def subscription(self, subscription_id: str) -> dict[str, Any]:
        """The subscription as GET /v1/subscriptions/{id} returns it (KeyError if unknown)."""
        with self._lock:
            self._catch_up_wall_locked()
            return copy.deepcopy(self._subscriptions[subscription_id])

    def events(self, type: str | None = None) -> list[dict[str, Any]]:
        """Every Event so far (of `type` if given), oldest first."""
        with self._lock:
            self._catch_up_wall_locked()
            return [
                copy.deepcopy(event)
                for event in self._stripe_events.values()
                if type is None or event["type"] == type
            ]

    def pause_subscription(self, subscription_id: str) -> dict[str, Any]:
        """Pause an active subscription (as a trial ending without a payment method does).

        Its current period stops now: period_history() shows it cut, and usage while paused
        bills nowhere. Emits customer.subscription.paused.
        """
        with self._lock:
            self._catch_up_wall_locked()
            subscription = self._subscriptions[subscription_id]
            if subscription["status"] != "active":
                raise ValueError(f"{subscription_id} is {subscription['status']}, not active")
            now = self._subscription_now_locked(subscription)
            subscription["status"] = "paused"
            for item in subscription["items"]["data"]:
                _cut(self._item_states[item["id"]].periods, now)
            self._emit_locked("customer.subscription.paused", subscription, now, None)
            return copy.deepcopy(subscription)

    def renew_subscription(self, subscription_id: str) -> dict[str, Any]:
        """End the current period now and start the next, as if the anchor were now.

        What POST /_fake/subscriptions/{id}/renew does; emits customer.subscription.updated.
        """
        with self._lock:
            self._catch_up_wall_locked()
            subscription = self._subscriptions[subscription_id]
            if subscription["status"] != "active":
                raise ValueError(f"{subscription_id} is {subscription['status']}, not active")
            before = copy.deepcopy(subscription)
            now = self._subscription_now_locked(subscription)
            self._reset_anchor_locked(subscription, now)
            self._emit_locked(
                "customer.subscription.updated",
                subscription,
                now,
                None,
                previous=_diff(before, subscription),
            )
            return copy.deepcopy(subscription)

    def period_history(self, subscription_item_id: str) -> list[tuple[int, int]]:
        """Every (start, end) the item has had, in order, ended and cut periods included."""
        with self._lock:
            self._catch_up_wall_locked()
            return [(start, end) for start, end in self._item_states[subscription_item_id].periods]

    def totals_by_period(self) -> dict[tuple[str, str, int | None, int | None], int]:
        """Where Stripe bills the accepted meter events: sum of values per billing period.

        An event goes to (customer, event_name, period_start, period_end) of the customer's
        subscription item whose price's meter (at the event's time) has that event_name and
        one of whose periods contains the event's timestamp; to (customer, event_name, None,
        None) when there is none (Stripe would bill it nowhere).
        """
        totals: dict[tuple[str, str, int | None, int | None], int] = {}
        with self._lock:
            self._catch_up_wall_locked()
            for event, _ in self._events:
                key = self._billing_period_locked(event)
                totals[key] = totals.get(key, 0) + event.value
        return totals

    def _billing_period_locked(self, event: MeterEvent) -> tuple[str, str, int | None, int | None]:
        for subscription in self._subscriptions.values():
            if subscription["customer"] != event.customer:
                continue
            for item in subscription["items"]["data"]:
                state = self._item_states[item["id"]]
                if state.event_name_at(event.timestamp) != event.event_name:
                    continue
                for start, end in state.periods:
                    if start <= event.timestamp < end:
                        return (event.customer, event.event_name, start, end)
        return (event.customer, event.event_name, None, None)

    # -- webhooks: test helpers --------------------------------------------------------------

    def add_webhook_endpoint(
        self, url: str, enabled_events: Sequence[str] = ("*",), secret: str | None = None
    ) -> dict[str, Any]:
        """Register an endpoint like POST /v1/webhook_endpoints; the result carries `secret`."""
        if secret is not None and not (secret.startswith("whsec_") and len(secret) > 6):
            raise ValueError("a webhook secret looks like whsec_...")
        with self._lock:
            try:
                return self._create_webhook_endpoint_locked(url, list(enabled_events), secret)
            except _ApiError as error:
                raise ValueError(str(error)) from None

    def roll_webhook_secret(self, endpoint_id: str, overlap_seconds: float = 24 * 3600) -> str:
        """Give the endpoint (or event destination) a new secret, like the Dashboard's "Roll
        secret".

        The old secret keeps signing for `overlap_seconds` of the fake's clock (0: not at all),
        so deliveries meanwhile carry two v1 signatures, the new one first.
        """
        with self._lock:
            endpoint = self._target_locked(endpoint_id)
            if endpoint is None:
                raise KeyError(endpoint_id)
            now = self._now()
            new_secret = _new_id("whsec_", 32)
            older = [
                (secret, expires if expires is not None else now + overlap_seconds)
                for secret, expires in endpoint.secrets
            ]
            endpoint.secrets = [(new_secret, None)] + [
                (secret, expires) for secret, expires in older if expires > now
            ]
            return new_secret

    @property
    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery attempt so far: event_id, endpoint_id (a webhook endpoint's we_... or
        an event destination's ed_...), target ("webhook_endpoint" or "event_destination"),
        url, type, attempt, at (wall time), status (the HTTP status, or None) and error (why
        there was none)."""
        with self._lock:
            return [dict(delivery) for delivery in self._deliveries]

    def hold_deliveries(self) -> None:
        """Queue webhook deliveries without sending them until release_deliveries()."""
        with self._lock:
            self._deliveries_held = True

    def release_deliveries(self, reverse: bool = False) -> None:
        """Send the held deliveries, in the order they were queued or (reverse) backwards."""
        with self._lock:
            if reverse:
                pending = sorted(self._queue, reverse=True)
                now = time.monotonic()
                self._queue = []
                for delivery in pending:
                    self._delivery_seq += 1
                    delivery.due, delivery.seq = now, self._delivery_seq
                    self._queue.append(delivery)
                heapq.heapify(self._queue)
            self._deliveries_held = False
            self._wakeup.notify_all()

    def redeliver(self, event_id: str, endpoint_id: str | None = None) -> None:
        """Send an event again (to one endpoint or every subscribed one): a duplicate delivery.

        A v1 event goes to webhook endpoints, a v2 event's notification to event destinations.
        """
        with self._lock:
            if event_id in self._v2_events:
                event, pool = self._v2_events[event_id], self._destinations
            else:
                event, pool = self._stripe_events[event_id], self._endpoints
            if endpoint_id is not None:
                targets = [pool[endpoint_id]]
            else:
                targets = [e for e in pool.values() if _subscribes(e, event["type"])]
            for endpoint in targets:
                self._enqueue_locked(event_id, endpoint.obj["id"])

    def wait_for_deliveries(self, timeout: float = 5.0) -> bool:
        """Wait until no delivery is queued, retrying or under way and no error report is
        pending; False on timeout."""
        with self._lock:
            return self._wakeup.wait_for(
                lambda: not self._queue and not self._delivering and self._errors_due is None,
                timeout,
            )

    @staticmethod
    def sign(payload: bytes, secret: str, timestamp: int) -> str:
        """A Stripe-Signature header for `payload`, as stripe.Webhook.construct_event checks it."""
        return f"t={timestamp},v1={_signature(payload, secret, timestamp)}"

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
        denied = self._authenticate(authorization, "POST", "/v1/billing/meter_events")
        if denied is not None:
            return denied
        api_key = (authorization or "").removeprefix("Bearer ").strip()

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
                        self._idempotent[idempotency_key] = _StoredResponse(
                            params_hash, response, self._now()
                        )
        if fault is not None and fault.kind == "lost_response":
            log.info("meter_event dropping the response (injected lost_response)")
            return replace(response, drop=True)
        return response

    def _authenticate(self, authorization: str | None, method: str, path: str) -> _Response | None:
        """Stripe's 401s for a missing, malformed or expired secret key, and its 403 for a
        restricted key without the permission (None: let it in)."""
        what = f"{method} {path}"
        api_key = (authorization or "").removeprefix("Bearer ").strip()
        if not authorization:
            log.info("%s 401 no API key", what)
            return _error(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth.",
            )
        if not authorization.startswith("Bearer ") or not _API_KEY.fullmatch(api_key):
            log.info("%s 401 invalid API key %s", what, _mask_key(api_key))
            return _error(401, f"Invalid API Key provided: {_mask_key(api_key)}")
        with self._lock:
            expired = api_key in self._expired_api_keys
        if expired:
            log.info("%s 401 expired API key %s", what, _mask_key(api_key))
            return _error(
                401, f"Expired API Key provided: {_mask_key(api_key)}", code="api_key_expired"
            )
        with self._lock:
            held = self._restricted_api_keys.get(api_key)
        needed = _permission(method, path)
        if held is not None and needed not in held:
            log.info("%s 403 restricted key %s lacks %s", what, _mask_key(api_key), needed)
            # Stripe's words (stripe/stripe-node#2246): no code; the SDK raises PermissionError.
            return _error(
                403,
                f"The provided key '{_mask_key(api_key)}' does not have the required "
                f"permissions for this endpoint on account '{ACCOUNT}'. Having the "
                f"'rak_{needed}' permission would allow this request to continue.",
            )
        return None

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
            if stored is not None and self._now() - stored.saved_at >= IDEMPOTENCY_KEY_TTL:
                del self._idempotent[key]  # pruned: the key makes a new request
                stored = None
            if stored is None:
                if key in self._idempotency_in_flight:
                    # Stripe answers 409 idempotency_key_in_use here; the SDK retries 409 with
                    # the same key.
                    return _error(
                        409,
                        "There is currently another in-progress request using this "
                        "Idempotent Key (that probably means you submitted twice, "
                        f"and the other request is still going through): {key}. "
                        "Please try again later.",
                        type_="idempotency_error",
                        code="idempotency_key_in_use",
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
        log.info("%s replayed for Idempotency-Key %s", stored.response.status, key)
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
            payload = {
                name[len("payload[") : -1]: item
                for name, item in params.items()
                if name.startswith("payload[") and name.endswith("]")
            }
            return self._record(
                MeterEvent(identifier, event_name, customer, value, timestamp, int(now)),
                livemode=livemode,
                payload=payload,
            )
        finally:
            with self._lock:
                self._in_flight[pair] -= 1
                if not self._in_flight[pair]:
                    del self._in_flight[pair]

    def _record(self, event: MeterEvent, *, livemode: bool, payload: dict[str, str]) -> _Response:
        failure: _PendingError | None = None
        with self._lock:
            rejection = self._rejected_customers.get(event.customer)
            # An identifier stays taken when its event fails validation later: a replay of
            # the usage needs an identifier of its own. It is free again after the window.
            now = self._now()
            taken = self._identifiers.get(event.identifier)
            duplicate = taken is not None and now - taken < IDENTIFIER_WINDOW
            if rejection is None and not duplicate:
                self._identifiers[event.identifier] = now
                if self.async_validation:
                    event, failure = self._validate_async_locked(event, payload)
                if failure is None:
                    self._events.append((event, now))
                else:
                    self._rejected_async.append(failure.rejected)
                    self._pending_errors.append(failure)
                    if self._errors_due is None:
                        self._errors_due = time.monotonic() + self._error_report_delay
                    self._wakeup.notify_all()
        if failure is not None:
            log.info(
                "meter_event 200 %s identifier=%s, to be rejected asynchronously: %s",
                event.event_name,
                event.identifier,
                failure.rejected.code,
            )
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
        if failure is None:
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
            "payload": dict(payload),
            "timestamp": event.timestamp,
        }
        return _Response(200, body, storable=True)

    def _validate_async_locked(
        self, event: MeterEvent, payload: dict[str, str]
    ) -> tuple[MeterEvent, _PendingError | None]:
        """What Stripe finds after answering 200: the event as its meter reads it, or why not.

        Checked in the order the meter needs them: a meter for the event_name (an active one,
        else an inactive one means archived_meter), the meter's customer and value keys in the
        payload, then the customer.
        """
        meters = [m for m in self._meters.values() if m["event_name"] == event.event_name]
        active = [m for m in meters if m["status"] == "active"]
        code: str | None = None
        message = ""
        meter: dict[str, Any] | None = active[0] if active else None
        if meter is None and not meters:
            code = "no_meter"
            message = f"No active meter was found for event_name {event.event_name}."
        elif meter is None:
            meter = max(
                meters, key=lambda m: m["status_transitions"]["deactivated_at"] or m["created"]
            )
            code = "archived_meter"
            message = f"The meter {meter['id']} for event_name {event.event_name} is inactive."
        else:
            customer_key = meter["customer_mapping"]["event_payload_key"]
            value_key = meter["value_settings"]["event_payload_key"]
            value = _WHOLE_NUMBER.fullmatch(payload.get(value_key, ""))
            if customer_key not in payload or not payload[customer_key]:
                code = "meter_event_no_customer_defined"
                message = f"Customer mapping key {customer_key} not found in payload."
            elif value is None or len(value.group(1).lstrip("0")) > MAX_VALUE_DIGITS:
                code = "meter_event_invalid_value"
                message = f"Value key {value_key} not found in payload or not a whole number."
            else:
                event = replace(event, customer=payload[customer_key], value=int(value.group()))
                if event.customer not in self._customers:
                    code = "meter_event_customer_not_found"
                    message = f"No customer found with ID {event.customer}."
        if code is None:
            return event, None
        rejected = RejectedMeterEvent(
            event.identifier,
            code,
            message,
            event.customer,
            event.event_name,
            event.value,
            event.timestamp,
            event.created,
        )
        meter_id = meter["id"] if meter is not None else None
        return event, _PendingError(rejected, meter_id, self._now())

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

    # -- the billing API: dispatch -----------------------------------------------------------

    def _api_call(
        self,
        handler: Callable[..., dict[str, Any]],
        ids: list[str],
        method: str,
        path: str,
        query: str,
        headers: Message,
        body: bytes,
    ) -> _Response:
        request_id = _request_id()
        # Stripe ignores Idempotency-Key on GET and DELETE.
        idempotency_key = headers.get("Idempotency-Key") if method == "POST" else None
        what = f"{method} {path}"
        response = self._authenticate(headers.get("Authorization"), method, path)
        if response is None:
            response = self._api_idempotent(
                handler, ids, what, query, body, request_id, idempotency_key
            )
        out = {"Request-Id": request_id, **response.headers}
        if idempotency_key:
            out["Idempotency-Key"] = idempotency_key
        return replace(response, headers=out)

    def _api_idempotent(
        self,
        handler: Callable[..., dict[str, Any]],
        ids: list[str],
        what: str,
        query: str,
        body: bytes,
        request_id: str,
        idempotency_key: str | None,
    ) -> _Response:
        pairs = parse_qsl(query, keep_blank_values=True)
        # The v2 API takes a JSON body; v1 a form, read like the query string.
        json_body = body if what.split(" ", 1)[1].startswith("/v2/") else None
        if json_body is None:
            pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        signed = [what, sorted(pairs), body.decode("utf-8", "replace") if json_body else None]
        params_hash = hashlib.sha256(json.dumps(signed).encode()).hexdigest()
        if idempotency_key:
            early = self._claim_idempotency_key(idempotency_key, params_hash)
            if early is not None:
                return early
        response: _Response | None = None
        try:
            response = self._api_execute(
                handler, ids, pairs, request_id, idempotency_key, json_body
            )
            log.info("%s %s", what, response.status)
            response = replace(response, headers={"Request-Id": request_id, **response.headers})
        finally:
            if idempotency_key:
                with self._lock:
                    self._idempotency_in_flight.discard(idempotency_key)
                    if response is not None and response.storable:
                        self._idempotent[idempotency_key] = _StoredResponse(
                            params_hash, response, self._now()
                        )
        return response

    def _api_execute(
        self,
        handler: Callable[..., dict[str, Any]],
        ids: list[str],
        pairs: list[tuple[str, str]],
        request_id: str,
        idempotency_key: str | None,
        json_body: bytes | None = None,
    ) -> _Response:
        """Run a handler; json_body (None for v1) is a v2 request's body."""
        try:
            params = _nest(pairs)
            if json_body is not None and json_body.strip():
                try:
                    decoded = json.loads(json_body)
                except (ValueError, UnicodeDecodeError):
                    raise _invalid("The request body is not valid JSON.") from None
                if not isinstance(decoded, dict):
                    raise _invalid("The request body must be a JSON object.")
                params.update(decoded)
            request = _Request(params, request_id, idempotency_key, tuple(pairs))
            with self._lock:
                self._catch_up_wall_locked()  # the fake "looks at" wall-clock subscriptions
                body = copy.deepcopy(handler(request, *ids))
                if "expand" in params and json_body is None:
                    for path in _coerce(params["expand"], "strings", "expand"):
                        self._expand_locked(body, path.split("."), path)
        except _ApiError as error:
            log.info("  %s", error)
            return error.response
        return _Response(200, body, storable=True)

    def _expand_locked(self, obj: Any, path: list[str], full: str) -> None:
        if not path:
            return
        key, rest = path[0], path[1:]
        if not isinstance(obj, dict) or key not in obj:
            raise _invalid(f"This property cannot be expanded ({full}).", param="expand")
        value = obj[key]
        if isinstance(value, list) and key == "data":
            for element in value:
                self._expand_locked(element, rest, full)
            return
        if isinstance(value, str):
            found = self._find_locked(value)
            if found is None:
                raise _invalid(f"This property cannot be expanded ({full}).", param="expand")
            value = obj[key] = copy.deepcopy(found)
        if value is not None:
            self._expand_locked(value, rest, full)

    def _find_locked(self, object_id: str) -> dict[str, Any] | None:
        if not object_id.startswith(_EXPANDABLE_PREFIXES):
            return None
        for objects in (
            self._customers,
            self._test_clocks,
            self._products,
            self._prices,
            self._subscriptions,
            self._meters,
        ):
            if object_id in objects:
                return objects[object_id]
        return None

    # -- products and prices -----------------------------------------------------------------

    def _api_create_product(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _PRODUCT_PARAMS, "")
        name = _required(params, "name")
        product_id = params.get("id")
        if product_id is not None and product_id in self._products:
            raise _invalid("Product already exists.", param="id", code="resource_already_exists")
        return self._new_product_locked(
            name,
            product_id=product_id,
            description=params.get("description"),
            active=params.get("active", True),
            metadata=params.get("metadata"),
        )

    def _new_product_locked(
        self,
        name: str,
        *,
        product_id: str | None = None,
        description: str | None = None,
        active: bool = True,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        now = int(self._now())
        product: dict[str, Any] = {
            "id": product_id or _new_id("prod_", 14),
            "object": "product",
            "active": active,
            "created": now,
            "default_price": None,
            "description": description,
            "images": [],
            "livemode": False,
            "marketing_features": [],
            "metadata": {},
            "name": name,
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "type": "service",
            "unit_label": None,
            "updated": now,
            "url": None,
        }
        _apply_metadata(product["metadata"], metadata or {})
        self._products[product["id"]] = product
        return product

    def _api_get_product(self, request: _Request, product_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        if product_id not in self._products:
            raise _no_such("product", product_id)
        return self._products[product_id]

    def _api_create_price(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _PRICE_PARAMS, "")
        currency = _required(params, "currency").lower()
        if not _CURRENCY.fullmatch(currency):
            raise _invalid(f"Invalid currency: {currency}", param="currency")
        if "product" in params and "product_data" in params:
            raise _invalid(
                "You may only specify one of these parameters: product, product_data.",
                code="parameters_exclusive",
            )
        if "product" in params:
            product_id = params["product"]
            if product_id not in self._products:
                raise _no_such("product", product_id, param="product", status=400)
        elif "product_data" in params:
            data = params["product_data"]
            name = _required(data, "name", "product_data[name]")
            product_id = self._new_product_locked(name, metadata=data.get("metadata"))["id"]
        else:
            raise _missing("product")
        if "unit_amount" in params and "unit_amount_decimal" in params:
            raise _invalid(
                "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
                code="parameters_exclusive",
            )
        if "unit_amount" in params:
            unit_amount: int | None = params["unit_amount"]
            if unit_amount is None or unit_amount < 0:
                raise _invalid("Invalid unit_amount: must be at least 0.", param="unit_amount")
            decimal = str(unit_amount)
        elif "unit_amount_decimal" in params:
            decimal = params["unit_amount_decimal"]
            if not _DECIMAL.fullmatch(decimal):
                raise _invalid(f"Invalid decimal: {decimal[:32]}", param="unit_amount_decimal")
            whole, _, fraction = decimal.partition(".")
            unit_amount = int(whole) if not fraction.strip("0") else None
        else:
            raise _missing("unit_amount")
        recurring = None
        if "recurring" in params:
            recurring = self._recurring_locked(params["recurring"])
        price: dict[str, Any] = {
            "id": _new_id("price_"),
            "object": "price",
            "active": params.get("active", True),
            "billing_scheme": "per_unit",
            "created": int(self._now()),
            "currency": currency,
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": params.get("lookup_key"),
            "metadata": {},
            "nickname": params.get("nickname"),
            "product": product_id,
            "recurring": recurring,
            "tax_behavior": params.get("tax_behavior", "unspecified"),
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "one_time" if recurring is None else "recurring",
            "unit_amount": unit_amount,
            "unit_amount_decimal": decimal,
        }
        _apply_metadata(price["metadata"], params.get("metadata") or {})
        self._prices[price["id"]] = price
        return price

    def _recurring_locked(self, params: dict[str, Any]) -> dict[str, Any]:
        interval = _required(params, "interval", "recurring[interval]")
        count = params.get("interval_count", 1)
        if not 1 <= count <= _MAX_INTERVAL_DAYS[interval]:
            raise _invalid(
                "Invalid recurring[interval_count]: the billing interval must be between one "
                f"{interval} and three years.",
                param="recurring[interval_count]",
            )
        usage_type = params.get("usage_type", "licensed")
        meter_id = params.get("meter")
        if usage_type == "metered":
            if meter_id is None:
                raise _missing("recurring[meter]")
            meter = self._meters.get(meter_id)
            if meter is None:
                raise _no_such("billing meter", meter_id, param="recurring[meter]", status=400)
            if meter["status"] != "active":
                raise _invalid(
                    f"The meter {meter_id} is inactive. Only active meters can be attached "
                    "to a price.",
                    param="recurring[meter]",
                )
        elif meter_id is not None:
            raise _invalid(
                "recurring[meter] can only be set when recurring[usage_type] is metered.",
                param="recurring[meter]",
            )
        return {
            "interval": interval,
            "interval_count": count,
            "meter": meter_id,
            "trial_period_days": None,
            "usage_type": usage_type,
        }

    def _api_get_price(self, request: _Request, price_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        if price_id not in self._prices:
            raise _no_such("price", price_id)
        return self._prices[price_id]

    def _api_list_prices(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _PRICE_LIST_PARAMS, "")
        recurring = params.get("recurring", {})

        def keep(price: dict[str, Any]) -> bool:
            checks = [
                (price[key], params[key])
                for key in ("active", "currency", "product", "type")
                if key in params
            ]
            actual = price["recurring"] or {}
            checks += [(actual.get(key), value) for key, value in recurring.items()]
            return all(have == want for have, want in checks)

        return _page(_newest_first(self._prices.values()), params, "/v1/prices", "price", keep)

    # -- meters ------------------------------------------------------------------------------

    def _api_create_meter(self, request: _Request) -> dict[str, Any]:
        return self._create_meter_locked(_coerce(request.params, _METER_PARAMS, ""))

    def _create_meter_locked(self, params: dict[str, Any]) -> dict[str, Any]:
        display_name = _required(params, "display_name")
        event_name = _required(params, "event_name")
        formula = _required(
            _required(params, "default_aggregation"),
            "formula",
            "default_aggregation[formula]",
        )
        if len(display_name) > 250:
            raise _invalid("display_name can be at most 250 characters.", param="display_name")
        if len(event_name) > 100:
            raise _invalid("event_name can be at most 100 characters.", param="event_name")
        mapping = params.get("customer_mapping")
        if mapping is not None:
            _required(mapping, "event_payload_key", "customer_mapping[event_payload_key]")
            _required(mapping, "type", "customer_mapping[type]")
        else:
            mapping = {"event_payload_key": "stripe_customer_id", "type": "by_id"}
        value_key = params.get("value_settings", {}).get("event_payload_key", "value")
        self._check_event_name_free_locked(event_name)
        now = int(self._now())
        meter: dict[str, Any] = {
            "id": _new_id("mtr_test_", 32),
            "object": "billing.meter",
            "created": now,
            "customer_mapping": {
                "event_payload_key": mapping["event_payload_key"],
                "type": mapping["type"],
            },
            "default_aggregation": {"formula": formula},
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": params.get("event_time_window"),
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": now,
            "value_settings": {"event_payload_key": value_key},
        }
        self._meters[meter["id"]] = meter
        return meter

    def _check_event_name_free_locked(self, event_name: str) -> None:
        for meter in self._meters.values():
            if meter["status"] == "active" and meter["event_name"] == event_name:
                raise _invalid(
                    f"An active meter with event_name `{event_name}` already exists "
                    f"({meter['id']}).",
                    param="event_name",
                )

    def _meter_locked(self, meter_id: str) -> dict[str, Any]:
        if meter_id not in self._meters:
            raise _no_such("billing meter", meter_id)
        return self._meters[meter_id]

    def _api_get_meter(self, request: _Request, meter_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        return self._meter_locked(meter_id)

    def _api_list_meters(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _METER_LIST_PARAMS, "")
        status = params.get("status")
        return _page(
            _newest_first(self._meters.values()),
            params,
            "/v1/billing/meters",
            "billing meter",
            lambda meter: status is None or meter["status"] == status,
        )

    def _api_deactivate_meter(self, request: _Request, meter_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        meter = self._meter_locked(meter_id)
        if meter["status"] == "active":
            now = int(self._now())
            meter.update(status="inactive", updated=now)
            meter["status_transitions"]["deactivated_at"] = now
        return meter

    def _api_reactivate_meter(self, request: _Request, meter_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        meter = self._meter_locked(meter_id)
        if meter["status"] == "inactive":
            self._check_event_name_free_locked(meter["event_name"])
            meter.update(status="active", updated=int(self._now()))
            meter["status_transitions"]["deactivated_at"] = None
        return meter

    # -- customers and test clocks -----------------------------------------------------------

    def _api_create_customer(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _CUSTOMER_PARAMS, "")
        test_clock = params.get("test_clock")
        if test_clock is not None and test_clock not in self._test_clocks:
            raise _no_such("test clock", test_clock, param="test_clock", status=400)
        return self._new_customer_locked(
            _new_id("cus_", 14),
            test_clock,
            name=params.get("name"),
            email=params.get("email"),
            description=params.get("description"),
            phone=params.get("phone"),
            metadata=params.get("metadata"),
        )

    def _new_customer_locked(
        self,
        customer_id: str,
        test_clock: str | None,
        *,
        name: str | None = None,
        email: str | None = None,
        description: str | None = None,
        phone: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        created = self._test_clocks[test_clock]["frozen_time"] if test_clock else int(self._now())
        customer: dict[str, Any] = {
            "id": customer_id,
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": created,
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": description,
            "discount": None,
            "email": email,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": {},
            "name": name,
            "next_invoice_sequence": 1,
            "phone": phone,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": test_clock,
        }
        _apply_metadata(customer["metadata"], metadata or {})
        self._customers[customer_id] = customer
        return customer

    def _api_get_customer(self, request: _Request, customer_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        if customer_id not in self._customers:
            raise _no_such("customer", customer_id)
        return self._customers[customer_id]

    def _api_create_test_clock(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _TEST_CLOCK_PARAMS, "")
        frozen_time = _required(params, "frozen_time")
        created = int(self._now())
        clock: dict[str, Any] = {
            "id": _new_id("clock_"),
            "object": "test_helpers.test_clock",
            "created": created,
            "deletes_after": created + TEST_CLOCK_LIFETIME,
            "frozen_time": frozen_time,
            "livemode": False,
            "name": params.get("name"),
            "status": "ready",
            "status_details": {},
        }
        self._test_clocks[clock["id"]] = clock
        return clock

    def _test_clock_locked(self, clock_id: str) -> dict[str, Any]:
        if clock_id not in self._test_clocks:
            raise _no_such("test clock", clock_id)
        return self._test_clocks[clock_id]

    def _api_get_test_clock(self, request: _Request, clock_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        return self._test_clock_locked(clock_id)

    def _api_advance_test_clock(self, request: _Request, clock_id: str) -> dict[str, Any]:
        params = _coerce(request.params, _ADVANCE_PARAMS, "")
        clock = self._test_clock_locked(clock_id)
        target = _required(params, "frozen_time")
        current = clock["frozen_time"]
        if target <= current:
            raise _invalid(
                f"The frozen_time ({target}) must be after the test clock's current "
                f"frozen_time ({current}).",
                param="frozen_time",
            )
        subscriptions = [
            sub for sub in self._subscriptions.values() if sub["test_clock"] == clock_id
        ]
        # Stripe: at most two intervals of the shortest subscription (two years without any).
        limits = [
            next_period_end(current, *self._interval(item["price"], factor=2), current)
            for sub in subscriptions
            if sub["status"] != "canceled"
            for item in sub["items"]["data"]
        ]
        limit = min(limits, default=next_period_end(current, "year", 2, current))
        if target > limit:
            raise _invalid(
                f"Cannot advance the test clock to {target}: it may move at most two intervals "
                "of its shortest subscription (two years without subscriptions) past its "
                f"frozen_time, so to {limit} at the latest.",
                param="frozen_time",
            )
        clock["frozen_time"] = target
        self._advance_subscriptions_locked(subscriptions, target)
        # Stripe answers "advancing" and works in the background; the fake is done already,
        # so the next retrieve says "ready".
        return {**clock, "status": "advancing"}

    # -- subscriptions: the API --------------------------------------------------------------

    def _api_create_subscription(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _SUBSCRIPTION_CREATE_PARAMS, "")
        customer_id = _required(params, "customer")
        customer = self._customers.get(customer_id)
        if customer is None:
            raise _no_such("customer", customer_id, param="customer", status=400)
        entries = _required(params, "items")
        if not entries:
            raise _missing("items")
        planned = []
        for index, entry in enumerate(entries):
            param = f"items[{index}]"
            price = self._subscribable_price_locked(
                _required(entry, "price", f"{param}[price]"), f"{param}[price]"
            )
            quantity = self._quantity(price, entry, param, default=1)
            planned.append((price, quantity, entry.get("metadata")))
        self._check_item_prices([price for price, _, _ in planned])
        clock_id = customer["test_clock"]
        now = self._test_clocks[clock_id]["frozen_time"] if clock_id else int(self._now())
        start = params.get("backdate_start_date", now)
        if start > now:
            raise _invalid("backdate_start_date must be in the past.", param="backdate_start_date")
        anchor = params.get("billing_cycle_anchor", start)
        if anchor < start:
            raise _invalid(
                f"billing_cycle_anchor ({anchor}) cannot be before the subscription's start "
                f"({start}).",
                param="billing_cycle_anchor",
            )
        natural = min(
            next_period_end(start, *self._interval(price), start) for price, _, _ in planned
        )
        if anchor > natural:
            raise _invalid(
                f"billing_cycle_anchor cannot be later than next natural billing date "
                f"({natural}) for plan",
                param="billing_cycle_anchor",
            )
        subscription_id = _new_id("sub_")
        subscription: dict[str, Any] = {
            "id": subscription_id,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": anchor,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"type": "flexible", "flexible": None, "updated_at": now},
            "billing_schedules": [],
            "billing_thresholds": None,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically",
            "created": now,
            "currency": planned[0][0]["currency"],
            "customer": customer_id,
            "days_until_due": None,
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": params.get("description"),
            "discounts": [],
            "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {
                "object": "list",
                "data": [],
                "has_more": False,
                "total_count": 0,
                "url": f"/v1/subscription_items?subscription={subscription_id}",
            },
            "latest_invoice": None,
            "livemode": False,
            "metadata": {},
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "schedule": None,
            "start_date": start,
            "status": "active",
            "test_clock": clock_id,
            "transfer_data": None,
            "trial_end": None,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": None,
        }
        _apply_metadata(subscription["metadata"], params.get("metadata") or {})
        for price, quantity, metadata in planned:
            self._add_item_locked(subscription, price, quantity, metadata, start, now)
        if params.get("cancel_at_period_end"):
            self._set_cancel_at_period_end(subscription, True, now)
        self._subscriptions[subscription_id] = subscription
        self._emit_locked("customer.subscription.created", subscription, now, request)
        return subscription

    def _subscribable_price_locked(self, price_id: str, param: str) -> dict[str, Any]:
        price = self._prices.get(price_id)
        if price is None:
            raise _no_such("price", price_id, param=param, status=400)
        if price["type"] != "recurring":
            raise _invalid(
                "The price specified is set to `type=one_time` but this field only accepts "
                "prices with `type=recurring`.",
                param=param,
            )
        if not price["active"]:
            raise _invalid(
                "The price specified is inactive. This field only accepts active prices.",
                param=param,
            )
        return price

    @staticmethod
    def _quantity(
        price: dict[str, Any], entry: dict[str, Any], param: str, default: int | None
    ) -> int | None:
        if price["recurring"]["usage_type"] == "metered":
            if "quantity" in entry:
                raise _invalid(
                    "Quantity should not be specified where usage_type is `metered`. Remove "
                    f"quantity from `{param}`.",
                    param=f"{param}[quantity]",
                )
            return None
        quantity = entry.get("quantity", default if default is not None else 1)
        if quantity < 0:
            raise _invalid(
                "This value must be greater than or equal to 0.", param=f"{param}[quantity]"
            )
        return int(quantity)

    @staticmethod
    def _check_item_prices(prices: list[dict[str, Any]]) -> None:
        ids = [price["id"] for price in prices]
        for price_id in ids:
            if ids.count(price_id) > 1:
                raise _invalid(
                    f"Cannot add multiple subscription items with the same price: {price_id}",
                    param="items",
                )
        if len({price["currency"] for price in prices}) > 1:
            raise _invalid(
                "All prices on a subscription must have the same currency.", param="items"
            )

    @staticmethod
    def _interval(price: dict[str, Any], factor: int = 1) -> tuple[str, int]:
        recurring = price["recurring"]
        return recurring["interval"], recurring["interval_count"] * factor

    def _event_name_locked(self, price: dict[str, Any]) -> str | None:
        meter_id = price["recurring"]["meter"]
        return self._meters[meter_id]["event_name"] if meter_id in self._meters else None

    def _add_item_locked(
        self,
        subscription: dict[str, Any],
        price: dict[str, Any],
        quantity: int | None,
        metadata: dict[str, str] | None,
        start: int,
        now: int,
    ) -> None:
        """Add an item whose periods run from `start` on the subscription's anchor."""
        anchor = subscription["billing_cycle_anchor"]
        interval = self._interval(price)
        periods = [[start, next_period_end(anchor, *interval, start)]]
        while periods[-1][1] <= now:  # a backdated start has periods that already ended
            end = periods[-1][1]
            periods.append([end, next_period_end(anchor, *interval, end)])
        item: dict[str, Any] = {
            "id": _new_id("si_", 14),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": now,
            "current_period_end": periods[-1][1],
            "current_period_start": periods[-1][0],
            "discounts": [],
            "metadata": {},
            "price": copy.deepcopy(price),
            "subscription": subscription["id"],
            "tax_rates": [],
        }
        if quantity is not None:  # a metered item has none, and Stripe leaves the field out
            item["quantity"] = quantity
        _apply_metadata(item["metadata"], metadata or {})
        items = subscription["items"]
        items["data"].append(item)
        items["total_count"] = len(items["data"])
        self._item_states[item["id"]] = _ItemState(
            subscription["id"], periods, [(start, self._event_name_locked(price))]
        )

    def _subscription_locked(self, subscription_id: str) -> dict[str, Any]:
        if subscription_id not in self._subscriptions:
            raise _no_such("subscription", subscription_id)
        return self._subscriptions[subscription_id]

    def _api_get_subscription(self, request: _Request, subscription_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        return self._subscription_locked(subscription_id)

    def _api_list_subscriptions(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _SUBSCRIPTION_LIST_PARAMS, "")
        status = params.get("status")

        def keep(sub: dict[str, Any]) -> bool:
            if status is None:
                matches = sub["status"] not in ("canceled", "incomplete_expired")
            elif status == "ended":
                matches = sub["status"] in ("canceled", "incomplete_expired")
            else:
                matches = status == "all" or sub["status"] == status
            if "price" in params:
                prices = {item["price"]["id"] for item in sub["items"]["data"]}
                matches = matches and params["price"] in prices
            return (
                matches
                and params.get("customer", sub["customer"]) == sub["customer"]
                and params.get("test_clock", sub["test_clock"]) == sub["test_clock"]
            )

        return _page(
            _newest_first(self._subscriptions.values()),
            params,
            "/v1/subscriptions",
            "subscription",
            keep,
        )

    def _api_update_subscription(self, request: _Request, subscription_id: str) -> dict[str, Any]:
        params = _coerce(request.params, _SUBSCRIPTION_UPDATE_PARAMS, "")
        subscription = self._subscription_locked(subscription_id)
        if subscription["status"] == "canceled" and set(params) - {"metadata", "expand"}:
            raise _invalid(
                "A canceled subscription can only update its cancellation_details and metadata."
            )
        now = self._subscription_now_locked(subscription)
        items = {item["id"]: item for item in subscription["items"]["data"]}
        prices = {item_id: item["price"] for item_id, item in items.items()}
        changes: list[tuple[str, dict[str, Any], int | None, dict[str, str] | None]] = []
        additions: list[tuple[dict[str, Any], int | None, dict[str, str] | None]] = []
        reset = params.get("billing_cycle_anchor") == "now"
        for index, entry in enumerate(params.get("items", [])):
            param = f"items[{index}]"
            if "id" in entry:
                item_id = entry["id"]
                if item_id not in items:
                    raise _no_such("subscription item", item_id, param=f"{param}[id]", status=400)
                price = items[item_id]["price"]
                if "price" in entry:
                    price = self._subscribable_price_locked(entry["price"], f"{param}[price]")
                    reset = reset or self._interval(price) != self._interval(prices[item_id])
                default = items[item_id].get("quantity")
                quantity = self._quantity(price, entry, param, default=default)
                prices[item_id] = price
                changes.append((item_id, price, quantity, entry.get("metadata")))
            else:
                price = self._subscribable_price_locked(
                    _required(entry, "price", f"{param}[price]"), f"{param}[price]"
                )
                additions.append(
                    (price, self._quantity(price, entry, param, 1), entry.get("metadata"))
                )
        self._check_item_prices(list(prices.values()) + [price for price, _, _ in additions])

        before = copy.deepcopy(subscription)
        for item_id, price, quantity, metadata in changes:
            item = items[item_id]
            if price["id"] != item["price"]["id"]:
                item["price"] = copy.deepcopy(price)
                self._item_states[item_id].meters.append((now, self._event_name_locked(price)))
            if quantity is None:
                item.pop("quantity", None)
            else:
                item["quantity"] = quantity
            _apply_metadata(item["metadata"], metadata or {})
        for price, quantity, metadata in additions:
            self._add_item_locked(subscription, price, quantity, metadata, now, now)
        if reset and subscription["status"] == "active":
            self._reset_anchor_locked(subscription, now)
        if "cancel_at_period_end" in params:
            self._set_cancel_at_period_end(subscription, params["cancel_at_period_end"], now)
        if "description" in params:
            subscription["description"] = params["description"]
        _apply_metadata(subscription["metadata"], params.get("metadata", {}))
        previous = _diff(before, subscription)
        if previous:
            self._emit_locked(
                "customer.subscription.updated", subscription, now, request, previous=previous
            )
        return subscription

    def _api_cancel_subscription(self, request: _Request, subscription_id: str) -> dict[str, Any]:
        params = _coerce(request.params, _SUBSCRIPTION_CANCEL_PARAMS, "")
        subscription = self._subscription_locked(subscription_id)
        if subscription["status"] == "canceled":
            raise _no_such("subscription", subscription_id)  # what Stripe answers here
        now = self._subscription_now_locked(subscription)
        details = params.get("cancellation_details", {})
        subscription["cancellation_details"] = {
            "comment": details.get("comment"),
            "feedback": details.get("feedback"),
            "reason": "cancellation_requested",
        }
        self._end_locked(subscription, now, canceled_at=now)
        self._emit_locked("customer.subscription.deleted", subscription, now, request)
        return subscription

    def _api_resume_subscription(self, request: _Request, subscription_id: str) -> dict[str, Any]:
        params = _coerce(request.params, _RESUME_PARAMS, "")
        subscription = self._subscription_locked(subscription_id)
        if subscription["status"] != "paused":
            raise _invalid(
                f"Subscription {subscription_id} is {subscription['status']}; only a paused "
                "subscription can be resumed."
            )
        now = self._subscription_now_locked(subscription)
        if params.get("billing_cycle_anchor", "now") == "now":
            subscription["billing_cycle_anchor"] = now
        anchor = subscription["billing_cycle_anchor"]
        for item in subscription["items"]["data"]:
            end = next_period_end(anchor, *self._interval(item["price"]), now)
            self._item_states[item["id"]].periods.append([now, end])
            item["current_period_start"], item["current_period_end"] = now, end
        subscription["status"] = "active"
        if subscription["cancel_at_period_end"]:
            subscription["cancel_at"] = self._period_end(subscription)
        self._emit_locked("customer.subscription.resumed", subscription, now, request)
        return subscription

    # -- subscriptions: time -----------------------------------------------------------------

    def _subscription_now_locked(self, subscription: dict[str, Any]) -> int:
        clock_id = subscription["test_clock"]
        if clock_id is not None and clock_id in self._test_clocks:
            return int(self._test_clocks[clock_id]["frozen_time"])
        return int(self._now())

    @staticmethod
    def _period_end(subscription: dict[str, Any]) -> int:
        """Where cancel_at_period_end ends the subscription: its items' earliest period end."""
        return min(item["current_period_end"] for item in subscription["items"]["data"])

    def _set_cancel_at_period_end(self, subscription: dict[str, Any], flag: bool, now: int) -> None:
        subscription["cancel_at_period_end"] = flag
        # Stripe: canceled_at is when the cancellation was asked for, cancel_at when it happens.
        subscription["cancel_at"] = self._period_end(subscription) if flag else None
        subscription["canceled_at"] = now if flag else None

    def _reset_anchor_locked(self, subscription: dict[str, Any], now: int) -> None:
        """billing_cycle_anchor=now: every item's period ends now and a new one starts now."""
        subscription["billing_cycle_anchor"] = now
        for item in subscription["items"]["data"]:
            periods = self._item_states[item["id"]].periods
            _cut(periods, now)
            end = next_period_end(now, *self._interval(item["price"]), now)
            periods.append([now, end])
            item["current_period_start"], item["current_period_end"] = now, end
        if subscription["cancel_at_period_end"]:
            subscription["cancel_at"] = self._period_end(subscription)

    def _end_locked(
        self, subscription: dict[str, Any], at: int, *, canceled_at: int | None
    ) -> None:
        """Cancel for good at `at`; items keep their last current_period_* values.

        canceled_at None keeps the time the cancellation was asked for (cancel_at_period_end).
        """
        subscription["status"] = "canceled"
        subscription["ended_at"] = at
        if canceled_at is not None or subscription["canceled_at"] is None:
            subscription["canceled_at"] = at if canceled_at is None else canceled_at
        for item in subscription["items"]["data"]:
            _cut(self._item_states[item["id"]].periods, at)

    def _catch_up_wall_locked(self) -> None:
        """Apply the renewals due on the fake's clock to subscriptions without a test clock."""
        on_wall = [
            sub
            for sub in self._subscriptions.values()
            if sub["test_clock"] is None and sub["status"] == "active"
        ]
        if on_wall:
            self._advance_subscriptions_locked(on_wall, int(self._now()))

    def _advance_subscriptions_locked(
        self, subscriptions: list[dict[str, Any]], until: int
    ) -> None:
        """Renew (or end) the subscriptions, in time order, at every boundary up to `until`."""
        while True:
            due: tuple[int, dict[str, Any]] | None = None
            for sub in subscriptions:
                if sub["status"] != "active":
                    continue
                boundary = self._period_end(sub)
                if sub["cancel_at"] is not None:
                    boundary = min(boundary, sub["cancel_at"])
                if boundary <= until and (due is None or boundary < due[0]):
                    due = (boundary, sub)
            if due is None:
                return
            self._renew_locked(due[1], due[0])

    def _renew_locked(self, subscription: dict[str, Any], at: int) -> None:
        if subscription["cancel_at"] is not None and subscription["cancel_at"] <= at:
            self._end_locked(subscription, subscription["cancel_at"], canceled_at=None)
            self._emit_locked("customer.subscription.deleted", subscription, at, None)
            return
        before = copy.deepcopy(subscription)
        anchor = subscription["billing_cycle_anchor"]
        for item in subscription["items"]["data"]:
            if item["current_period_end"] <= at:
                start = item["current_period_end"]
                end = next_period_end(anchor, *self._interval(item["price"]), start)
                self._item_states[item["id"]].periods.append([start, end])
                item["current_period_start"], item["current_period_end"] = start, end
        if subscription["cancel_at_period_end"]:
            subscription["cancel_at"] = self._period_end(subscription)
        self._emit_locked(
            "customer.subscription.updated",
            subscription,
            at,
            None,
            previous=_diff(before, subscription),
        )

    def _tick_forever(self) -> None:
        """Renew wall-clock subscriptions without a request, so their webhooks go out."""
        with self._lock:
            deadline = time.monotonic() + self._tick_seconds
            while not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakeup.wait(remaining)
                    continue
                deadline = time.monotonic() + self._tick_seconds
                try:
                    self._catch_up_wall_locked()
                except Exception:
                    log.exception("fake Stripe ticker failed")

    # -- webhook endpoints and events: the API -----------------------------------------------

    def _api_create_webhook_endpoint(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _WEBHOOK_ENDPOINT_PARAMS, "")
        url = _required(params, "url")
        enabled_events = _required(params, "enabled_events")
        return self._create_webhook_endpoint_locked(
            url,
            enabled_events,
            None,
            description=params.get("description"),
            metadata=params.get("metadata"),
        )

    def _create_webhook_endpoint_locked(
        self,
        url: str,
        enabled_events: list[str],
        secret: str | None,
        *,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _invalid(f"Invalid URL: {url[:200]}", param="url", code="url_invalid")
        if not enabled_events:
            raise _missing("enabled_events")
        for index, name in enumerate(enabled_events):
            if name != "*" and not _EVENT_TYPE.fullmatch(name):
                raise _invalid(
                    f"Invalid enabled_events[{index}]: {name!r} is not an event type",
                    param=f"enabled_events[{index}]",
                )
        endpoint: dict[str, Any] = {
            "id": _new_id("we_"),
            "object": "webhook_endpoint",
            "api_version": None,
            "application": None,
            "created": int(self._now()),
            "description": description,
            "enabled_events": list(enabled_events),
            "livemode": False,
            "metadata": {},
            "status": "enabled",
            "url": url,
        }
        _apply_metadata(endpoint["metadata"], metadata or {})
        secret = secret or _new_id("whsec_", 32)
        self._endpoints[endpoint["id"]] = _Endpoint(endpoint, [(secret, None)])
        log.debug("webhook endpoint %s -> %s %s", endpoint["id"], url, enabled_events)
        return {**copy.deepcopy(endpoint), "secret": secret}  # Stripe shows it at creation only

    def _endpoint_locked(self, endpoint_id: str) -> _Endpoint:
        if endpoint_id not in self._endpoints:
            raise _no_such("webhook endpoint", endpoint_id)
        return self._endpoints[endpoint_id]

    def _api_get_webhook_endpoint(self, request: _Request, endpoint_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        return self._endpoint_locked(endpoint_id).obj

    def _api_list_webhook_endpoints(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _LIST_PARAMS, "")
        endpoints = _newest_first(endpoint.obj for endpoint in self._endpoints.values())
        return _page(endpoints, params, "/v1/webhook_endpoints", "webhook endpoint")

    def _api_delete_webhook_endpoint(self, request: _Request, endpoint_id: str) -> dict[str, Any]:
        _coerce(request.params, {}, "")
        self._endpoint_locked(endpoint_id)
        del self._endpoints[endpoint_id]
        # Queued deliveries to it are dropped when they come due.
        return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}

    def _api_get_event(self, request: _Request, event_id: str) -> dict[str, Any]:
        _coerce(request.params, _GET_PARAMS, "")
        if event_id not in self._stripe_events:
            raise _no_such("event", event_id)
        return self._stripe_events[event_id]

    def _api_list_events(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _EVENT_LIST_PARAMS, "")
        if "type" in params and "types" in params:
            raise _invalid(
                "You may only specify one of these parameters: type, types.",
                code="parameters_exclusive",
            )
        wanted = params.get("types") or ([params["type"]] if "type" in params else [])

        def keep(event: dict[str, Any]) -> bool:
            return not wanted or any(
                event["type"] == pattern
                or (pattern.endswith(".*") and event["type"].startswith(pattern[:-1]))
                for pattern in wanted
            )

        events = _newest_first(self._stripe_events.values())
        return _page(events, params, "/v1/events", "event", keep)

    # -- meter event summaries ---------------------------------------------------------------

    def _api_list_event_summaries(self, request: _Request, meter_id: str) -> dict[str, Any]:
        params = _coerce(request.params, _EVENT_SUMMARY_PARAMS, "")
        meter = self._meter_locked(meter_id)
        customer = _required(params, "customer")
        start = _required(params, "start_time")
        end = _required(params, "end_time")
        window = params.get("value_grouping_window")
        bounds = (("start_time", start), ("end_time", end))
        for name, value in bounds:
            if value % 60:
                raise _invalid(f"{name} must be aligned with minute boundaries.", param=name)
        if start >= end:
            raise _invalid("start_time must be before end_time.", param="start_time")
        step = _GROUPING_SECONDS[window] if window is not None else None
        if step is not None:
            for name, value in bounds:
                if value % step:
                    raise _invalid(
                        f"{name} must be aligned with {window} boundaries (UTC) when "
                        f"value_grouping_window is {window}.",
                        param=name,
                    )
        if customer not in self._customers:
            raise _no_such("customer", customer, param="customer", status=400)
        summaries = self._event_summaries_locked(meter, customer, start, end, step)
        url = f"/v1/billing/meters/{meter_id}/event_summaries"
        return _page(summaries, params, url, "billing meter event summary")

    def _event_summaries_locked(
        self, meter: dict[str, Any], customer: str, start: int, end: int, step: int | None
    ) -> list[dict[str, Any]]:
        """The summaries of [start, end), newest window first.

        Without a grouping window there is exactly one; with one, a summary for each window
        that holds an event (or an injected offset). Only events accepted summary_delay
        seconds ago or more count, as Stripe aggregates asynchronously.
        """
        now = self._now()
        event_name = meter["event_name"]
        events = [
            event
            for event, accepted_at in self._events
            if event.customer == customer
            and event.event_name == event_name
            and start <= event.timestamp < end
            and accepted_at + self._summary_delay <= now
        ]
        offsets = [
            (at, delta)
            for who, name, at, delta in self._summary_offsets
            if who == customer and name == event_name and start <= at < end
        ]
        if step is None:
            starts = {start}
        else:
            seconds = [event.timestamp for event in events] + [at for at, _ in offsets]
            starts = {start + (second - start) // step * step for second in seconds}
        formula = meter["default_aggregation"]["formula"]
        summaries = []
        for window_start in sorted(starts, reverse=True):
            window_end = end if step is None else window_start + step
            inside = [e for e in events if window_start <= e.timestamp < window_end]
            value: float
            if formula == "count":
                value = len(inside)
            elif formula == "last":
                # The latest timestamp wins; among equal ones, the later accepted.
                value = sorted(inside, key=lambda e: e.timestamp)[-1].value if inside else 0
            else:
                value = sum(e.value for e in inside)
            value += sum(delta for at, delta in offsets if window_start <= at < window_end)
            key = f"{meter['id']}:{customer}:{window_start}:{window_end}".encode()
            summaries.append(
                {
                    "id": "mtrusg_test_" + hashlib.sha256(key).hexdigest()[:48],
                    "object": "billing.meter_event_summary",
                    "aggregated_value": int(value) if float(value).is_integer() else value,
                    "end_time": window_end,
                    "livemode": False,
                    "meter": meter["id"],
                    "start_time": window_start,
                }
            )
        return summaries

    # -- event destinations and v2 events: the API -------------------------------------------

    def _api_create_event_destination(self, request: _Request) -> dict[str, Any]:
        params = _coerce_json(request.params, _EVENT_DESTINATION_PARAMS, "")
        name = _required(params, "name")
        kind = _required(params, "type")
        event_payload = _required(params, "event_payload")
        enabled_events = _required(params, "enabled_events")
        include = _includes(params.get("include", []), _DESTINATION_INCLUDES)
        if kind != "webhook_endpoint":
            raise _invalid(
                f"The fake Stripe delivers to webhook_endpoint destinations only, not {kind}.",
                param="type",
            )
        if event_payload != "thin":
            raise _invalid(
                "The fake Stripe sends thin events to event destinations only; snapshot events "
                "go to the endpoints of /v1/webhook_endpoints.",
                param="event_payload",
            )
        if "snapshot_api_version" in params:
            raise _invalid(
                "snapshot_api_version can only be set when event_payload is snapshot.",
                param="snapshot_api_version",
            )
        if kind == "webhook_endpoint" and "webhook_endpoint" not in params:
            raise _missing("webhook_endpoint")
        url = _required(params["webhook_endpoint"], "url", "webhook_endpoint.url")
        destination = self._create_destination_locked(
            name,
            url,
            enabled_events,
            None,
            description=params.get("description"),
            metadata=params.get("metadata"),
            events_from=params.get("events_from"),
        )
        # Stripe shows the signing secret once, here, and only when asked to.
        return self._destination_view(destination, include, destination.secrets[0][0])

    def _create_destination_locked(
        self,
        name: str,
        url: str,
        enabled_events: list[str],
        secret: str | None,
        *,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        events_from: list[str] | None = None,
    ) -> _Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _invalid(
                f"Invalid URL: {url[:200]}", param="webhook_endpoint.url", code="url_invalid"
            )
        if len(name) > 100:
            raise _invalid("name can be at most 100 characters.", param="name")
        if not enabled_events:
            raise _missing("enabled_events")
        for index, event_type in enumerate(enabled_events):
            if not _THIN_EVENT_TYPE.fullmatch(event_type):
                raise _invalid(
                    f"Invalid enabled_events[{index}]: {event_type[:100]!r} is not a thin event "
                    "type (v1.… or v2.…)",
                    param=f"enabled_events[{index}]",
                )
        scopes = ("@self", "@accounts", "@organization_members", "@organization_members/@accounts")
        for index, scope in enumerate(events_from or []):
            if scope not in scopes:
                raise _invalid(
                    f"Invalid events_from[{index}]: must be one of {', '.join(scopes)}",
                    param=f"events_from[{index}]",
                )
        now = _rfc3339(self._now())
        destination: dict[str, Any] = {
            "id": _new_id("ed_test_", 46),
            "object": "v2.core.event_destination",
            "amazon_eventbridge": None,
            "azure_event_grid": None,
            "created": now,
            "description": description or "",
            "enabled_events": list(enabled_events),
            "event_payload": "thin",
            "events_from": list(events_from or ["@self"]),
            "livemode": False,
            "metadata": {},
            "name": name,
            "snapshot_api_version": None,
            "status": "enabled",
            "status_details": None,
            "type": "webhook_endpoint",
            "updated": now,
            "webhook_endpoint": {"signing_secret": None, "url": url},
        }
        _apply_metadata(destination["metadata"], metadata or {})
        endpoint = _Endpoint(destination, [(secret or _new_id("whsec_", 32), None)])
        self._destinations[destination["id"]] = endpoint
        log.debug("event destination %s -> %s %s", destination["id"], url, enabled_events)
        return endpoint

    @staticmethod
    def _destination_view(
        destination: _Endpoint, include: Sequence[str], signing_secret: str | None = None
    ) -> dict[str, Any]:
        """The destination as the API shows it: webhook_endpoint.url and .signing_secret are
        redacted unless `include` names them (and the secret is shown at creation only)."""
        view = copy.deepcopy(destination.obj)
        if "webhook_endpoint.url" not in include:
            view["webhook_endpoint"]["url"] = None
        if "webhook_endpoint.signing_secret" in include:
            view["webhook_endpoint"]["signing_secret"] = signing_secret
        return view

    def _destination_locked(self, destination_id: str) -> _Endpoint:
        if destination_id not in self._destinations:
            raise _no_such("event destination", destination_id)
        return self._destinations[destination_id]

    def _api_list_event_destinations(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _EVENT_DESTINATION_LIST_PARAMS, "")
        include = _includes(params.get("include", []), ("webhook_endpoint.url",))
        views = [self._destination_view(d, include) for d in self._destinations.values()]
        return _v2_page(_newest_first(views), params, "/v2/core/event_destinations", request.query)

    def _api_get_event_destination(self, request: _Request, destination_id: str) -> dict[str, Any]:
        params = _coerce(request.params, _EVENT_DESTINATION_GET_PARAMS, "")
        include = _includes(params.get("include", []), ("webhook_endpoint.url",))
        return self._destination_view(self._destination_locked(destination_id), include)

    def _api_delete_event_destination(
        self, request: _Request, destination_id: str
    ) -> dict[str, Any]:
        _coerce(request.params, {}, "")
        self._destination_locked(destination_id)
        del self._destinations[destination_id]
        # Queued deliveries to it are dropped when they come due.
        return {"id": destination_id, "object": "v2.core.event_destination"}

    def _api_disable_event_destination(
        self, request: _Request, destination_id: str
    ) -> dict[str, Any]:
        _coerce_json(request.params, {}, "")
        destination = self._destination_locked(destination_id)
        if destination.obj["status"] == "enabled":
            destination.obj.update(
                status="disabled",
                status_details={"disabled": {"reason": "user"}},
                updated=_rfc3339(self._now()),
            )
        return self._destination_view(destination, ())

    def _api_enable_event_destination(
        self, request: _Request, destination_id: str
    ) -> dict[str, Any]:
        _coerce_json(request.params, {}, "")
        destination = self._destination_locked(destination_id)
        if destination.obj["status"] == "disabled":
            destination.obj.update(
                status="enabled", status_details=None, updated=_rfc3339(self._now())
            )
        return self._destination_view(destination, ())

    def _api_get_v2_event(self, request: _Request, event_id: str) -> dict[str, Any]:
        _coerce(request.params, {}, "")
        if event_id not in self._v2_events:
            raise _no_such("event", event_id)
        return self._v2_events[event_id]

    def _api_list_v2_events(self, request: _Request) -> dict[str, Any]:
        params = _coerce(request.params, _V2_EVENT_LIST_PARAMS, "")
        types = params.get("types", [])
        if len(types) > 20:
            raise _invalid("types can name at most 20 event types.", param="types")
        object_id = params.get("object_id")
        limits = {
            op: _parse_rfc3339(value, f"created[{op}]")
            for op, value in params.get("created", {}).items()
        }
        compare: dict[str, Callable[[float, float], bool]] = {
            "gt": lambda a, b: a > b,
            "gte": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "lte": lambda a, b: a <= b,
        }

        def keep(event: dict[str, Any]) -> bool:
            if types and event["type"] not in types:
                return False
            related = event.get("related_object") or {}
            if object_id is not None and related.get("id") != object_id:
                return False
            created = _parse_rfc3339(event["created"], "created")
            return all(compare[op](created, limit) for op, limit in limits.items())

        events = [event for event in _newest_first(self._v2_events.values()) if keep(event)]
        return _v2_page(events, params, "/v2/core/events", request.query)

    # -- asynchronous validation: error reports ----------------------------------------------

    def _flush_errors_locked(self) -> list[dict[str, Any]]:
        """Report the pending failures: a v1.billing.meter.error_report_triggered event per
        meter and one v1.billing.meter.no_meter_found for the event names without a meter,
        each counting every failure and sampling at most max_error_samples per code."""
        pending, self._pending_errors, self._errors_due = self._pending_errors, [], None
        groups: dict[str | None, list[_PendingError]] = {}
        for failure in pending:
            groups.setdefault(failure.meter_id, []).append(failure)
        now = self._now()
        reports = []
        for meter_id, failures in groups.items():
            by_code: dict[str, list[_PendingError]] = {}
            for failure in failures:
                by_code.setdefault(failure.rejected.code, []).append(failure)
            count = len(failures)
            summary = (
                "There is 1 invalid event" if count == 1 else f"There are {count} invalid events"
            )
            error_types = [
                {
                    "code": code,
                    "error_count": len(items),
                    "sample_errors": [
                        {
                            "error_message": item.rejected.message,
                            "request": {"identifier": item.rejected.identifier},
                        }
                        for item in items[: self._max_error_samples]
                    ],
                }
                for code, items in by_code.items()
            ]
            event: dict[str, Any] = {
                "id": _new_id("evt_test_", 46),
                "object": "v2.core.event",
                "context": None,
                "created": _rfc3339(now),
                "data": {
                    "developer_message_summary": summary,
                    "reason": {"error_count": count, "error_types": error_types},
                    "validation_end": _rfc3339(max(now, failures[-1].at)),
                    "validation_start": _rfc3339(min(failure.at for failure in failures)),
                },
                "livemode": False,
                "reason": None,
            }
            thin: dict[str, Any] = {
                key: event[key] for key in ("id", "object", "livemode", "created")
            }
            if meter_id is not None:
                related = {
                    "id": meter_id,
                    "type": "billing.meter",
                    "url": f"/v1/billing/meters/{meter_id}",
                }
                event["related_object"] = related
                thin["related_object"] = dict(related)
            event["type"] = thin["type"] = ERROR_REPORT_EVENT if meter_id else NO_METER_EVENT
            self._v2_events[event["id"]] = event
            self._error_reports.append(event)
            self._event_payloads[event["id"]] = json.dumps(thin, indent=2).encode()
            log.info("event %s %s %s: %s", event["id"], event["type"], meter_id or "-", summary)
            for destination in self._destinations.values():
                if _subscribes(destination, event["type"]):
                    self._enqueue_locked(event["id"], destination.obj["id"])
            reports.append(event)
        self._wakeup.notify_all()
        return reports

    def _error_report_wait_locked(self) -> float | None:
        """Report the pending failures if they are due; else seconds until they are (or None)."""
        if self._errors_due is None:
            return None
        remaining = self._errors_due - time.monotonic()
        if remaining > 0:
            return remaining
        self._flush_errors_locked()
        return None

    def _target_locked(self, target_id: str) -> _Endpoint | None:
        """The webhook endpoint or event destination with that id."""
        return self._endpoints.get(target_id) or self._destinations.get(target_id)

    # -- events and their delivery -----------------------------------------------------------

    def _emit_locked(
        self,
        event_type: str,
        subscription: dict[str, Any],
        created: int,
        request: _Request | None,
        *,
        previous: dict[str, Any] | None = None,
    ) -> None:
        """Record an Event with a snapshot of the subscription and queue its deliveries."""
        endpoints = [e for e in self._endpoints.values() if _subscribes(e, event_type)]
        data: dict[str, Any] = {"object": copy.deepcopy(subscription)}
        if previous is not None:
            data["previous_attributes"] = copy.deepcopy(previous)
        event: dict[str, Any] = {
            "id": _new_id("evt_"),
            "object": "event",
            "api_version": API_VERSION,
            "created": created,
            "data": data,
            "livemode": False,
            "pending_webhooks": len(endpoints),
            "request": {
                "id": request.request_id if request else None,
                "idempotency_key": request.idempotency_key if request else None,
            },
            "type": event_type,
        }
        self._stripe_events[event["id"]] = event
        self._event_payloads[event["id"]] = json.dumps(event, indent=2).encode()
        log.info("event %s %s %s", event["id"], event_type, subscription["id"])
        for endpoint in endpoints:
            self._enqueue_locked(event["id"], endpoint.obj["id"])

    def _enqueue_locked(
        self, event_id: str, endpoint_id: str, attempt: int = 1, delay: float = 0.0
    ) -> None:
        self._delivery_seq += 1
        delivery = _Delivery(
            time.monotonic() + delay,
            self._delivery_seq,
            event_id,
            endpoint_id,
            attempt,
            self._generation,
        )
        heapq.heappush(self._queue, delivery)
        self._wakeup.notify_all()

    def _deliver_forever(self) -> None:
        """The delivery thread: one attempt at a time, in (due, queued) order."""
        while True:
            with self._lock:
                attempt = self._next_attempt_locked()
                if attempt is None:
                    return  # stopping
                self._delivering += 1
            delivery, url, payload, header = attempt
            status, error = self._post_webhook(url, payload, header)
            with self._lock:
                self._delivering -= 1
                self._record_attempt_locked(delivery, url, status, error)
                self._wakeup.notify_all()

    def _next_attempt_locked(self) -> tuple[_Delivery, str, bytes, str] | None:
        while not self._stopping:
            # Error reports come due on this thread too (and queue their notifications).
            report_in = self._error_report_wait_locked()
            if self._deliveries_held or not self._queue:
                self._wakeup.wait(report_in)
                continue
            wait = self._queue[0].due - time.monotonic()
            if wait > 0:
                self._wakeup.wait(wait if report_in is None else min(wait, report_in))
                continue
            delivery = heapq.heappop(self._queue)
            endpoint = self._target_locked(delivery.endpoint_id)
            payload = self._event_payloads.get(delivery.event_id)
            if endpoint is None or payload is None or endpoint.obj["status"] != "enabled":
                self._wakeup.notify_all()  # deleted or disabled target, or reset
                continue
            now = self._now()
            endpoint.secrets = [
                (secret, expires)
                for secret, expires in endpoint.secrets
                if expires is None or expires > now
            ]
            timestamp = int(time.time())  # what construct_event's tolerance compares with
            header = f"t={timestamp}," + ",".join(
                f"v1={_signature(payload, secret, timestamp)}" for secret, _ in endpoint.secrets
            )
            return delivery, _target_url(endpoint.obj), payload, header
        return None

    def _post_webhook(self, url: str, payload: bytes, header: str) -> tuple[int | None, str | None]:
        request = urllib.request.Request(
            url,
            data=payload,
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": WEBHOOK_USER_AGENT,
                "Accept": "*/*; q=0.5, application/xml",
                "Cache-Control": "no-cache",
                "Stripe-Signature": header,
            },
        )
        try:
            with _WEBHOOK_OPENER.open(request, timeout=self._webhook_timeout) as response:
                response.read()
                return response.status, None
        except urllib.error.HTTPError as error:
            error.close()
            return error.code, None
        except urllib.error.URLError as error:
            return None, str(error.reason)
        except (OSError, http.client.HTTPException) as error:
            return None, f"{type(error).__name__}: {error}"

    def _record_attempt_locked(
        self, delivery: _Delivery, url: str, status: int | None, error: str | None
    ) -> None:
        if delivery.generation != self._generation:
            return  # reset() ran meanwhile
        event = self._stripe_events.get(delivery.event_id) or self._v2_events.get(delivery.event_id)
        self._deliveries.append(
            {
                "event_id": delivery.event_id,
                "endpoint_id": delivery.endpoint_id,
                "target": (
                    "event_destination"
                    if delivery.endpoint_id.startswith("ed_")
                    else "webhook_endpoint"
                ),
                "url": url,
                "type": event["type"] if event else None,
                "attempt": delivery.attempt,
                "at": time.time(),
                "status": status,
                "error": error,
            }
        )
        if status is not None and 200 <= status < 300:
            log.info("webhook %s -> %s %s", delivery.event_id, url, status)
            if event is not None and "pending_webhooks" in event:
                event["pending_webhooks"] = max(0, event["pending_webhooks"] - 1)
            return
        retry = delivery.attempt < self._webhook_max_attempts
        log.info(
            "webhook %s -> %s failed (attempt %s: %s)%s",
            delivery.event_id,
            url,
            delivery.attempt,
            status or error,
            ", will retry" if retry else ", giving up",
        )
        if retry and self._target_locked(delivery.endpoint_id) is not None:
            delay = self._webhook_retry_seconds * 2 ** (delivery.attempt - 1)
            self._enqueue_locked(
                delivery.event_id, delivery.endpoint_id, delivery.attempt + 1, delay
            )

    # -- routing -----------------------------------------------------------------------------

    def _route(self, method: str, target: str, headers: Message, body: bytes) -> _Response:
        parts = urlsplit(target)
        path = parts.path
        if method == "POST" and path == METER_EVENTS_PATH:
            return self._meter_event(
                headers.get("Authorization"), headers.get("Idempotency-Key"), body
            )
        if path.startswith("/_fake/"):
            admin = self._admin(method, path, body)
            if admin is not None:
                return admin
        for route_method, pattern, handler in self._api_routes:
            match = pattern.fullmatch(path)
            if match is not None and route_method == method:
                ids = [unquote(group) for group in match.groups()]
                return self._api_call(handler, ids, method, path, parts.query, headers, body)
        return _error(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )

    def _admin(self, method: str, path: str, body: bytes = b"") -> _Response | None:
        """The /_fake/ routes: inspection and control for humans and tests, not Stripe API."""
        if method == "GET" and path == "/_fake/meter_events":
            return _Response(200, self.snapshot())
        if method == "GET" and path == "/_fake/billing_periods":
            rows = [
                {
                    "customer": customer,
                    "event_name": event_name,
                    "period_start": start,
                    "period_end": end,
                    "value": value,
                }
                for (customer, event_name, start, end), value in self.totals_by_period().items()
            ]
            return _Response(200, {"data": rows})
        if method == "GET" and path == "/_fake/deliveries":
            return _Response(200, {"data": self.deliveries})
        if method == "GET" and path == "/_fake/error_reports":
            return _Response(200, {"data": self.error_reports})
        if method == "POST" and path == "/_fake/error_reports/flush":
            return _Response(200, {"data": self.flush_error_reports()})
        if method == "POST" and path == "/_fake/summary_offsets":
            return self._admin_summary_offset(body)
        if method == "POST" and path == "/_fake/reset":
            self.reset()
            return _Response(200, {"reset": True})
        match = re.fullmatch(r"/_fake/subscriptions/([^/]+)/renew", path)
        if method == "POST" and match is not None:
            subscription_id = unquote(match.group(1))
            try:
                return _Response(200, self.renew_subscription(subscription_id))
            except KeyError:
                return _no_such("subscription", subscription_id).response
            except ValueError as error:
                return _error(400, str(error))
        return None

    def _admin_summary_offset(self, body: bytes) -> _Response:
        """POST /_fake/summary_offsets {customer, event_name, delta, timestamp?}."""
        try:
            spec = {
                "customer": "string",
                "event_name": "string",
                "delta": "number",
                "timestamp": "integer",
            }
            try:
                decoded = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise _invalid("The request body is not valid JSON.") from None
            if not isinstance(decoded, dict):
                raise _invalid("The request body must be a JSON object.")
            for key, value in decoded.items():
                kind = spec.get(key)
                if kind is None:
                    raise _invalid(f"Received unknown parameter: {key}", param=key)
                valid = (
                    isinstance(value, str) and bool(value)
                    if kind == "string"
                    else isinstance(value, int | float) and not isinstance(value, bool)
                )
                if not valid or (kind == "integer" and not isinstance(value, int)):
                    raise _invalid(f"Invalid {key}: {value!r}", param=key)
            for key in ("customer", "event_name", "delta"):
                _required(decoded, key)
        except _ApiError as error:
            return error.response
        self.inject_summary_offset(
            decoded["customer"],
            decoded["event_name"],
            decoded["delta"],
            timestamp=decoded.get("timestamp"),
        )
        return _Response(200, {"injected": decoded})


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
        description="Loopback stand-in for the parts of Stripe the usage meter uses.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=12111, help="0 picks a free port")
    parser.add_argument(
        "--webhook-url", help="register a webhook endpoint for every event type at start"
    )
    parser.add_argument(
        "--webhook-secret", help="its signing secret (whsec_...); made up when not given"
    )
    parser.add_argument(
        "--async-validation",
        action="store_true",
        help="answer 200 for meter events Stripe rejects later, and report them as v2 events",
    )
    parser.add_argument(
        "--error-report-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long failures gather before an error report (default 0)",
    )
    parser.add_argument(
        "--summary-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long before an accepted event shows in meter event summaries (default 0)",
    )
    parser.add_argument(
        "--event-destination-url",
        help="register a thin-event destination for the meter error reports at start",
    )
    parser.add_argument(
        "--event-destination-secret",
        help="its signing secret (whsec_...); made up when not given",
    )
    args = parser.parse_args(argv)
    if args.webhook_secret and not args.webhook_url:
        parser.error("--webhook-secret needs --webhook-url")
    if args.webhook_secret and not args.webhook_secret.startswith("whsec_"):
        parser.error("--webhook-secret looks like whsec_...")
    if args.event_destination_secret and not args.event_destination_url:
        parser.error("--event-destination-secret needs --event-destination-url")
    if args.event_destination_secret and not args.event_destination_secret.startswith("whsec_"):
        parser.error("--event-destination-secret looks like whsec_...")
    if args.error_report_delay < 0 or args.summary_delay < 0:
        parser.error("--error-report-delay and --summary-delay cannot be negative")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger(__name__).setLevel(logging.INFO)

    stopping = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    fake = FakeStripe(
        args.host,
        args.port,
        async_validation=args.async_validation,
        error_report_delay=args.error_report_delay,
        summary_delay=args.summary_delay,
    )
    endpoint = destination = None
    if args.webhook_url:
        try:
            endpoint = fake.add_webhook_endpoint(args.webhook_url, secret=args.webhook_secret)
        except ValueError as error:
            print(f"fake Stripe cannot deliver webhooks there: {error}", file=sys.stderr)
            return 2
    if args.event_destination_url:
        try:
            destination = fake.add_event_destination(
                args.event_destination_url, secret=args.event_destination_secret
            )
        except ValueError as error:
            print(f"fake Stripe cannot deliver event notifications there: {error}", file=sys.stderr)
            return 2
    try:
        fake.start()
    except OSError as error:
        print(f"fake Stripe cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    print(f"fake Stripe listening on {fake.url} (Ctrl-C to stop)", flush=True)
    if endpoint is not None:
        print(
            f"fake Stripe sends every event to {endpoint['url']} ({endpoint['id']}, "
            f"signing secret {endpoint['secret']})",
            flush=True,
        )
    if destination is not None:
        print(
            f"fake Stripe sends {', '.join(destination['enabled_events'])} thin events to "
            f"{destination['webhook_endpoint']['url']} ({destination['id']}, signing secret "
            f"{destination['secret']})",
            flush=True,
        )
    if args.async_validation:
        print(
            "fake Stripe validates meter events asynchronously "
            f"(error reports after {args.error_report_delay:g} s)",
            flush=True,
        )
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
