"""The OpenAPI 3.1 document of the HTTP API, generated from the pydantic models.

Every body schema comes from `model_json_schema()` of the request models (validation mode) and the
response models (serialization mode), and the parameters from the same annotated types the API
validates with, so a constraint changed on a model changes the document. Only the paths, statuses
and prose are written here.

    make openapi                                         # rewrite openapi.json
    PYTHONPATH=layers/shared python -m devtools.openapi --check   # exit 1 when it is stale
"""

import argparse
import difflib
import json
import sys
import tomllib
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter

from usage_meter.api import MAX_BODY_BYTES
from usage_meter.models.input import BatchIn, CustomerId, EventIn, IdempotencyKey, PortalTokenIn
from usage_meter.models.output import (
    BatchOut,
    ErrorOut,
    PortalTokenOut,
    RecordOut,
    UsageOut,
)

ROOT = Path(__file__).resolve().parents[1]
OPENAPI_PATH = ROOT / "openapi.json"
REF_TEMPLATE = "#/components/schemas/{model}"
LOCAL_SERVER = "http://127.0.0.1:3000"

REQUEST_MODELS: tuple[type[BaseModel], ...] = (EventIn, BatchIn, PortalTokenIn)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    RecordOut,
    BatchOut,
    UsageOut,
    ErrorOut,
    PortalTokenOut,
)

Schema = dict[str, Any]
Mode = Literal["validation", "serialization"]


class GatewayErrorOut(BaseModel):
    """What API Gateway itself answers before any function runs: `{"message": "Unauthorized"}`
    (401) for a request without an Authorization header."""

    model_config = ConfigDict(extra="forbid")

    message: str


BEARER_AUTH: Schema = {
    "type": "http",
    "scheme": "bearer",
    "description": (
        "`Authorization: Bearer <credential>`. Either a server key `umk_...` with scopes "
        "`record` (POST /v1/events, POST /v1/events/batch), `read` (GET usage of any customer, "
        "POST /v1/portal-tokens) or `admin` (everything), or a portal token `upt_...`, valid "
        "only for GET /v1/customers/{stripe_customer_id}/usage of the customer it was issued for."
    ),
}

ERROR_WHEN: dict[int, str] = {
    400: "`invalid_json`: the body is not JSON (NaN, Infinity and repeated keys count as not JSON)",
    401: (
        'no Authorization header (API Gateway\'s `{"message": "Unauthorized"}`), or a '
        "malformed, unknown, revoked or expired credential (`unauthorized`, the message says why)"
    ),
    403: (
        "`forbidden`: a valid credential without the scope, or a portal token for another customer"
    ),
    409: "`idempotency_conflict`: an idempotency key was reused with a different body",
    413: f"`payload_too_large`: the body is over {MAX_BODY_BYTES // 1024} KiB",
    422: (
        "`validation_error`: a field is missing, of the wrong type, out of range or unknown; "
        "`details` names each field"
    ),
    503: "`temporarily_unavailable`: the table stayed busy after retries; safe to retry",
}
# The gateway answers this itself, in its own shape, when the Authorization header is missing.
GATEWAY_STATUSES = frozenset({401})


class _Components:
    """Collects every model's schema and its nested `$defs` under one name each."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}

    def ref(self, model: type[BaseModel], mode: Mode) -> Schema:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode=mode)
        for name, nested in schema.pop("$defs", {}).items():
            self._add(name, nested)
        self._add(model.__name__, schema)
        return {"$ref": REF_TEMPLATE.format(model=model.__name__)}

    def _add(self, name: str, schema: Schema) -> None:
        # Two models must not publish different schemas under one name (validation and
        # serialization schemas of one model can differ).
        if self.schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are named {name}")


def _json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _response(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": _json_content(schema)}


def _errors(components: _Components, *statuses: int) -> dict[str, Schema]:
    error = components.ref(ErrorOut, "serialization")
    gateway_or_error = {"oneOf": [error, components.ref(GatewayErrorOut, "serialization")]}
    return {
        str(status): _response(
            ERROR_WHEN[status], gateway_or_error if status in GATEWAY_STATUSES else error
        )
        for status in statuses
    }


def _operation(
    components: _Components,
    *,
    operation_id: str,
    tag: str,
    summary: str,
    description: str,
    request: type[BaseModel] | None,
    success: dict[int, tuple[str, type[BaseModel]]],
    errors: tuple[int, ...],
    parameters: list[Schema] | None = None,
) -> Schema:
    operation: Schema = {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
        "description": description,
        "responses": {
            **{
                str(int(status)): _response(text, components.ref(model, "serialization"))
                for status, (text, model) in success.items()
            },
            **_errors(components, *errors),
        },
    }
    if request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": _json_content(components.ref(request, "validation")),
        }
    if parameters:
        operation["parameters"] = parameters
    return operation


def _signed_by_stripe(
    components: _Components, *, operation_id: str, summary: str, description: str
) -> Schema:
    """A route Stripe calls: no bearer credential, a Stripe-Signature header, Stripe's body."""
    received: Schema = {
        "type": "object",
        "properties": {"received": {"type": "boolean"}, "handled": {"type": "boolean"}},
        "required": ["received", "handled"],
    }
    return {
        "operationId": operation_id,
        "tags": ["stripe"],
        "summary": summary,
        "description": description,
        "security": [],
        "parameters": [
            {
                "name": "Stripe-Signature",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "`t=<unix>,v1=<hex HMAC-SHA256>`, as Stripe sends it.",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            "200": _response("received", received),
            "400": _response(
                "not signed by Stripe with this route's secret, or too old",
                components.ref(ErrorOut, "serialization"),
            ),
        },
    }


def _version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return str(tomllib.load(file)["project"]["version"])


def build() -> Schema:
    """The whole document, as a JSON-ready dict."""
    components = _Components()
    idempotency_header: Schema = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "The body's `idempotency_key` as a header; when both are sent they agree.",
        "schema": TypeAdapter(IdempotencyKey).json_schema(),
    }
    customer_path: Schema = {
        "name": "stripe_customer_id",
        "in": "path",
        "required": True,
        "description": "The Stripe customer id: `cus_` followed by letters and digits.",
        "schema": TypeAdapter(CustomerId).json_schema(),
    }
    paths: Schema = {
        "/v1/events": {
            "post": _operation(
                components,
                operation_id="recordEvent",
                tag="events",
                summary="Record one event",
                description=(
                    "A new (customer, idempotency key) answers 202; the same key with the same "
                    "body answers 200 with the original id and changes nothing; the same key "
                    "with another body answers 409. `timestamp` may be at most 5 minutes ahead "
                    "and 33 days old. The event counts in the customer's Stripe subscription "
                    "period that contains its time (a UTC calendar month without one). Under "
                    "LateUsagePolicy `reject`, an event for a period whose invoice is finalized "
                    "answers 422 `period_closed` naming the period; under `current_period` it "
                    "counts in the current period. A rejected request stores nothing."
                ),
                request=EventIn,
                success={
                    HTTPStatus.ACCEPTED: ("recorded", RecordOut),
                    HTTPStatus.OK: ("a replay: the original id, `duplicate: true`", RecordOut),
                },
                errors=(400, 401, 403, 409, 413, 422, 503),
                parameters=[idempotency_header],
            )
        },
        "/v1/events/batch": {
            "post": _operation(
                components,
                operation_id="recordEvents",
                tag="events",
                summary="Record 1 to 100 events",
                description=(
                    "All-or-nothing: one invalid event answers 422 naming its index "
                    "(`events[1].quantity`) and nothing is stored. Each event is deduplicated "
                    "as on POST /v1/events; results come back in request order. The "
                    "Idempotency-Key header is refused here: use `idempotency_key` per event."
                ),
                request=BatchIn,
                success={HTTPStatus.ACCEPTED: ("recorded, in request order", BatchOut)},
                errors=(400, 401, 403, 409, 413, 422, 503),
            )
        },
        "/v1/customers/{stripe_customer_id}/usage": {
            "get": _operation(
                components,
                operation_id="getUsage",
                tag="usage",
                summary="A customer's usage in the current billing period",
                description=(
                    "Every configured meter appears, with zeros when unused; "
                    "`quantity = reported + pending`."
                ),
                request=None,
                success={HTTPStatus.OK: ("the current period's usage", UsageOut)},
                errors=(401, 403, 422, 503),
                parameters=[customer_path],
            )
        },
        "/v1/portal-tokens": {
            "post": _operation(
                components,
                operation_id="createPortalToken",
                tag="portal",
                summary="Issue a portal token for one customer",
                description=(
                    "Needs scope `read`. The token reads only GET "
                    "/v1/customers/{stripe_customer_id}/usage of that customer, until it expires."
                ),
                request=PortalTokenIn,
                success={HTTPStatus.CREATED: ("the token, shown once", PortalTokenOut)},
                errors=(400, 401, 403, 413, 422),
            )
        },
        "/v1/stripe/webhook": {
            "post": _signed_by_stripe(
                components,
                operation_id="stripeWebhook",
                summary="Stripe's subscription events (register this URL in Stripe)",
                description=(
                    "Consumes customer.subscription.created, .updated, .deleted, .paused and "
                    ".resumed to keep each customer's billing periods. No API key: the "
                    "Stripe-Signature header must verify against the endpoint's signing secret "
                    "within 300 s, or the answer is 400 and nothing changes. Each event id is "
                    "handled once; the subscription is read again from Stripe, so duplicates and "
                    "out-of-order deliveries store Stripe's current state. Other event types "
                    "answer 200 with `handled: false`."
                ),
            )
        },
        "/v1/stripe/events": {
            "post": _signed_by_stripe(
                components,
                operation_id="stripeEventNotification",
                summary="Stripe's thin event notifications (register as an event destination)",
                description=(
                    "Consumes v1.billing.meter.error_report_triggered and "
                    "v1.billing.meter.no_meter_found: meter events Stripe answered 200 for and "
                    "rejected afterwards. The notification is verified with the SDK's "
                    "parse_event_notification (Stripe-Signature, 300 s), the event fetched from "
                    "Stripe, and the units of every sampled identifier go from reported back to "
                    "the quarantine with Stripe's code. Each event id is handled once; other "
                    "types answer 200 with `handled: false`; a bad signature answers 400."
                ),
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "usage-meter",
            "version": _version(),
            "description": (
                "Records usage events, reports them to Stripe Billing Meters exactly once, and "
                "serves each customer's current-period usage. Generated from the pydantic models "
                "by `make openapi`; do not edit by hand."
            ),
        },
        "servers": [{"url": LOCAL_SERVER, "description": "local: make dev"}],
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "events", "description": "record usage"},
            {"name": "usage", "description": "read usage"},
            {"name": "portal", "description": "customer-scoped read tokens"},
            {"name": "stripe", "description": "Stripe's webhooks"},
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": BEARER_AUTH},
            "schemas": components.schemas,
        },
    }


def render(document: Schema) -> str:
    """Stable text: sorted keys, two-space indent, a final newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def check(path: Path, expected: str) -> str | None:
    """None when `path` holds `expected`; otherwise a diff and what to do."""
    current = path.read_text() if path.exists() else ""
    if current == expected:
        return None
    diff = "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            f"{path.name} (committed)",
            f"{path.name} (generated from the models)",
        )
    )
    return f"{diff}\n{path.name} is out of date with the models: run `make openapi` and commit it."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write or check openapi.json.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=OPENAPI_PATH, help="default: %(default)s")
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        problem = check(args.output, text)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.output.name} is up to date", file=sys.stderr)
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
