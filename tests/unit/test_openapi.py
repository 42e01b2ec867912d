"""openapi.json: generated from the pydantic models, committed, valid OpenAPI 3.1, and true to the
responses the API really sends."""

import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from pydantic import BaseModel

from devtools import openapi
from devtools.invoke import http_event
from tests.fakes import InMemoryStore
from usage_meter.api import read_api, record_api

Document = dict[str, Any]
NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
EVENT = {"stripe_customer_id": "cus_Q1w2E3r4", "meter": "ai_messages", "quantity": 1}
REF_PREFIX = "#/components/schemas/"
USAGE_ROUTE = "/v1/customers/{stripe_customer_id}/usage"
WEBHOOK_ROUTE = "/v1/stripe/webhook"  # Stripe's: signed, not keyed; its body is Stripe's event
EVENTS_ROUTE = "/v1/stripe/events"  # likewise: an event destination's thin notifications
STRIPES = {WEBHOOK_ROUTE, EVENTS_ROUTE}
ROUTES = {
    ("/v1/events", "post"): {"200", "202", "400", "401", "403", "409", "413", "422", "503"},
    ("/v1/events/batch", "post"): {"202", "400", "401", "403", "409", "413", "422", "503"},
    (USAGE_ROUTE, "get"): {"200", "401", "403", "422", "503"},
    ("/v1/portal-tokens", "post"): {"201", "400", "401", "403", "413", "422"},
    (WEBHOOK_ROUTE, "post"): {"200", "400"},
    (EVENTS_ROUTE, "post"): {"200", "400"},
}


class Context:
    function_name = "openapi"
    aws_request_id = "req-openapi"


@pytest.fixture(scope="module")
def document() -> Document:
    return openapi.build()


def refs(node: Any) -> list[str]:
    """Every `$ref` anywhere under `node`."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def operations(document: Document) -> list[tuple[str, str, Document]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


def response_schema(document: Document, path: str, method: str, status: int) -> Document:
    response = document["paths"][path][method]["responses"][str(status)]
    return dict(response["content"]["application/json"]["schema"])


def conforms(document: Document, schema: Document, instance: Any) -> bool:
    # The refs point into the document, so the document is the root they resolve against.
    root = {**schema, "components": document["components"]}
    return Draft202012Validator(root).is_valid(instance)


def schema_of(document: Document, name: str) -> Document:
    return dict(document["components"]["schemas"][name])


# --- generated, committed, valid -------------------------------------------------------------


def test_the_committed_openapi_json_is_the_one_the_models_generate() -> None:
    # Given the models as they are / When the document is generated
    expected = openapi.render(openapi.build())
    # Then the committed file is exactly that (the failure shows the diff and the command)
    problem = openapi.check(openapi.OPENAPI_PATH, expected)
    assert problem is None, problem


def test_generating_twice_gives_the_same_text() -> None:
    # Given / When the document is rendered twice / Then the text is identical
    assert openapi.render(openapi.build()) == openapi.render(openapi.build())


def test_the_document_is_valid_openapi_3_1(document: Document) -> None:
    # Given the generated document / When the OpenAPI validator reads it / Then it finds nothing
    assert document["openapi"].startswith("3.1")
    validate_openapi(document)


def test_the_document_has_exactly_the_documented_routes_and_statuses(document: Document) -> None:
    # Given the generated document / When its operations are listed
    found = {
        (path, method): set(operation["responses"])
        for path, method, operation in operations(document)
    }
    # Then they are the routes and statuses of the API, no more and no fewer
    assert found == ROUTES


def test_info_names_the_project_and_its_version(document: Document) -> None:
    # Given the project's own version
    with (openapi.ROOT / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    # When / Then the document carries it, and the local server of `make dev`
    assert (document["info"]["title"], document["info"]["version"]) == ("usage-meter", version)
    assert [server["url"] for server in document["servers"]] == ["http://127.0.0.1:3000"]


def test_every_route_needs_a_bearer_credential(document: Document) -> None:
    # Given the generated document / When its security is read
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    # Then a bearer scheme naming server keys and portal tokens applies to every route
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "umk_" in scheme["description"] and "upt_" in scheme["description"]
    assert document["security"] == [{"bearerAuth": []}]
    assert all(
        "security" not in operation
        for path, _, operation in operations(document)
        if path not in STRIPES
    )
    # Stripe's routes carry no bearer credential: their Stripe-Signature header is checked
    for webhook in [o for path, _, o in operations(document) if path in STRIPES]:
        assert webhook["security"] == []
        assert [p["name"] for p in webhook["parameters"]] == ["Stripe-Signature"]


# --- schemas come from the models ------------------------------------------------------------


def test_every_reference_resolves_to_a_published_schema(document: Document) -> None:
    # Given every $ref in the document
    targets = {ref.removeprefix(REF_PREFIX) for ref in refs(document)}
    # When / Then each points at a schema the document publishes, and none is unused
    assert all(ref.startswith(REF_PREFIX) for ref in refs(document))
    assert targets == set(document["components"]["schemas"])


def test_request_bodies_are_the_request_models(document: Document) -> None:
    # Given the request body of every operation that takes one
    bodies = {
        operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path, _, operation in operations(document)
        if "requestBody" in operation and path not in STRIPES
    }
    # When / Then they are exactly the request models, each required
    assert bodies == {REF_PREFIX + model.__name__ for model in openapi.REQUEST_MODELS}
    assert all(
        operation["requestBody"]["required"]
        for _, _, operation in operations(document)
        if "requestBody" in operation
    )


def test_responses_are_the_response_models_or_the_gateways_refusal(document: Document) -> None:
    # Given every schema a response names
    named = {
        ref.removeprefix(REF_PREFIX)
        for _, _, operation in operations(document)
        for ref in refs(operation["responses"])
    }
    # When / Then they are the response models, and the gateway's own 401/403 body
    expected = {model.__name__ for model in openapi.RESPONSE_MODELS}
    assert named == expected | {openapi.GatewayErrorOut.__name__}


@pytest.mark.parametrize(
    ("model", "mode"),
    [(model, "validation") for model in openapi.REQUEST_MODELS]
    + [(model, "serialization") for model in openapi.RESPONSE_MODELS],
)
def test_each_published_schema_is_the_models_own(
    document: Document, model: type[BaseModel], mode: openapi.Mode
) -> None:
    # Given the schema pydantic gives the model, in the mode the API uses it in
    schema = model.model_json_schema(ref_template=openapi.REF_TEMPLATE, mode=mode)
    nested = schema.pop("$defs", {})
    # When / Then the document publishes it, and its nested models, unchanged
    assert schema_of(document, model.__name__) == schema
    for name, nested_schema in nested.items():
        assert schema_of(document, name) == nested_schema


def test_quantity_is_an_integer_from_1_to_a_trillion(document: Document) -> None:
    quantity = schema_of(document, "EventIn")["properties"]["quantity"]
    assert (quantity["type"], quantity["minimum"], quantity["maximum"]) == ("integer", 1, 10**12)


def test_an_event_admits_no_unknown_fields(document: Document) -> None:
    event = schema_of(document, "EventIn")
    assert event["additionalProperties"] is False
    assert set(event["required"]) == {"stripe_customer_id", "meter", "quantity"}


def test_a_batch_holds_1_to_100_events(document: Document) -> None:
    events = schema_of(document, "BatchIn")["properties"]["events"]
    assert (events["minItems"], events["maxItems"]) == (1, 100)
    assert events["items"] == {"$ref": REF_PREFIX + "EventIn"}


def test_customer_ids_and_idempotency_keys_carry_the_models_constraints(
    document: Document,
) -> None:
    # Given the parameters of the two routes that take one
    [header] = document["paths"]["/v1/events"]["post"]["parameters"]
    [customer] = document["paths"][USAGE_ROUTE]["get"]["parameters"]
    # When / Then they hold the same constraints as the body fields
    assert (header["name"], header["in"], header["required"]) == (
        "Idempotency-Key",
        "header",
        False,
    )
    assert (header["schema"]["minLength"], header["schema"]["maxLength"]) == (1, 100)
    assert (customer["in"], customer["required"]) == ("path", True)
    assert customer["schema"]["pattern"] == "^cus_[A-Za-z0-9]+$"
    body_customer = schema_of(document, "EventIn")["properties"]["stripe_customer_id"]
    assert {k: body_customer[k] for k in customer["schema"]} == customer["schema"]


def test_a_portal_token_lives_1_minute_to_24_hours(document: Document) -> None:
    ttl = schema_of(document, "PortalTokenIn")["properties"]["ttl_seconds"]
    assert (ttl["minimum"], ttl["maximum"], ttl["default"]) == (60, 86400, 3600)


def test_the_timestamp_schema_admits_unix_seconds(document: Document) -> None:
    # Given the timestamp field as documented / When / Then an integer is one of its forms
    timestamp = schema_of(document, "EventIn")["properties"]["timestamp"]
    assert conforms(document, timestamp, 1795680000)


# --- the document matches what the API sends ------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"message": "Unauthorized"}),
        (401, {"error": {"code": "unauthorized", "message": "no authenticated caller"}}),
        (403, {"error": {"code": "forbidden", "message": "lacks the record scope", "details": []}}),
    ],
)
def test_401_admits_the_gateways_body_and_both_admit_an_error_body(
    document: Document, status: int, body: Document
) -> None:
    # Given a refusal from the gateway or from the function
    schema = response_schema(document, "/v1/events", "post", status)
    # When / Then the documented schema admits it
    assert conforms(document, schema, body)


def test_a_body_of_neither_shape_does_not_pass_as_a_refusal(document: Document) -> None:
    schema = response_schema(document, "/v1/events", "post", 401)
    assert not conforms(document, schema, {"message": "Unauthorized", "error": {}})
    assert not conforms(document, schema, {"detail": "nope"})


def _answers() -> list[tuple[str, str, int, Any]]:
    """Real responses of the API, through the resolver with an in-memory store."""
    store = InMemoryStore()
    record = record_api(meters={"ai_messages": {}}, store=store, now=lambda: NOW)
    read = read_api(included={"ai_messages": 10}, store=store, now=lambda: NOW)
    admin = {"lambda": {"kind": "key", "id": "test", "scopes": "admin"}}
    requests = [
        (record, "POST", "/v1/events", {**EVENT, "idempotency_key": "k"}),
        (record, "POST", "/v1/events", {**EVENT, "idempotency_key": "k"}),
        (record, "POST", "/v1/events", {**EVENT, "idempotency_key": "k", "quantity": 2}),
        (record, "POST", "/v1/events", {**EVENT, "quantity": 0}),
        (record, "POST", "/v1/events/batch", {"events": [EVENT, EVENT]}),
        (record, "POST", "/v1/events/batch", {"events": []}),
        (read, "GET", "/v1/customers/cus_Q1w2E3r4/usage", None),
        (read, "GET", "/v1/customers/nope/usage", None),
    ]
    answers = []
    context: Any = Context()  # the two attributes the resolver reads
    for app, method, path, body in requests:
        event = http_event(method, path, body)
        event["requestContext"]["authorizer"] = admin
        response = app.resolve(event, context)
        answers.append((method, path, response["statusCode"], json.loads(response["body"])))
    return answers


def test_what_the_api_answers_conforms_to_the_document(document: Document) -> None:
    # Given real answers of the API: new, replay, conflict, invalid, batch, usage
    answers = _answers()
    assert {status for _, _, status, _ in answers} == {200, 202, 409, 422}
    for method, path, status, body in answers:
        # When each is checked against the schema documented for its route and status
        route = USAGE_ROUTE if path.endswith("/usage") else path
        schema = response_schema(document, route, method.lower(), status)
        # Then it conforms
        assert conforms(document, schema, body), (method, path, status, body)


# --- the command -----------------------------------------------------------------------------


def test_check_passes_on_a_fresh_file_and_fails_on_a_stale_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a file the command wrote
    target = tmp_path / "openapi.json"
    assert openapi.main(["--output", str(target)]) == 0
    assert openapi.main(["--check", "--output", str(target)]) == 0
    # When it drifts from the models
    stale = json.loads(target.read_text())
    stale["components"]["schemas"]["BatchIn"]["properties"]["events"]["maxItems"] = 99
    target.write_text(openapi.render(stale))
    capsys.readouterr()
    # Then --check exits 1 with the diff and the command that fixes it
    assert openapi.main(["--check", "--output", str(target)]) == 1
    message = capsys.readouterr().err
    assert '-            "maxItems": 99,' in message and '+            "maxItems": 100,' in message
    assert "run `make openapi`" in message


def test_check_fails_when_the_file_is_missing(tmp_path: Path) -> None:
    assert openapi.main(["--check", "--output", str(tmp_path / "openapi.json")]) == 1
