"""IAM as AWS enforces it, for the local stack and the tests. DynamoDB Local and a local Secrets
Manager let any caller do anything; deployed, each function can only do what its role in
template.yaml allows, and a missing grant is a 500 in production. So the local stack puts an
IamGate in front of them: every function signs its requests with its own logical id as access
key, and the gate refuses, with AWS's AccessDeniedException, any call its role does not allow.

    roles = template_roles(template, parameters, arns)        # each function's Allow statements
    accesses("dynamodb", "TransactWriteItems", params, ...)   # what IAM checks for one API call
    with IamGate(upstream_url, roles, tables=...) as gate:    # the enforcing loopback proxy
        ...; gate.calls                                       # every call, allowed or not

The model covers what the template uses: Allow statements with Action and Resource (wildcards
`*` and `?`) and the `ForAllValues:StringLike` condition on `dynamodb:LeadingKeys`. Anything else
in a role raises, so a grant this module cannot judge is never silently taken as allowed.
"""

from __future__ import annotations

import fnmatch
import http.client
import http.server
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from devtools.sam_app import PSEUDO_PARAMETERS
from devtools.service import ThreadedHttpService

FUNCTION_TYPE = "AWS::Serverless::Function"
MANAGED_POLICY_TYPE = "AWS::IAM::ManagedPolicy"
_LEADING_KEYS = "dynamodb:LeadingKeys"
_SUB_NAME = re.compile(r"\$\{([A-Za-z0-9:.]+)\}")
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class PolicyError(ValueError):
    """A policy this model cannot judge."""


# -- what a call needs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """One permission IAM checks for a call: an action on a resource, with the partition key
    values the call touches (DynamoDB's dynamodb:LeadingKeys)."""

    action: str
    resource: str
    leading_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableKeys:
    """A table's ARN and the partition key attribute of the table and of each index."""

    arn: str
    partition_key: str
    index_partition_keys: Mapping[str, str] = field(default_factory=dict)


# A transaction is authorized per item, by the item's own action (there is no IAM action for
# TransactWriteItems or TransactGetItems themselves).
_TRANSACT_ACTIONS = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
    "Get": "GetItem",
}


def accesses(
    service: str,
    operation: str,
    params: Mapping[str, Any],
    *,
    tables: Mapping[str, TableKeys],
    secret_arns: Mapping[str, str] | None = None,
) -> list[Access]:
    """The permissions IAM checks for one API call (service as in its endpoint variable)."""
    if service == "dynamodb":
        return _dynamodb_accesses(operation, params, tables)
    if service == "secretsmanager":
        secret = str(params.get("SecretId", ""))
        arn = secret if secret.startswith("arn:") else (secret_arns or {}).get(secret, secret)
        return [Access(f"secretsmanager:{operation}", arn)]
    # Anything else (the functions call no other service) needs a grant no role here gives.
    return [Access(f"{service}:{operation}", "*")]


def _dynamodb_accesses(
    operation: str, params: Mapping[str, Any], tables: Mapping[str, TableKeys]
) -> list[Access]:
    def table(name: str) -> TableKeys:
        if name not in tables:
            raise PolicyError(f"no table {name!r} is known to the gate")
        return tables[name]

    def item_access(action: str, name: str, key: Mapping[str, Any]) -> Access:
        keys = table(name)
        return Access(f"dynamodb:{action}", keys.arn, _key_values([key], keys.partition_key))

    if operation in ("GetItem", "DeleteItem", "UpdateItem", "PutItem"):
        key = params.get("Item") if operation == "PutItem" else params.get("Key")
        return [item_access(operation, params["TableName"], key or {})]
    if operation in ("TransactWriteItems", "TransactGetItems"):
        found = []
        for entry in params.get("TransactItems", []):
            [(kind, spec)] = entry.items()
            key = spec.get("Item") if kind == "Put" else spec.get("Key")
            found.append(item_access(_TRANSACT_ACTIONS[kind], spec["TableName"], key or {}))
        return found
    if operation in ("BatchGetItem", "BatchWriteItem"):
        found = []
        for name, request in params.get("RequestItems", {}).items():
            if operation == "BatchGetItem":
                keys = request.get("Keys", [])
            else:
                keys = [
                    (r.get("PutRequest") or {}).get("Item") or (r.get("DeleteRequest") or {})["Key"]
                    for r in request
                ]
            found.append(
                Access(
                    f"dynamodb:{operation}",
                    table(name).arn,
                    _key_values(keys, table(name).partition_key),
                )
            )
        return found
    if operation in ("Query", "Scan"):
        keys = table(params["TableName"])
        index = params.get("IndexName")
        arn = f"{keys.arn}/index/{index}" if index else keys.arn
        partition_key = keys.index_partition_keys.get(index, "") if index else keys.partition_key
        leading = _query_partition_value(params, partition_key) if operation == "Query" else ()
        return [Access(f"dynamodb:{operation}", arn, leading)]
    if "TableName" in params:
        return [Access(f"dynamodb:{operation}", table(params["TableName"]).arn)]
    return [Access(f"dynamodb:{operation}", "*")]


def _scalar(value: Mapping[str, Any]) -> str:
    [(_, raw)] = value.items()
    return str(raw)


def _key_values(keys: Iterable[Mapping[str, Any]], partition_key: str) -> tuple[str, ...]:
    return tuple(sorted({_scalar(key[partition_key]) for key in keys if partition_key in key}))


def _query_partition_value(params: Mapping[str, Any], partition_key: str) -> tuple[str, ...]:
    names = params.get("ExpressionAttributeNames") or {}
    values = params.get("ExpressionAttributeValues") or {}
    condition = str(params.get("KeyConditionExpression", ""))
    for name, value in re.findall(r"([#\w]+)\s*=\s*(:\w+)", condition):
        if names.get(name, name) == partition_key and value in values:
            return (_scalar(values[value]),)
    return ()


# -- what a role allows --------------------------------------------------------------------------


def _like(pattern: str, value: str) -> bool:
    # IAM wildcards: * any run, ? one character; nothing else is special.
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


@dataclass(frozen=True)
class Statement:
    """One Allow statement: actions, resources and an optional LeadingKeys condition."""

    actions: tuple[str, ...]
    resources: tuple[str, ...]
    leading_keys: tuple[str, ...] | None = None  # ForAllValues:StringLike patterns

    def allows(self, access: Access) -> bool:
        if not any(_like(a.lower(), access.action.lower()) for a in self.actions):
            return False
        if not any(_like(r, access.resource) for r in self.resources):
            return False
        if self.leading_keys is None:
            return True
        # ForAllValues: every key the call touches must match (a call touching none passes).
        return all(any(_like(p, k) for p in self.leading_keys) for k in access.leading_keys)


@dataclass(frozen=True)
class Role:
    name: str
    statements: tuple[Statement, ...]

    def allows(self, access: Access) -> bool:
        return any(s.allows(access) for s in self.statements)

    def grants(self) -> list[tuple[str, str]]:
        """Every (action, resource) pair the role names, for finding grants nothing uses."""
        return [(a, r) for s in self.statements for a in s.actions for r in s.resources]


def _statement(raw: Mapping[str, Any], where: str) -> Statement:
    if raw.get("Effect") != "Allow" or "NotAction" in raw or "NotResource" in raw:
        raise PolicyError(f"{where}: only plain Allow statements are modelled: {raw}")
    actions = raw["Action"] if isinstance(raw["Action"], list) else [raw["Action"]]
    resources = raw["Resource"] if isinstance(raw["Resource"], list) else [raw["Resource"]]
    leading: tuple[str, ...] | None = None
    for operator, tests in (raw.get("Condition") or {}).items():
        if operator != "ForAllValues:StringLike" or set(tests) != {_LEADING_KEYS}:
            raise PolicyError(f"{where}: condition {operator} {sorted(tests)} is not modelled")
        patterns = tests[_LEADING_KEYS]
        leading = tuple(patterns if isinstance(patterns, list) else [patterns])
    return Statement(tuple(map(str, actions)), tuple(map(str, resources)), leading)


class _Resolver:
    """Intrinsic functions of a role's statements, resolved for a local stack."""

    def __init__(
        self, template: Mapping[str, Any], parameters: Mapping[str, str], arns: Mapping[str, str]
    ) -> None:
        self.template = template
        self.names = {**PSEUDO_PARAMETERS, "AWS::Partition": "aws", **parameters}
        self.arns = arns

    def ref(self, name: str) -> str:
        if name in self.names:
            return self.names[name]
        if name in self.arns:  # a secret's Ref is its ARN
            return self.arns[name]
        if name in (self.template.get("Resources") or {}):
            return f"arn:aws:local:::{name}"  # a resource this stack does not run: never matched
        raise PolicyError(f"Ref {name} names no parameter or resource")

    def attribute(self, name: str) -> str:
        resource, _, attribute = name.partition(".")
        if attribute != "Arn" or resource not in self.arns:
            raise PolicyError(f"GetAtt {name} has no local value")
        return self.arns[resource]

    def condition(self, name: str) -> bool:
        return bool(self.value((self.template.get("Conditions") or {})[name]))

    def value(self, raw: Any) -> Any:
        if isinstance(raw, list):
            return [v for v in (self.value(item) for item in raw) if v is not _NO_VALUE]
        if not isinstance(raw, dict):
            return raw
        if len(raw) != 1 or not next(iter(raw)).startswith(("Fn::", "Ref", "Condition")):
            return {
                k: v for k, v in ((k, self.value(v)) for k, v in raw.items()) if v is not _NO_VALUE
            }
        [(function, argument)] = raw.items()
        if function == "Ref":
            return _NO_VALUE if argument == "AWS::NoValue" else self.ref(argument)
        if function == "Fn::GetAtt":
            return self.attribute(".".join(argument) if isinstance(argument, list) else argument)
        if function == "Fn::Sub" and isinstance(argument, str):
            return _SUB_NAME.sub(
                lambda m: self.attribute(m[1]) if "." in m[1] else self.ref(m[1]), argument
            )
        if function == "Fn::If":
            name, when_true, when_false = argument
            return self.value(when_true if self.condition(name) else when_false)
        if function == "Fn::Equals":
            left, right = (self.value(v) for v in argument)
            return left == right
        if function == "Fn::Not":
            return not self.value(argument[0])
        if function == "Fn::And":
            return all(self.value(v) for v in argument)
        if function == "Fn::Or":
            return any(self.value(v) for v in argument)
        if function == "Condition":
            return self.condition(argument)
        raise PolicyError(f"{function} is not modelled")


_NO_VALUE: Any = object()


def template_roles(
    template: Mapping[str, Any], parameters: Mapping[str, str], arns: Mapping[str, str]
) -> dict[str, Role]:
    """Each function's role (named by the function's logical id) and each managed policy (by its
    own), from their inline statements. arns maps logical ids to local ARNs (the table, secrets).
    """
    resolver = _Resolver(template, parameters, arns)
    roles = {}
    for logical_id, resource in (template.get("Resources") or {}).items():
        properties = resource.get("Properties") or {}
        if resource.get("Type") == FUNCTION_TYPE:
            documents = properties.get("Policies") or []
        elif resource.get("Type") == MANAGED_POLICY_TYPE:
            documents = [properties["PolicyDocument"]]
        else:
            continue
        statements = []
        for document in resolver.value(documents):
            if not isinstance(document, dict) or "Statement" not in document:
                raise PolicyError(f"{logical_id}: only inline policy documents are modelled")
            for raw in document["Statement"]:
                statements.append(_statement(raw, logical_id))
        roles[logical_id] = Role(logical_id, tuple(statements))
    return roles


def table_keys(template: Mapping[str, Any], logical_id: str, arn: str) -> TableKeys:
    """The partition keys of a template table and its indexes."""
    properties = template["Resources"][logical_id]["Properties"]

    def hash_key(schema: Sequence[Mapping[str, str]]) -> str:
        return next(k["AttributeName"] for k in schema if k["KeyType"] == "HASH")

    indexes = [
        *(properties.get("GlobalSecondaryIndexes") or []),
        *(properties.get("LocalSecondaryIndexes") or []),
    ]
    return TableKeys(
        arn=arn,
        partition_key=hash_key(properties["KeySchema"]),
        index_partition_keys={i["IndexName"]: hash_key(i["KeySchema"]) for i in indexes},
    )


# -- the gate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One API call that reached the gate."""

    principal: str
    service: str
    operation: str
    accesses: tuple[Access, ...]
    denied: tuple[Access, ...]  # empty: allowed (or a principal with no role here)


def access_denied(principal: str, access: Access) -> dict[str, str]:
    """AWS's error body for a call no policy allows."""
    role = f"arn:aws:sts::{PSEUDO_PARAMETERS['AWS::AccountId']}:assumed-role/{principal}Role"
    return {
        "__type": "com.amazon.coral.service#AccessDeniedException",
        "Message": (
            f"User: {role}/{principal} is not authorized to perform: {access.action} on "
            f"resource: {access.resource} because no identity-based policy allows the "
            f"{access.action} action"
        ),
    }


@dataclass(frozen=True)
class Verdict:
    """What the gate does with a request: forward it (no refusal), or answer `refusal` with
    `status`, after applying the request upstream when `apply_first`."""

    status: int = 200
    refusal: dict[str, str] | None = None
    apply_first: bool = False


_HOP_HEADERS = ("content-length", "connection", "transfer-encoding", "date", "server")
_SERVICES = {"DynamoDB_20120810": "dynamodb", "secretsmanager": "secretsmanager"}


class IamGate(ThreadedHttpService):
    """A loopback proxy in front of an AWS JSON-protocol service (DynamoDB Local, a local
    Secrets Manager) that enforces each principal's role. The principal is the access key id of
    the request's signature; one with no role here (a test's or an operator's client) passes
    unchecked. Every call is recorded in `calls`."""

    def __init__(
        self,
        upstream_url: str,
        roles: Mapping[str, Role],
        *,
        tables: Mapping[str, TableKeys] | None = None,
        secret_arns: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = urlsplit(upstream_url)
        self.roles = dict(roles)
        self.tables = dict(tables or {})
        self.secret_arns = dict(secret_arns or {})
        self.calls: list[Call] = []
        self._faults: dict[tuple[str, str], tuple[int, bool]] = {}
        self._lock = threading.Lock()
        self._server = _GateServer((host, port), self)

    def fail(
        self, principal: str, operation: str, count: int = 1, *, applied: bool = False
    ) -> None:
        """Fail the principal's next `count` such calls. Not applied: an error no SDK retries,
        as if the run had died there. Applied: the call reaches the table, and its answer is
        lost (a 500 the SDK retries), so the retry meets its own write."""
        with self._lock:
            self._faults[(principal, operation)] = (count, applied)

    def judge(self, principal: str, target: str, body: bytes) -> Verdict:
        """The call a request makes, and AWS's refusal when its principal may not make it."""
        prefix, _, operation = target.partition(".")
        service = _SERVICES.get(prefix, prefix)
        role = self.roles.get(principal)
        if role is None:
            call = Call(principal, service, operation, (), ())
        else:
            params = json.loads(body or b"{}")
            needed = accesses(
                service, operation, params, tables=self.tables, secret_arns=self.secret_arns
            )
            denied = tuple(a for a in needed if not role.allows(a))
            call = Call(principal, service, operation, tuple(needed), denied)
        with self._lock:
            self.calls.append(call)
            if call.denied:
                return Verdict(400, access_denied(principal, call.denied[0]))
            left, applied = self._faults.get((principal, operation), (0, False))
            if left <= 0:
                return Verdict()
            self._faults[(principal, operation)] = (left - 1, applied)
        if applied:
            return Verdict(500, {"__type": "InternalServerError", "message": "answer lost"}, True)
        return Verdict(400, {"__type": "ValidationException", "message": "injected fault"})

    def forward(
        self, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(
            self.upstream.hostname or "127.0.0.1", self.upstream.port, timeout=60
        )
        try:
            connection.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


class _GateServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], gate: IamGate) -> None:
        self.gate = gate
        super().__init__(address, _GateHandler)


class _GateHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _GateServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        match = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        principal = match[1] if match else ""
        gate = self.server.gate
        verdict = gate.judge(principal, self.headers.get("X-Amz-Target", ""), body)
        if verdict.apply_first or verdict.refusal is None:
            status, headers, answer = gate.forward(self.path, list(self.headers.items()), body)
        if verdict.refusal is None:
            self._send(status, headers, answer)
            return
        content_type = ("Content-Type", "application/x-amz-json-1.0")
        self._send(verdict.status, [content_type], json.dumps(verdict.refusal).encode())

    do_GET = do_POST

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in (
                "content-length",
                "connection",
                "transfer-encoding",
                "date",
                "server",
            ):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
