"""The HTTP API (DESIGN §4): request parsing, routes, and the one place errors become HTTP."""

import binascii
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aws_lambda_powertools.event_handler import (
    APIGatewayHttpResolver,
    CORSConfig,
    Response,
    content_types,
)
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
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
from usage_meter.logic.record import DEFAULT_LATE_USAGE, LateUsage, record_events
from usage_meter.logic.usage import current_usage
from usage_meter.models.domain import RecordResult
from usage_meter.models.input import BatchIn, CustomerId, EventIn, PortalTokenIn
from usage_meter.models.output import BatchOut, ErrorBody, ErrorOut, PortalTokenOut, RecordOut
from usage_meter.observability import logger, metrics
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
_customer_id = TypeAdapter(CustomerId)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _count(results: list[RecordResult]) -> None:
    duplicates = sum(r.duplicate for r in results)
    metrics.add_metric(
        name="EventsAccepted", unit=MetricUnit.Count, value=len(results) - duplicates
    )
    metrics.add_metric(name="EventsDuplicate", unit=MetricUnit.Count, value=duplicates)


def _json(status: int, body: BaseModel) -> Response[str]:
    return Response(
        status_code=status,
        content_type=content_types.APPLICATION_JSON,
        body=body.model_dump_json(exclude_none=True),
    )


def _error(status: HTTPStatus, error: UsageMeterError) -> Response[str]:
    body = ErrorOut(error=ErrorBody(code=error.code, message=error.message, details=error.details))
    return _json(status, body)


def _resolver(cors: CORSConfig | None = None) -> APIGatewayHttpResolver:
    app = APIGatewayHttpResolver(cors=cors)

    @app.exception_handler(UsageMeterError)
    def _domain_error(error: UsageMeterError) -> Response[str]:
        return _error(_STATUS.get(type(error), HTTPStatus.BAD_REQUEST), error)

    @app.not_found
    def _not_found(_: NotFoundError) -> Response[str]:
        return _error(HTTPStatus.NOT_FOUND, NotFound("no such route"))

    @app.exception_handler(Exception)
    def _internal(error: Exception) -> Response[str]:
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


def _json_body(app: APIGatewayHttpResolver) -> Any:
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


def validate[M: BaseModel](model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        details = [
            {"field": _location(e["loc"]), "message": e["msg"], "type": e["type"]}
            for e in error.errors(include_url=False, include_input=False)
        ]
        raise ValidationFailed("the request is not valid", details) from None


def record_api(
    *,
    meters: Mapping[str, object],
    store: EventStore,
    now: Clock = utc_now,
    late: LateUsage = DEFAULT_LATE_USAGE,
) -> APIGatewayHttpResolver:
    app = _resolver()

    @app.post("/v1/events")
    def record_one() -> Response[str]:
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
    def record_batch() -> Response[str]:
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
) -> APIGatewayHttpResolver:
    # Portals read usage from the browser: their origins get CORS answers, preflights included.
    cors = (
        CORSConfig(
            allow_origin=portal_origins[0],
            extra_origins=list(portal_origins[1:]),
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
        if portal_origins
        else None
    )
    app = _resolver(cors)

    @app.get("/v1/customers/<stripe_customer_id>/usage")
    def usage(stripe_customer_id: str) -> Response[str]:
        _authorize(app, USAGE_ROUTE, now, stripe_customer_id)
        customer = _customer(stripe_customer_id)
        return _json(
            HTTPStatus.OK, current_usage(customer, included=included, store=store, now=now())
        )

    @app.post("/v1/portal-tokens")
    def portal_token() -> Response[str]:
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


def _customer(stripe_customer_id: str) -> str:
    try:
        return _customer_id.validate_python(stripe_customer_id)
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


def _authorize(
    app: APIGatewayHttpResolver, route_key: str, now: Clock, customer: str | None = None
) -> None:
    """Checked again behind the authorizer: no request reaches the logic unauthenticated, even
    if a route were ever deployed without it, and a cached decision cannot outlive a token."""
    context = app.current_event.raw_event.get("requestContext", {}).get("authorizer", {})
    principal = from_context(context.get("lambda"), int(now().timestamp()))
    authorize(principal, route_key, customer)
