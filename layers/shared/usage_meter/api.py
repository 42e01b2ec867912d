"""The HTTP API (DESIGN §4): request parsing, routes, and the one place errors become HTTP.

Cold start (issue 13): each function imports what its own routes use, and nothing more. The
record routes' logic is imported by record_api, the read routes' by read_api, and the routes run
on the small router below (API Gateway's HTTP API, payload 2.0) rather than on Powertools' event
handler, whose package imports every resolver it has (REST, ALB, AppSync, Bedrock, VPC Lattice)
and its OpenAPI machinery: on Lambda, where nothing of the layer is precompiled, that was about
a fifth of these functions' init. The router answers as Powertools' APIGatewayHttpResolver did:
the same route patterns, exception handlers looked up by class, the same CORS headers and
preflight answers, and the same response shape. Powertools still logs and publishes metrics.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.metrics import MetricUnit
from pydantic import BaseModel, TypeAdapter, ValidationError

from usage_meter.errors import (
    IdempotencyConflict,
    InternalError,
    InvalidJson,
    NotFound,
    PayloadTooLarge,
    PeriodClosed,
    StoreUnavailable,
    UsageMeterError,
    ValidationFailed,
)
from usage_meter.logic.auth import (
    USAGE_ROUTE,
    Forbidden,
    Unauthenticated,
    authorize,
    from_context,
    issue_portal_token,
)
from usage_meter.models.input import BatchIn, CustomerId, EventIn, PortalTokenIn
from usage_meter.models.output import BatchOut, ErrorBody, ErrorOut, PortalTokenOut, RecordOut
from usage_meter.observability import logger, metrics

if TYPE_CHECKING:
    from usage_meter.logic.record import LateUsage
    from usage_meter.models.domain import RecordResult
    from usage_meter.store import EventStore, UsageReader

MAX_BODY_BYTES = 64 * 1024
Clock = Callable[[], datetime]

_STATUS: dict[type[UsageMeterError], HTTPStatus] = {
    InvalidJson: HTTPStatus.BAD_REQUEST,
    NotFound: HTTPStatus.NOT_FOUND,
    IdempotencyConflict: HTTPStatus.CONFLICT,
    PayloadTooLarge: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ValidationFailed: HTTPStatus.UNPROCESSABLE_ENTITY,
    PeriodClosed: HTTPStatus.UNPROCESSABLE_ENTITY,
    StoreUnavailable: HTTPStatus.SERVICE_UNAVAILABLE,
    Unauthenticated: HTTPStatus.UNAUTHORIZED,
    Forbidden: HTTPStatus.FORBIDDEN,
}


def utc_now() -> datetime:
    return datetime.now(UTC)


def _count(results: list[RecordResult]) -> None:
    duplicates = sum(r.duplicate for r in results)
    metrics.add_metric(
        name="EventsAccepted", unit=MetricUnit.Count, value=len(results) - duplicates
    )
    metrics.add_metric(name="EventsDuplicate", unit=MetricUnit.Count, value=duplicates)


# -- the router: API Gateway HTTP API events (payload 2.0) ---------------------------------------

APPLICATION_JSON = "application/json"
# Route parameters match what Powertools' resolver matched: RFC 3986's characters, percent
# escapes left as they came.
_PARAMETER = re.compile(r"<(\w+)>")
_PARAMETER_VALUE = r"[-._~()'!*:@,;=+&$%<> \[\]{}|^\w]+"
# The headers a browser may send cross-origin: Powertools' defaults plus the configured ones.
_CORS_HEADERS = ("Authorization", "Content-Type", "X-Amz-Date", "X-Api-Key", "X-Amz-Security-Token")


@dataclass
class Response:
    status_code: int
    body: str = ""
    content_type: str | None = APPLICATION_JSON
    headers: dict[str, str] = field(default_factory=dict)


class HttpRequest:
    """The parts of an HTTP API event the routes read."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        self.raw_event = event
        context = event.get("requestContext") or {}
        self.method = str((context.get("http") or {}).get("method", "")).upper()
        path, stage = str(event.get("rawPath") or "/"), context.get("stage", "$default")
        self.path = path if stage == "$default" else path[len(f"/{stage}") :]
        # API Gateway lowercases header names; a test or a local run may not.
        self.headers = {str(k).lower(): v for k, v in (event.get("headers") or {}).items()}

    @functools.cached_property
    def decoded_body(self) -> str | None:
        """The body as text; base64-decoded when API Gateway encoded it (binascii.Error or
        UnicodeDecodeError when that is not UTF-8 text)."""
        body: str | None = self.raw_event.get("body")
        if self.raw_event.get("isBase64Encoded") and body:
            return base64.b64decode(body.encode()).decode()
        return body


@dataclass(frozen=True)
class Cors:
    """CORS answers for browser origins: `*` allows every origin."""

    origins: tuple[str, ...]
    allow_headers: Sequence[str] = ()
    max_age: int | None = None

    def headers(self, origin_header: Any) -> dict[str, str]:
        # A header API Gateway joined with commas counts by its first value.
        origin = origin_header.split(",")[0] if isinstance(origin_header, str) else None
        if origin is None:
            return {}
        if origin not in self.origins:
            if "*" not in self.origins:
                return {}
            origin = "*"  # any origin, an empty one included, as Powertools answered
        if not origin:
            return {}
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Headers": ",".join(sorted({*_CORS_HEADERS, *self.allow_headers})),
        }
        if self.max_age is not None:
            headers["Access-Control-Max-Age"] = str(self.max_age)
        return headers


Route = Callable[..., Response]
ErrorHandler = Callable[[Any], Response]


class HttpRouter:
    """Routes `METHOD /path/<parameter>` to functions and turns what they return or raise into
    API Gateway's response: statusCode, body, isBase64Encoded, headers, cookies."""

    def __init__(self, cors: Cors | None = None) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Route]] = []
        self._handlers: dict[type[BaseException], ErrorHandler] = {}
        self._not_found: Callable[[], Response] | None = None
        self._cors = cors
        self._cors_methods = {"OPTIONS"}
        self._request: HttpRequest | None = None

    @property
    def current_event(self) -> HttpRequest:
        if self._request is None:
            raise RuntimeError("no request is being resolved")
        return self._request

    def route(self, method: str, rule: str) -> Callable[[Route], Route]:
        regex = _PARAMETER.sub(lambda name: f"(?P<{name[1]}>{_PARAMETER_VALUE})", rule)
        pattern = re.compile(f"^{regex}$")

        def register(func: Route) -> Route:
            self._routes.append((method.upper(), pattern, func))
            if self._cors is not None:
                self._cors_methods.add(method.upper())
            return func

        return register

    def get(self, rule: str) -> Callable[[Route], Route]:
        return self.route("GET", rule)

    def post(self, rule: str) -> Callable[[Route], Route]:
        return self.route("POST", rule)

    def exception_handler[E: BaseException](
        self, error_class: type[E]
    ) -> Callable[[Callable[[E], Response]], Callable[[E], Response]]:
        def register(func: Callable[[E], Response]) -> Callable[[E], Response]:
            self._handlers[error_class] = func
            return func

        return register

    def not_found(self, func: Callable[[], Response]) -> Callable[[], Response]:
        self._not_found = func
        return func

    def resolve(self, event: Mapping[str, Any], context: object = None) -> dict[str, Any]:
        request = self._request = HttpRequest(event)
        try:
            response = self._dispatch(request)
        finally:
            self._request = None
        headers = dict(response.headers)
        if response.content_type:
            headers.setdefault("Content-Type", response.content_type)
        if self._cors is not None:
            headers.update(self._cors.headers(request.headers.get("origin")))
        return {
            "statusCode": int(response.status_code),
            "body": response.body,
            "isBase64Encoded": False,
            "headers": headers,
            "cookies": [],
        }

    def _dispatch(self, request: HttpRequest) -> Response:
        for method, pattern, func in self._routes:
            if method == request.method and (found := pattern.match(request.path)):
                return self._call(func, found.groupdict())
        return self._call(self._no_route, {})

    def _no_route(self) -> Response:
        if self._cors is not None and self.current_event.method == "OPTIONS":
            # A browser's preflight: answered here, for every route of this function.
            methods = ",".join(sorted(self._cors_methods))
            return Response(
                204, content_type=None, headers={"Access-Control-Allow-Methods": methods}
            )
        if self._not_found is None:
            return Response(HTTPStatus.NOT_FOUND, '{"message":"Not found"}')
        return self._not_found()

    def _call(self, func: Route, arguments: dict[str, str]) -> Response:
        try:
            return func(**arguments)
        except Exception as error:
            handler = next(
                (self._handlers[c] for c in type(error).__mro__ if c in self._handlers), None
            )
            if handler is None:
                raise
            return handler(error)


# -- answers -------------------------------------------------------------------------------------


def _json(status: int, body: BaseModel) -> Response:
    return Response(status, body.model_dump_json(exclude_none=True))


def _error(status: HTTPStatus, error: UsageMeterError) -> Response:
    body = ErrorOut(error=ErrorBody(code=error.code, message=error.message, details=error.details))
    return _json(status, body)


def _resolver(cors: Cors | None = None) -> HttpRouter:
    app = HttpRouter(cors)

    @app.exception_handler(UsageMeterError)
    def _domain_error(error: UsageMeterError) -> Response:
        return _error(_STATUS.get(type(error), HTTPStatus.BAD_REQUEST), error)

    @app.not_found
    def _not_found() -> Response:
        return _error(HTTPStatus.NOT_FOUND, NotFound("no such route"))

    @app.exception_handler(Exception)
    def _internal(error: Exception) -> Response:
        logger.exception("request failed")
        problem = InternalError("internal error; the request may be retried")
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, problem)

    return app


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):  # linear: a hostile body may hold thousands of keys
        counts = Counter(key for key, _ in pairs)
        repeated = sorted(key for key, count in counts.items() if count > 1)
        raise ValueError(f"duplicate keys: {', '.join(repeated)}")
    return found


def parse_json_body(body: str | None) -> Any:
    """The body as JSON: at most 64 KiB, no NaN or Infinity, no repeated keys."""
    raw = body or ""
    if len(raw.encode()) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except ValueError as error:
        raise InvalidJson(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidJson("the body is not valid JSON: nested too deeply") from None


def _json_body(app: HttpRouter) -> Any:
    try:
        raw = app.current_event.decoded_body
    except (UnicodeDecodeError, binascii.Error):  # base64 that is not UTF-8 text
        raise InvalidJson("the body is not UTF-8 JSON") from None
    return parse_json_body(raw)


def _location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _message(error: Any) -> str:
    """pydantic's message, without its class names ("instance of EventIn")."""
    if error["type"] == "model_type":
        return "Input should be a JSON object"
    return str(error["msg"])


def validate[M: BaseModel](model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        details = [
            {"field": _location(e["loc"]), "message": _message(e), "type": e["type"]}
            for e in error.errors(include_url=False, include_input=False)
        ]
        raise ValidationFailed("the request is not valid", details) from None


def record_api(
    *,
    meters: Mapping[str, object],
    store: EventStore,
    now: Clock = utc_now,
    late: LateUsage | None = None,
) -> HttpRouter:
    from usage_meter.logic.record import DEFAULT_LATE_USAGE, record_events

    late = late or DEFAULT_LATE_USAGE
    app = _resolver()

    @app.post("/v1/events")
    def record_one() -> Response:
        _authorize(app, "POST /v1/events", now)
        data = _json_body(app)
        header_key = app.current_event.headers.get("idempotency-key")
        if (
            header_key is not None
            and isinstance(data, dict)
            and data.setdefault("idempotency_key", header_key) != header_key
        ):
            raise ValidationFailed(
                "the Idempotency-Key header and the body's idempotency_key differ",
                [
                    {
                        "field": "idempotency_key",
                        "message": "differs from the Idempotency-Key header",
                    }
                ],
            )
        event = validate(EventIn, data)
        [result] = record_events([event], meters=meters, store=store, now=now(), late=late)
        _count([result])
        status = HTTPStatus.OK if result.duplicate else HTTPStatus.ACCEPTED
        return _json(status, RecordOut(id=result.id, duplicate=result.duplicate))

    @app.post("/v1/events/batch")
    def record_batch() -> Response:
        _authorize(app, "POST /v1/events/batch", now)
        data = _json_body(app)
        if app.current_event.headers.get("idempotency-key") is not None:
            raise ValidationFailed(
                "a batch takes an idempotency_key per event, not an Idempotency-Key header",
                [{"field": "Idempotency-Key", "message": "not accepted on the batch route"}],
            )
        batch = validate(BatchIn, data)
        results = record_events(
            batch.events, meters=meters, store=store, now=now(), batch=True, late=late
        )
        _count(results)
        out = BatchOut(results=[RecordOut(id=r.id, duplicate=r.duplicate) for r in results])
        return _json(HTTPStatus.ACCEPTED, out)

    return app


def read_api(
    *,
    included: Mapping[str, int],
    store: UsageReader,
    now: Clock = utc_now,
    token_secret: Callable[[], bytes] | None = None,
    portal_origins: Sequence[str] = (),
) -> HttpRouter:
    from usage_meter.logic.usage import current_usage

    # Portals read usage from the browser: their origins get CORS answers, preflights included.
    cors = (
        Cors(tuple(portal_origins), allow_headers=("Authorization", "Content-Type"), max_age=600)
        if portal_origins
        else None
    )
    app = _resolver(cors)

    @app.get("/v1/customers/<stripe_customer_id>/usage")
    def usage(stripe_customer_id: str) -> Response:
        _authorize(app, USAGE_ROUTE, now, stripe_customer_id)
        customer = _customer(stripe_customer_id)
        return _json(
            HTTPStatus.OK, current_usage(customer, included=included, store=store, now=now())
        )

    @app.post("/v1/portal-tokens")
    def portal_token() -> Response:
        _authorize(app, "POST /v1/portal-tokens", now)
        request = validate(PortalTokenIn, _json_body(app))
        if token_secret is None:
            raise RuntimeError("portal tokens are not configured")
        token, expires_at = issue_portal_token(
            request.stripe_customer_id,
            request.ttl_seconds,
            secret=token_secret(),
            now=int(now().timestamp()),
        )
        out = PortalTokenOut(token=token, expires_at=datetime.fromtimestamp(expires_at, UTC))
        return _json(HTTPStatus.CREATED, out)

    return app


@functools.cache
def _customer_id() -> TypeAdapter[str]:
    """Built on first use: only the read function checks a customer id in a path."""
    return TypeAdapter(CustomerId)


def _customer(stripe_customer_id: str) -> str:
    try:
        return _customer_id().validate_python(stripe_customer_id)
    except ValidationError:
        raise ValidationFailed(
            "not a Stripe customer id",
            [
                {
                    "field": "stripe_customer_id",
                    "message": "must be cus_ followed by letters and digits",
                }
            ],
        ) from None


def _authorize(app: HttpRouter, route_key: str, now: Clock, customer: str | None = None) -> None:
    """Checked again behind the authorizer: no request reaches the logic unauthenticated, even
    if a route were ever deployed without it, and a cached decision cannot outlive a token."""
    context = app.current_event.raw_event.get("requestContext", {}).get("authorizer", {})
    principal = from_context(context.get("lambda"), int(now().timestamp()))
    authorize(principal, route_key, customer)
