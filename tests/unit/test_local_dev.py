"""The pure parts of the local stack: what it reads from template.yaml, how an HTTP request
becomes an API Gateway 2.0 event and a function's answer becomes HTTP, schedules, log lines."""

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devtools.local_api import AuthorizerCache, HttpRequest, api_event, handle, http_response
from devtools.local_lambda import (
    FunctionError,
    FunctionTimeout,
    parse_invocation_response,
    readable_log_line,
    runtime_environment,
)
from devtools.local_stack import (
    STAND_IN_KEY,
    Backends,
    ScheduledRun,
    StackState,
    run_summary,
    scheduled_event,
)
from devtools.sam_app import (
    FunctionSpec,
    Route,
    RouteTable,
    UnsupportedSchedule,
    function_for_event,
    function_specs,
    parameter_values,
    rate_seconds,
    route_table,
    schedules,
)
from devtools.template import load_template

EVENTS = Path(__file__).resolve().parents[2] / "events"
NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def template():
    return load_template()


@pytest.fixture(scope="module")
def routes(template):
    return route_table(template)


def request(method="GET", target="/", headers=(), body=b"") -> HttpRequest:
    return HttpRequest(method=method, target=target, headers=list(headers), body=body)


# -- template.yaml ------------------------------------------------------------------------------


def test_the_routes_are_the_templates_httpapi_events(routes):
    assert sorted((r.method, r.path, r.function) for r in routes.routes) == [
        ("GET", "/v1/customers/{stripe_customer_id}/usage", "ReadFunction"),
        ("OPTIONS", "/v1/customers/{stripe_customer_id}/usage", "ReadFunction"),
        ("POST", "/v1/events", "RecordFunction"),
        ("POST", "/v1/events/batch", "RecordFunction"),
        ("POST", "/v1/portal-tokens", "ReadFunction"),
        ("POST", "/v1/stripe/events", "StripeWebhookFunction"),
        ("POST", "/v1/stripe/webhook", "StripeWebhookFunction"),
    ]


def test_every_route_but_the_cors_preflight_and_stripes_webhook_has_the_authorizer(routes):
    guarded = {(r.path, r.authorizer.function if r.authorizer else None) for r in routes.routes}
    assert guarded == {
        ("/v1/customers/{stripe_customer_id}/usage", "AuthorizerFunction"),
        ("/v1/events", "AuthorizerFunction"),
        ("/v1/events/batch", "AuthorizerFunction"),
        ("/v1/portal-tokens", "AuthorizerFunction"),
        ("/v1/customers/{stripe_customer_id}/usage", None),  # the CORS preflight
        ("/v1/stripe/webhook", None),  # Stripe signs it instead
        ("/v1/stripe/events", None),
    }
    [headers] = {r.authorizer.identity_headers for r in routes.routes if r.authorizer}
    assert headers == ("Authorization",)


def test_a_path_parameter_is_matched_and_url_decoded(routes):
    match = routes.match("GET", "/v1/customers/cus_%41bc/usage")

    assert match is not None
    assert match.route.function == "ReadFunction"
    assert match.path_parameters == {"stripe_customer_id": "cus_Abc"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/events"), ("POST", "/v1/nope"), ("GET", "/v1/customers//usage"), ("GET", "/")],
)
def test_an_unknown_path_or_method_matches_no_route(routes, method, path):
    assert routes.match(method, path) is None


def test_literal_routes_win_over_parameters_greedy_paths_and_default():
    # Given routes that all match /items/new
    table = RouteTable(
        (
            Route("ANY", "$default", "Fallback"),
            Route("ANY", "/{proxy+}", "Greedy"),
            Route("GET", "/items/{id}", "ById"),
            Route("GET", "/items/new", "New"),
        )
    )

    # Then the most specific one serves each path
    assert table.match("GET", "/items/new").route.function == "New"
    assert table.match("GET", "/items/42").route.function == "ById"
    assert table.match("POST", "/items/42").route.function == "Greedy"
    assert table.match("GET", "/items/42").path_parameters == {"id": "42"}
    assert table.match("GET", "/").route.function == "Fallback"


def test_function_settings_merge_globals_with_their_own_and_resolve_refs(template):
    # Given a parameter override and a local name for the table
    parameters = parameter_values(template, {"Meters": '{"m": {}}'})

    # When the specs are read
    specs = function_specs(template, parameters, {"UsageTable": "local-table"})

    # Then the function's own settings win over Globals, and Refs are resolved
    flush, record = specs["FlushFunction"], specs["RecordFunction"]
    assert (flush.timeout_seconds, record.timeout_seconds) == (300, 10)
    assert flush.handler == "app.lambda_handler" and flush.memory_mb == 512
    assert flush.layers == ("SharedLayer",)
    assert flush.environment["TABLE_NAME"] == "local-table"
    assert flush.environment["METERS"] == '{"m": {}}'
    assert flush.environment["RETENTION_DAYS"] == "400"
    assert flush.environment["STRIPE_API_KEY_SECRET"] == "usage-meter/stripe-api-key"
    assert "STRIPE_API_KEY_SECRET" not in record.environment


def test_an_unknown_parameter_override_is_refused(template):
    with pytest.raises(ValueError, match="Nope"):
        parameter_values(template, {"Nope": "1"})


def test_the_flush_schedule_comes_from_the_template_parameter(template):
    parameters = parameter_values(template, {"FlushSchedule": "rate(1 minute)"})

    [schedule] = schedules(template, parameters)

    assert (schedule.function, schedule.expression) == ("FlushFunction", "rate(1 minute)")
    assert [s.expression for s in schedules(template, parameter_values(template))] == [
        "rate(5 minutes)"
    ]


@pytest.mark.parametrize(
    ("expression", "seconds"),
    [
        ("rate(5 minutes)", 300),
        ("rate(1 minute)", 60),
        ("rate(2 hours)", 7200),
        ("rate(1 day)", 86400),
        ("rate(30 seconds)", 30),
        (" rate( 10  Minutes ) ", 600),
    ],
)
def test_rate_expressions_give_seconds(expression, seconds):
    assert rate_seconds(expression) == seconds


@pytest.mark.parametrize(
    "expression", ["cron(0 12 * * ? *)", "rate(0 minutes)", "rate(5 weeks)", "every 5 minutes"]
)
def test_other_schedule_expressions_are_not_timed(expression):
    with pytest.raises(UnsupportedSchedule):
        rate_seconds(expression)


def functions_by_trigger(template) -> dict[str, str]:
    """Each function's triggers, read from the template's YAML: a route key ("POST /v1/events")
    or "Scheduled Event" → the function's logical ID."""
    found = {}
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        for trigger in (resource["Properties"].get("Events") or {}).values():
            properties = trigger.get("Properties") or {}
            if trigger["Type"] == "HttpApi":
                found[f"{str(properties['Method']).upper()} {properties['Path']}"] = name
            elif trigger["Type"] in ("Schedule", "ScheduleV2"):
                found["Scheduled Event"] = name
    return found


@pytest.mark.parametrize("sample", sorted(p.name for p in EVENTS.glob("*.json")))
def test_each_sample_event_names_its_function(template, routes, sample):
    event = json.loads((EVENTS / sample).read_text())

    found = function_for_event(event, routes, schedules(template, parameter_values(template)))

    trigger = event.get("routeKey") or event.get("detail-type")
    assert found == functions_by_trigger(template)[trigger]


# -- HTTP request → API Gateway HTTP API 2.0 event ----------------------------------------------


def test_a_request_becomes_a_payload_2_event(routes):
    # Given a request on the parameterised route
    incoming = request(
        "GET",
        "/v1/customers/cus_Q1/usage?x=1&x=2&y=",
        headers=[("Host", "127.0.0.1:3000"), ("X-Trace", "a"), ("x-trace", "b")],
    )
    match = routes.match("GET", "/v1/customers/cus_Q1/usage")

    # When it is turned into an event
    event = api_event(incoming, match, request_id="req-1", now=NOW)

    # Then it carries what API Gateway sends
    assert event["version"] == "2.0"
    assert event["routeKey"] == "GET /v1/customers/{stripe_customer_id}/usage"
    assert event["rawPath"] == "/v1/customers/cus_Q1/usage"
    assert event["rawQueryString"] == "x=1&x=2&y="
    assert event["queryStringParameters"] == {"x": "1,2", "y": ""}
    assert event["headers"] == {"host": "127.0.0.1:3000", "x-trace": "a,b"}
    assert event["pathParameters"] == {"stripe_customer_id": "cus_Q1"}
    context = event["requestContext"]
    assert context["http"]["method"] == "GET"
    assert context["http"]["path"] == "/v1/customers/cus_Q1/usage"
    assert context["http"]["sourceIp"] == "127.0.0.1"
    assert context["domainName"] == "127.0.0.1"
    assert context["routeKey"] == event["routeKey"] and context["requestId"] == "req-1"
    assert context["time"] == "26/Nov/2026:08:00:00 +0000"
    assert context["timeEpoch"] == int(NOW.timestamp() * 1000)
    assert "body" not in event and event["isBase64Encoded"] is False


def test_a_json_body_is_passed_as_text(routes):
    body = b'{"quantity": 1, "note": "caf\xc3\xa9"}'
    incoming = request("POST", "/v1/events", [("Content-Type", "application/json")], body)

    event = api_event(incoming, routes.match("POST", "/v1/events"))

    assert event["body"] == body.decode()
    assert event["isBase64Encoded"] is False
    assert "pathParameters" not in event


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/octet-stream", b'{"a": 1}'),
        ("image/png", b"\x89PNG\r\n\x1a\n\x00"),
        ("application/json", b"\xff\xfe not utf-8"),
        (None, b"raw"),
    ],
)
def test_a_binary_body_is_base64_encoded(routes, content_type, body):
    headers = [("Content-Type", content_type)] if content_type else []
    incoming = request("POST", "/v1/events", headers, body)

    event = api_event(incoming, routes.match("POST", "/v1/events"))

    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body


def test_cookies_leave_the_headers_for_their_own_list(routes):
    incoming = request("GET", "/v1/customers/cus_1/usage", [("Cookie", "a=1; b=2")])

    event = api_event(incoming, routes.match("GET", "/v1/customers/cus_1/usage"))

    assert event["cookies"] == ["a=1", "b=2"]
    assert "cookie" not in event["headers"]


# -- function result → HTTP response -----------------------------------------------------------


def test_a_result_with_status_code_is_the_response():
    result = {
        "statusCode": 202,
        "headers": {"Content-Type": "application/json"},
        "cookies": ["s=1"],
        "body": '{"id": "ev_1"}',
        "isBase64Encoded": False,
    }

    response = http_response(result)

    assert response.status == 202
    assert response.headers == [("Content-Type", "application/json"), ("Set-Cookie", "s=1")]
    assert response.body == b'{"id": "ev_1"}'


def test_a_base64_result_body_is_decoded():
    result = {"statusCode": 200, "body": base64.b64encode(b"\x00\x01").decode()}

    assert http_response({**result, "isBase64Encoded": True}).body == b"\x00\x01"


def test_a_result_without_status_code_is_a_200_json_body():
    response = http_response({"ok": True})

    assert (response.status, json.loads(response.body)) == (200, {"ok": True})


def test_an_unknown_route_answers_404_like_api_gateway(routes):
    def never(function, event):
        raise AssertionError("no function runs for an unknown route")

    response, function = handle(request("GET", "/v1/nope"), routes, never)

    assert (response.status, json.loads(response.body), function) == (
        404,
        {"message": "Not Found"},
        "-",
    )


def test_a_function_error_answers_500_and_a_timeout_503(routes):
    def failing(function, event):
        raise FunctionError(function, {"errorType": "KeyError", "errorMessage": "x"})

    def slow(function, event):
        raise FunctionTimeout("Task timed out after 10.00 seconds")

    target = request("GET", "/v1/customers/cus_1/usage", headers=[("Authorization", "Bearer k")])
    assert handle(target, routes, authorized(failing))[0].status == 500
    assert handle(target, routes, authorized(slow))[0].status == 503
    assert json.loads(handle(target, routes, authorized(failing))[0].body) == {
        "message": "Internal Server Error"
    }


def test_the_matched_function_gets_the_event(routes):
    seen = []

    def record(function, event):
        seen.append((function, event["routeKey"]))
        return {"statusCode": 202, "body": "{}"}

    target = request("POST", "/v1/events/batch", headers=[("Authorization", "Bearer k")])
    response, function = handle(target, routes, authorized(record))

    assert response.status == 202 and function == "RecordFunction"
    assert seen == [("RecordFunction", "POST /v1/events/batch")]


def authorized(inner, context=None):
    """An invoker whose authorizer lets everyone in with `context`."""

    def invoke(function, event):
        if function == "AuthorizerFunction":
            return {"isAuthorized": True, "context": context or {"kind": "key", "id": "k"}}
        return inner(function, event)

    return invoke


def test_a_request_without_the_identity_header_is_401_without_running_the_authorizer(routes):
    def never(function, event):
        raise AssertionError(f"{function} must not run")

    response, _ = handle(request("POST", "/v1/events"), routes, never)
    assert (response.status, json.loads(response.body)) == (401, {"message": "Unauthorized"})


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        # An HTTP API knows no "Unauthorized" convention: any raised error is a failed
        # authorizer, 500 (REST APIs answer 401 for that message; HTTP APIs do not).
        (
            FunctionError(
                "AuthorizerFunction", {"errorType": "Exception", "errorMessage": "Unauthorized"}
            ),
            500,
        ),
        (
            FunctionError("AuthorizerFunction", {"errorType": "KeyError", "errorMessage": "boom"}),
            500,
        ),
        ({"isAuthorized": False}, 403),
        ({"isAuthorized": "yes"}, 500),
        ({"context": {}}, 500),
    ],
)
def test_the_authorizers_answer_becomes_api_gateways_status(routes, answer, status):
    def invoke(function, event):
        assert function == "AuthorizerFunction", "the route's function must not run"
        if isinstance(answer, Exception):
            raise answer
        return answer

    target = request("POST", "/v1/events", headers=[("Authorization", "Bearer k")])
    assert handle(target, routes, invoke)[0].status == status


def test_the_authorizer_gets_a_request_event_and_its_context_reaches_the_function(routes):
    seen = {}

    def invoke(function, event):
        seen[function] = event
        if function == "AuthorizerFunction":
            return {"isAuthorized": True, "context": {"kind": "portal", "customer": "cus_1"}}
        return {"statusCode": 200, "body": "{}"}

    target = request("GET", "/v1/customers/cus_1/usage", headers=[("Authorization", "Bearer t")])
    assert handle(target, routes, invoke)[0].status == 200
    asked = seen["AuthorizerFunction"]
    assert (asked["type"], asked["identitySource"], asked["pathParameters"]) == (
        "REQUEST",
        ["Bearer t"],
        {"stripe_customer_id": "cus_1"},
    )
    assert seen["ReadFunction"]["requestContext"]["authorizer"] == {
        "lambda": {"kind": "portal", "customer": "cus_1"}
    }


# -- runtime ----------------------------------------------------------------------------------


def test_the_runtime_environment_is_lambdas_plus_the_templates_plus_local_overrides(tmp_path):
    spec = FunctionSpec(
        "ReadFunction", "app.lambda_handler", "python3.13", 10, 512, ("SharedLayer",),
        {"TABLE_NAME": "t", "STRIPE_API_BASE": "template"},
    )  # fmt: skip
    code, layer = tmp_path / "ReadFunction", tmp_path / "SharedLayer" / "python"

    env = runtime_environment(spec, code, [layer], {"STRIPE_API_BASE": "http://127.0.0.1:1"})

    assert env["PYTHONPATH"] == f"{code}:{layer}"
    assert env["LAMBDA_TASK_ROOT"] == str(code)
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "ReadFunction"
    assert env["AWS_LAMBDA_FUNCTION_TIMEOUT"] == "10"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
    assert env["TABLE_NAME"] == "t"
    assert env["STRIPE_API_BASE"] == "http://127.0.0.1:1"
    assert "HOME" not in env and env["AWS_CONFIG_FILE"] == "/dev/null"


def test_the_emulators_answers_become_results_errors_or_timeouts():
    assert parse_invocation_response("F", b'{"statusCode": 200}') == {"statusCode": 200}
    assert parse_invocation_response("F", b"null") is None
    error = {"errorMessage": "boom", "errorType": "ValueError", "requestId": "r", "stackTrace": []}
    with pytest.raises(FunctionError, match="ValueError: boom"):
        parse_invocation_response("F", json.dumps(error).encode())
    with pytest.raises(FunctionTimeout):
        parse_invocation_response("F", b"Task timed out after 10.00 seconds")


def test_log_lines_read_like_a_person_wants_them():
    powertools = json.dumps(
        {
            "level": "INFO",
            "location": "handler:12",
            "message": "flush finished",
            "timestamp": "2026-11-26 08:00:00,000+0000",
            "service": "usage-meter",
            "cold_start": True,
            "summary": {"groups_sent": 2},
        }
    )
    metrics = json.dumps(
        {
            "_aws": {"CloudWatchMetrics": [{"Metrics": [{"Name": "GroupsSent", "Unit": "Count"}]}]},
            "GroupsSent": [2.0],
        }
    )

    assert readable_log_line(powertools) == 'INFO    flush finished  summary={"groups_sent":2}'
    assert readable_log_line(metrics) == "metrics GroupsSent=2"
    assert readable_log_line("START RequestId: 1 Version: $LATEST") is None
    assert readable_log_line("REPORT RequestId: 1\tDuration: 1 ms") is None
    assert readable_log_line("plain print()") == "plain print()"


def test_a_scheduled_event_has_the_shape_of_the_sample():
    sample = json.loads((EVENTS / "flush-schedule.json").read_text())

    event = scheduled_event("FlushFunction", NOW)

    assert set(event) == set(sample)
    assert event["detail-type"] == "Scheduled Event" and event["source"] == "aws.scheduler"
    assert event["time"] == "2026-11-26T08:00:00Z"


def test_a_flush_line_names_what_it_did_or_why_it_failed():
    done = ScheduledRun("FlushFunction", {"groups_sent": 2, "groups_deferred": 0}, None, 12.3)
    idle = ScheduledRun("FlushFunction", {"groups_sent": 0, "errors": []}, None, 5)
    failed = ScheduledRun("FlushFunction", None, "FlushIncomplete: 1 error(s)", 7)

    assert run_summary(done) == "FlushFunction in 12 ms: groups_sent=2"
    assert run_summary(idle) == "FlushFunction in 5 ms: nothing to do"
    assert run_summary(failed) == "FlushFunction in 7 ms: FAILED FlushIncomplete: 1 error(s)"


def test_the_state_file_never_holds_a_real_stripe_key():
    # Given a stack reporting to Stripe test mode
    real = StackState(
        7, "http://127.0.0.1:3000", Backends("http://127.0.0.1:1", "t", "sk_test_real", None)
    )

    # When it is written and read back by `make invoke`, which has the key in its environment
    written = json.dumps(real.to_json())
    read = StackState.from_json(json.loads(written), "sk_test_from_env")

    # Then the key came from the environment, never from the file
    assert "sk_test_real" not in written
    assert read.backends.stripe_api_key == "sk_test_from_env"


def test_the_state_file_round_trips_the_stand_in_and_parameter_overrides():
    backends = Backends("http://127.0.0.1:1", "t", STAND_IN_KEY, "http://127.0.0.1:2")
    state = StackState(7, None, backends, {"Meters": '{"m": {}}'})

    assert StackState.from_json(json.loads(json.dumps(state.to_json())), None) == state


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_authorizer(answer):
    """An invoker whose authorizer gives `answer` and counts its runs; functions answer 200."""
    runs = []

    def invoke(function, event):
        if function == "AuthorizerFunction":
            runs.append(event["identitySource"])
            return answer(event)
        return {"statusCode": 200, "body": "{}"}

    return invoke, runs


def test_an_authorizer_answer_is_cached_per_credential_for_reauthorize_every(routes):
    # Given the template's authorizer (cached 300 s per Authorization header) and a clock
    [authorizer] = {r.authorizer for r in routes.routes if r.authorizer}
    assert authorizer.ttl_seconds == 300 and authorizer.identity_headers == ("Authorization",)
    clock = Clock()
    cache = AuthorizerCache(clock)
    invoke, runs = counting_authorizer(lambda event: {"isAuthorized": True, "context": {}})
    usage_a = request("GET", "/v1/customers/cus_A/usage", headers=[("Authorization", "Bearer t")])
    usage_b = request("GET", "/v1/customers/cus_B/usage", headers=[("Authorization", "Bearer t")])
    record = request("POST", "/v1/events", headers=[("Authorization", "Bearer t")])
    other = request("POST", "/v1/events", headers=[("Authorization", "Bearer u")])
    # When one credential calls three routes and customers, and another calls once
    for target in (usage_a, usage_b, record, other):
        assert handle(target, routes, invoke, cache)[0].status == 200
    # Then the authorizer ran once per credential: the route and path are not in the key
    assert runs == [["Bearer t"], ["Bearer u"]]
    # And after the TTL it runs again
    clock.now += 300
    handle(record, routes, invoke, cache)
    assert runs[-1] == ["Bearer t"] and len(runs) == 3


def test_a_cached_deny_answers_every_route_until_it_expires(routes):
    # Given an authorizer that denies once, then would allow
    answers = iter([{"isAuthorized": False}, {"isAuthorized": True, "context": {}}])
    clock = Clock()
    cache = AuthorizerCache(clock)
    invoke, runs = counting_authorizer(lambda event: next(answers))
    target = request("POST", "/v1/events", headers=[("Authorization", "Bearer t")])
    # When the same credential calls again within the TTL / Then the deny sticks, as on AWS
    assert handle(target, routes, invoke, cache)[0].status == 403
    assert handle(target, routes, invoke, cache)[0].status == 403
    assert len(runs) == 1
    clock.now += 301
    assert handle(target, routes, invoke, cache)[0].status == 200


def test_an_authorizer_error_is_not_cached(routes):
    # Given an authorizer that fails once (the table was unreachable), then answers
    calls = []

    def invoke(function, event):
        if function != "AuthorizerFunction":
            return {"statusCode": 200, "body": "{}"}
        calls.append(1)
        if len(calls) == 1:
            raise FunctionError(function, {"errorType": "ClientError", "errorMessage": "x"})
        return {"isAuthorized": True, "context": {}}

    cache = AuthorizerCache(Clock())
    target = request("POST", "/v1/events", headers=[("Authorization", "Bearer t")])
    # When / Then the failure is a 500 and the next request asks the authorizer again
    assert handle(target, routes, invoke, cache)[0].status == 500
    assert handle(target, routes, invoke, cache)[0].status == 200
    assert len(calls) == 2


def test_context_identity_sources_are_part_of_the_cache_key():
    # Given an authorizer keyed by header and routeKey (as the template once was)
    from devtools.sam_app import Authorizer

    authorizer = Authorizer("A", "AuthorizerFunction", ("Authorization",), ("routeKey",), 300)
    table = RouteTable(
        (
            Route("POST", "/v1/events", "RecordFunction", authorizer),
            Route("POST", "/v1/events/batch", "RecordFunction", authorizer),
        )
    )
    invoke, runs = counting_authorizer(lambda event: {"isAuthorized": True, "context": {}})
    cache = AuthorizerCache(Clock())
    for path in ("/v1/events", "/v1/events/batch", "/v1/events"):
        handle(request("POST", path, headers=[("Authorization", "Bearer t")]), table, invoke, cache)
    # Then each route had its own decision
    assert runs == [["Bearer t", "POST /v1/events"], ["Bearer t", "POST /v1/events/batch"]]
