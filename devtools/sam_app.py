"""What template.yaml says the application is, for running it locally: its functions (handler,
timeout, memory, layers, environment), its HTTP API routes and its schedules.

Everything here is pure: it reads the parsed template (devtools.template.load_template) and
never a second, hand-kept list. Intrinsics are resolved the way `sam local` does: a Ref to a
parameter gives its override or default, a Ref to a resource gives the local name the caller
chose for it (the table name), or else the resource's logical id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

FUNCTION_TYPE = "AWS::Serverless::Function"
LAYER_TYPE = "AWS::Serverless::LayerVersion"
SCHEDULE_EVENT_TYPES = ("Schedule", "ScheduleV2")
DEFAULT_ROUTE = "$default"
# What the pseudo parameters mean for a local run: no account, no stack.
PSEUDO_PARAMETERS = {
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "usage-meter-local",
}
_RATE = re.compile(r"rate\(\s*(\d+)\s+(second|minute|hour|day)s?\s*\)", re.IGNORECASE)
_SECONDS_PER_UNIT = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_SUB_NAME = re.compile(r"\$\{([^}!][^}]*)\}")
_RUN_SETTINGS = ("Handler", "Runtime", "Timeout", "MemorySize", "Layers")
_SCHEDULE_SETTINGS = ("ScheduleExpression", "Schedule", "Enabled", "State")


class UnsupportedSchedule(ValueError):
    """A schedule expression the local runner cannot time (cron, or not a rate at all)."""


@dataclass(frozen=True)
class FunctionSpec:
    """One function as Lambda would run it; values already resolved to strings and numbers."""

    logical_id: str
    handler: str
    runtime: str
    timeout_seconds: int
    memory_mb: int
    layers: tuple[str, ...]  # logical ids of the template's own layers
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Authorizer:
    """A Lambda REQUEST authorizer guarding routes (payload 2.0, simple responses)."""

    name: str
    function: str
    identity_headers: tuple[str, ...]  # all must be present, or API Gateway answers 401
    identity_context: tuple[str, ...] = ()  # $context variables, e.g. routeKey
    ttl_seconds: int = 0  # ReauthorizeEvery: how long a decision is cached; 0: never


@dataclass(frozen=True)
class Route:
    """An HttpApi event: `POST /v1/events` → RecordFunction. Method ANY matches every method."""

    method: str
    path: str
    function: str
    authorizer: Authorizer | None = None

    @property
    def route_key(self) -> str:
        return DEFAULT_ROUTE if self.path == DEFAULT_ROUTE else f"{self.method} {self.path}"

    def path_parameters(self, path: str) -> dict[str, str] | None:
        """The {name} values when path matches this route's path, else None."""
        if self.path == DEFAULT_ROUTE:
            return {}
        pattern, names = _path_pattern(self.path)
        found = pattern.fullmatch(path)
        if found is None:
            return None
        return {name: unquote(value) for name, value in zip(names, found.groups(), strict=True)}

    def specificity(self) -> tuple[int, int, int, int]:
        """Sort key, most specific first, as API Gateway prefers: literal paths before
        {parameters}, {parameters} before {greedy+}, a named method before ANY, $default last."""
        if self.path == DEFAULT_ROUTE:
            return (1, 0, 0, 0)
        greedy = self.path.count("+}")
        parameters = self.path.count("{") - greedy
        return (0, greedy, parameters, int(self.method == "ANY"))


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    path_parameters: dict[str, str]


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...]

    def match(self, method: str, path: str) -> RouteMatch | None:
        for route in sorted(self.routes, key=Route.specificity):
            if route.method not in (method.upper(), "ANY"):
                continue
            parameters = route.path_parameters(path)
            if parameters is not None:
                return RouteMatch(route, parameters)
        return None


@dataclass(frozen=True)
class Schedule:
    function: str
    expression: str


def _path_pattern(path: str) -> tuple[re.Pattern[str], list[str]]:
    names: list[str] = []
    parts: list[str] = []
    for piece in re.split(r"(\{[^}]+\})", path):
        if piece.startswith("{") and piece.endswith("}"):
            name = piece[1:-1]
            greedy = name.endswith("+")
            names.append(name.rstrip("+"))
            parts.append("(.+)" if greedy else "([^/]+)")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts)), names


def parameter_values(
    template: Mapping[str, Any], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Every template parameter's value: the override when given, else its Default."""
    declared = template.get("Parameters") or {}
    unknown = sorted(set(overrides or {}) - set(declared))
    if unknown:
        raise ValueError(f"unknown template parameter(s): {', '.join(unknown)}")
    values = {name: str(spec["Default"]) for name, spec in declared.items() if "Default" in spec}
    values.update(overrides or {})
    return values


def resolve(value: Any, names: Mapping[str, str], resources: Mapping[str, Any]) -> Any:
    """value with Ref and simple Fn::Sub replaced; anything else that needs a stack raises."""
    if isinstance(value, list):
        return [resolve(item, names, resources) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"}:
        return _ref(value["Ref"], names, resources)
    if set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        return _SUB_NAME.sub(lambda m: _ref(m.group(1), names, resources), value["Fn::Sub"])
    if len(value) == 1 and next(iter(value)).startswith("Fn::"):
        raise ValueError(f"{value!r} cannot be resolved without a deployed stack")
    return {key: resolve(item, names, resources) for key, item in value.items()}


def _ref(name: str, names: Mapping[str, str], resources: Mapping[str, Any]) -> str:
    if name in names:
        return names[name]
    if name in PSEUDO_PARAMETERS:
        return PSEUDO_PARAMETERS[name]
    if name in resources:
        return name  # sam local's answer for a resource it has no local name for
    raise ValueError(f"Ref {name!r} names no parameter or resource of the template")


def _functions(template: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    resources = template.get("Resources") or {}
    return {
        logical_id: resource.get("Properties") or {}
        for logical_id, resource in resources.items()
        if resource.get("Type") == FUNCTION_TYPE
    }


def function_specs(
    template: Mapping[str, Any],
    parameters: Mapping[str, str],
    local_names: Mapping[str, str] | None = None,
) -> dict[str, FunctionSpec]:
    """Each function's settings, its own Properties over the template's Globals.Function.

    local_names maps resource logical ids to what a Ref should give locally (UsageTable → the
    local table's name).
    """
    resources = template.get("Resources") or {}
    names = {**parameters, **(local_names or {})}
    defaults = (template.get("Globals") or {}).get("Function") or {}
    specs = {}
    for logical_id, properties in _functions(template).items():
        # Only what running needs: Policies and Events hold !GetAtt that only a stack resolves.
        merged = {
            key: resolve(properties.get(key, defaults.get(key)), names, resources)
            for key in _RUN_SETTINGS
        }
        environment = {
            **_variables(defaults, names, resources),
            **_variables(properties, names, resources),
        }
        specs[logical_id] = FunctionSpec(
            logical_id=logical_id,
            handler=str(merged["Handler"]),
            runtime=str(merged["Runtime"]),
            timeout_seconds=int(merged["Timeout"] or 3),  # Lambda's defaults
            memory_mb=int(merged["MemorySize"] or 128),
            layers=tuple(_layer_ids(merged["Layers"] or [], resources, logical_id)),
            environment=environment,
        )
    return specs


def _variables(
    properties: Mapping[str, Any], names: Mapping[str, str], resources: Mapping[str, Any]
) -> dict[str, str]:
    variables = (properties.get("Environment") or {}).get("Variables") or {}
    return {key: str(resolve(value, names, resources)) for key, value in variables.items()}


def _layer_ids(layers: list[Any], resources: Mapping[str, Any], function: str) -> list[str]:
    for layer in layers:
        if resources.get(layer, {}).get("Type") != LAYER_TYPE:
            raise ValueError(
                f"{function} uses layer {layer!r}; only the template's own layers run locally"
            )
    return [str(layer) for layer in layers]


def route_table(template: Mapping[str, Any]) -> RouteTable:
    """The HTTP API routes: one per HttpApi event of every function, with its authorizer."""
    default, authorizers = _api_auth(template)
    routes = []
    for logical_id, properties in _functions(template).items():
        for event in (properties.get("Events") or {}).values():
            if event.get("Type") != "HttpApi":
                continue
            spec = event.get("Properties") or {}
            # An HttpApi event without Path and Method is API Gateway's $default route.
            path = spec.get("Path", DEFAULT_ROUTE)
            method = str(spec.get("Method", "ANY")).upper()
            name = (spec.get("Auth") or {}).get("Authorizer", default)
            authorizer = authorizers.get(name) if name and name != "NONE" else None
            routes.append(Route(method, path, logical_id, authorizer))
    return RouteTable(tuple(routes))


def _api_auth(template: Mapping[str, Any]) -> tuple[str | None, dict[str, Authorizer]]:
    """The HttpApi's default authorizer name and its Lambda authorizers by name."""
    for resource in (template.get("Resources") or {}).values():
        if resource.get("Type") != "AWS::Serverless::HttpApi":
            continue
        auth = (resource.get("Properties") or {}).get("Auth") or {}
        authorizers = {}
        for name, config in (auth.get("Authorizers") or {}).items():
            arn = config.get("FunctionArn") or {}
            function = arn.get("Fn::GetAtt", [None])[0] if isinstance(arn, dict) else None
            if function is None:
                continue  # an authorizer outside the template cannot run locally
            identity = config.get("Identity") or {}
            authorizers[name] = Authorizer(
                name,
                function,
                identity_headers=tuple(identity.get("Headers") or ()),
                identity_context=tuple(identity.get("Context") or ()),
                ttl_seconds=int(identity.get("ReauthorizeEvery", 0)),
            )
        return auth.get("DefaultAuthorizer"), authorizers
    return None, {}


def schedules(template: Mapping[str, Any], parameters: Mapping[str, str]) -> list[Schedule]:
    """Every enabled Schedule/ScheduleV2 event, its expression resolved."""
    resources = template.get("Resources") or {}
    found = []
    for logical_id, properties in _functions(template).items():
        for event in (properties.get("Events") or {}).values():
            if event.get("Type") not in SCHEDULE_EVENT_TYPES:
                continue
            declared = event.get("Properties") or {}
            # Only what timing needs: DeadLetterConfig and the like hold !GetAtt of the stack.
            spec = {
                key: resolve(declared[key], parameters, resources)
                for key in _SCHEDULE_SETTINGS
                if key in declared
            }
            if spec.get("Enabled") is False or spec.get("State") == "DISABLED":
                continue
            expression = spec.get("ScheduleExpression") or spec.get("Schedule")
            found.append(Schedule(function=logical_id, expression=str(expression)))
    return found


def rate_seconds(expression: str) -> int:
    """Seconds between runs of an EventBridge rate expression: rate(5 minutes) → 300."""
    found = _RATE.fullmatch(expression.strip())
    if found is None:
        raise UnsupportedSchedule(
            f"{expression!r} is not a rate(N minutes|hours|days|seconds) expression; "
            "cron schedules are not timed locally"
        )
    count, unit = int(found.group(1)), found.group(2).lower()
    if count < 1:
        raise UnsupportedSchedule(f"{expression!r}: the rate must be at least 1")
    return count * _SECONDS_PER_UNIT[unit]


def function_for_event(
    event: Mapping[str, Any], routes: RouteTable, scheduled: list[Schedule]
) -> str:
    """The function a sample event is meant for: by its routeKey, or the scheduled function."""
    route_key = event.get("routeKey")
    if isinstance(route_key, str):
        for route in routes.routes:
            if route.route_key == route_key:
                return route.function
        raise LookupError(f"no function serves the route {route_key!r}")
    if event.get("detail-type") == "Scheduled Event" and len(scheduled) == 1:
        return scheduled[0].function
    raise LookupError("cannot tell which function this event is for; name it")
