"""The whole application on this machine, without Docker or AWS: what `make dev`, `make invoke`,
`make demo` and the end-to-end tests start.

    sam_build()                                   # .aws-sam/build for this machine's arch
    with LocalStack(StackOptions(api_port=0)) as stack:
        requests.post(f"{stack.api_url}/v1/events", json={...})
        stack.run_schedules()                     # the flush, now

It starts DynamoDB Local (the table built from template.yaml), the loopback Stripe stand-in
unless a Stripe key is given, every function as a real Lambda runtime (devtools.local_lambda),
the HTTP API (devtools.local_api) and a timer per schedule. Routes, functions, environment and
schedules all come from template.yaml.

A stack that owns the persistent data (`make dev`, or `make invoke` on its own) records its
endpoints in .local/stack.json, so `make invoke` can use a running `make dev` and two engines
never open one data directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import boto3

from devtools.dynamodb_local import DynamoDBLocal
from devtools.fake_stripe import FakeStripe
from devtools.iam import IamGate, table_keys, template_roles
from devtools.local_api import HttpRequest, HttpResponse, LocalApiServer, json_response
from devtools.local_lambda import (
    FunctionError,
    FunctionPool,
    InvocationError,
    LogSink,
    host_architecture,
)
from devtools.sam_app import (
    PSEUDO_PARAMETERS,
    Schedule,
    function_specs,
    parameter_values,
    rate_seconds,
    route_table,
    schedules,
)
from devtools.service import Service
from devtools.template import create_usage_table, load_template
from usage_meter.logic.auth import create_api_key
from usage_meter.models.auth import Scope
from usage_meter.store.dynamodb import DynamoStore

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = REPO_ROOT / ".aws-sam" / "build"
LOCAL_DIR = REPO_ROOT / ".local"
DEFAULT_DATA_DIR = LOCAL_DIR / "dynamodb"
STATE_FILE = LOCAL_DIR / "stack.json"
TABLE_LOGICAL_ID = "UsageTable"
PORTAL_SECRET_LOGICAL_ID = "PortalTokenSecret"
STRIPE_SECRET_PARAMETER = "StripeSecretName"
WEBHOOK_SECRET_PARAMETER = "StripeWebhookSecretName"
STAND_IN_KEY = "sk_test_local_stand_in"
FLUSH_ROUTE = "/_local/flush"


class StackError(RuntimeError):
    """The local stack cannot start as asked."""


def local_arn(service: str, resource: str) -> str:
    region, account = PSEUDO_PARAMETERS["AWS::Region"], PSEUDO_PARAMETERS["AWS::AccountId"]
    return f"arn:aws:{service}:{region}:{account}:{resource}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sam_build(
    build_dir: Path | None = None,
    *,
    architecture: str | None = None,
    cache_dir: Path | None = None,
) -> float:
    """`sam build` for this machine's architecture without Docker; the seconds it took.

    With no build_dir this is `make build` (.aws-sam/build, samconfig.toml's cached build).
    """
    venv_bin = Path(sys.executable).parent
    sam = shutil.which("sam", path=str(venv_bin)) or shutil.which("sam")
    if sam is None:
        raise StackError("SAM CLI is not installed; run `make setup`")
    architecture = architecture or host_architecture()
    command = [sam, "build", "--parameter-overrides", f"Architecture={architecture}"]
    if build_dir is not None:
        command += ["--build-dir", str(build_dir)]
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    # sam build looks for python3.13 on PATH; the project's virtualenv provides it.
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "SAM_CLI_TELEMETRY": "0"}
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"sam build failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.monotonic() - started


LOCAL_PORTAL_TOKEN_SECRET = "local-only-portal-token-secret"
# Signs the stand-in's webhooks; with real Stripe, `stripe listen` prints the one to use.
LOCAL_WEBHOOK_SECRET = "whsec_local_only_stand_in"
WEBHOOK_PATH = "/v1/stripe/webhook"
EVENTS_PATH = "/v1/stripe/events"  # the event destination's thin notifications


@dataclass(frozen=True)
class Backends:
    """Where the functions' DynamoDB, Secrets Manager and Stripe calls go."""

    dynamodb_url: str  # the IAM gate in front of DynamoDB Local
    table_name: str
    stripe_api_key: str
    stripe_api_base: str | None  # None: Stripe itself (test mode)
    # Signs portal tokens locally, in place of the deployed Secrets Manager secret.
    portal_token_secret: str = LOCAL_PORTAL_TOKEN_SECRET
    # With a local Secrets Manager (behind its own IAM gate), the functions read both secrets
    # from it as they do deployed: the portal token secret's ARN, the Stripe key by name.
    secrets_manager_url: str | None = None
    portal_token_secret_arn: str | None = None
    stripe_webhook_secret: str = LOCAL_WEBHOOK_SECRET

    def environment(self) -> dict[str, str]:
        env = {
            "AWS_ENDPOINT_URL_DYNAMODB": self.dynamodb_url,
            # Any other AWS service reaches the gate too, which refuses it: no function may call
            # a service its role does not name, and none may reach real AWS from here.
            "AWS_ENDPOINT_URL": self.dynamodb_url,
        }
        if self.secrets_manager_url is not None:
            env["AWS_ENDPOINT_URL_SECRETS_MANAGER"] = self.secrets_manager_url
            env["PORTAL_TOKEN_SECRET_NAME"] = self.portal_token_secret_arn or ""
        else:
            env["STRIPE_API_KEY"] = self.stripe_api_key
            env["PORTAL_TOKEN_SECRET"] = self.portal_token_secret
            env["PORTAL_TOKEN_SECRET_NAME"] = ""  # the template's names a deployed secret
            env["STRIPE_WEBHOOK_SECRET"] = self.stripe_webhook_secret
            env["STRIPE_WEBHOOK_SECRET_NAME"] = ""
        if self.stripe_api_base is not None:
            env["STRIPE_API_BASE"] = self.stripe_api_base
        return env


def function_credentials(logical_id: str) -> dict[str, str]:
    """Each function signs with its own logical id as access key: the IAM gate knows by it
    whose role to enforce, as AWS knows a function by its role's session."""
    return {"AWS_ACCESS_KEY_ID": logical_id, "AWS_SECRET_ACCESS_KEY": "local"}


@dataclass(frozen=True)
class StackOptions:
    build_dir: Path = DEFAULT_BUILD_DIR
    api_port: int | None = 3000  # 0: a free port; None: no HTTP API (invoke)
    data_dir: Path | None = None  # None: DynamoDB Local in memory
    table_name: str = "usage-meter-local"
    stripe_api_key: str | None = None  # None: the loopback stand-in
    # Verifies Stripe's webhooks: the stand-in signs with LOCAL_WEBHOOK_SECRET; with real
    # Stripe, the secret `stripe listen --forward-to .../v1/stripe/webhook` prints.
    stripe_webhook_secret: str | None = None
    parameter_overrides: Mapping[str, str] = field(default_factory=dict)
    flush_every: float | None = None  # seconds between scheduled runs; None: the template's
    run_schedules: bool = True
    concurrency: int = 1  # runtimes per function
    functions: Collection[str] | None = None  # None: every function of the template
    attach: Backends | None = None  # use running backends instead of starting them
    environment: Mapping[str, str] = field(default_factory=dict)  # extra, for every function
    # A Secrets Manager to keep both secrets in, as deployed (e.g. moto's server); None: the
    # secrets are plain environment variables.
    secrets_manager_url: str | None = None
    state_file: Path | None = None  # record the endpoints here while running
    log: Callable[[str], None] = _say
    function_log: LogSink | None = None  # None: readable lines on stderr
    # A demo portal's browser origin (devtools.portal): added to PortalOrigins, and a read key
    # is made for its backend (portal_key), which mints portal tokens with it.
    portal_origin: str | None = None


@dataclass(frozen=True)
class ScheduledRun:
    function: str
    result: Any
    error: str | None
    duration_ms: float


def scheduled_event(function: str, now: datetime | None = None) -> dict[str, Any]:
    """What EventBridge Scheduler sends a function (the shape of events/flush-schedule.json)."""
    now = now or datetime.now(UTC)
    region, account = PSEUDO_PARAMETERS["AWS::Region"], PSEUDO_PARAMETERS["AWS::AccountId"]
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.scheduler",
        "account": account,
        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:scheduler:{region}:{account}:schedule/default/{function}"],
        "detail": {},
    }


def run_summary(run: ScheduledRun) -> str:
    """One line per scheduled run: what the function's result counted, or why it failed."""
    took = f"{run.function} in {run.duration_ms:.0f} ms"
    if run.error is not None:
        return f"{took}: FAILED {run.error}"
    if not isinstance(run.result, dict):
        return f"{took}: {json.dumps(run.result)}"
    counts = [f"{key}={value}" for key, value in run.result.items() if value not in (0, False, [])]
    return f"{took}: {' '.join(counts) or 'nothing to do'}"


def ensure_table(engine: DynamoDBLocal, table_name: str, template: dict[str, Any]) -> bool:
    """Create the template's table unless it exists (persistent data); True when created."""
    client = engine.client()
    try:
        client.describe_table(TableName=table_name)
        return False
    except client.exceptions.ResourceNotFoundException:
        create_usage_table(client, table_name, template, logical_id=TABLE_LOGICAL_ID)
        return True


def create_local_key(
    engine: DynamoDBLocal, table_name: str, name: str = "local run", scope: Scope = Scope.ADMIN
) -> str:
    """A fresh server key for this local run (admin by default: every route needs one)."""
    store = DynamoStore(table_name, client=engine.client())
    key, _ = create_api_key(name, {scope}, keys=store, now=int(time.time()))
    return key


class _Repeat:
    """Calls action every `seconds` on a thread until stopped; the first call after one period."""

    def __init__(self, seconds: float, action: Callable[[], object]) -> None:
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(seconds, action), daemon=True, name="schedule"
        )

    def _loop(self, seconds: float, action: Callable[[], object]) -> None:
        while not self._stopping.wait(seconds):
            action()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        # Not waiting out a run in flight (a flush may take minutes): stopping its runtime ends
        # it, and an interrupted flush is resumed by the next one.
        self._thread.join(timeout=1)


class LocalStack(Service):
    """DynamoDB Local, Stripe (stand-in), the functions, the HTTP API and the schedules."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self.template = load_template()
        self.parameters = parameter_values(
            self.template, {"Architecture": host_architecture(), **self.options.parameter_overrides}
        )
        if self.options.portal_origin:  # the demo portal reads usage from the browser (CORS)
            origins = [self.parameters.get("PortalOrigins", ""), self.options.portal_origin]
            self.parameters["PortalOrigins"] = ",".join(o for o in origins if o)
        self.routes = route_table(self.template)
        self.schedules = schedules(self.template, self.parameters)
        self.pools: dict[str, FunctionPool] = {}
        self.backends: Backends | None = None
        self.stripe: FakeStripe | None = None  # the stand-in, when one runs
        self.api: LocalApiServer | None = None
        self.table_created = False
        self.server_key: str | None = None  # an admin key made for this run, when it owns the data
        self.portal_key: str | None = None  # a read key for the demo portal's backend, likewise
        self.iam_gates: list[IamGate] = []  # enforcing each function's role, when it owns them
        self._running = ExitStack()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        try:
            self._claim_state_file()
            if self.options.api_port is not None:
                self._bind_api(self.options.api_port)  # first: a taken port fails fast
            self.backends = self.options.attach or self._start_backends()
            self._start_functions(self.backends)
            if self.api is not None:
                self.api.start()
            if self.options.run_schedules:
                self._start_schedules()
            self._write_state_file()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything this stack started, last started first; safe to call repeatedly."""
        self._running.close()

    def _start_backends(self) -> Backends:
        engine = DynamoDBLocal(data_dir=self.options.data_dir)
        self._running.callback(engine.stop)
        engine.start()
        self.table_created = ensure_table(engine, self.options.table_name, self.template)
        self.server_key = create_local_key(engine, self.options.table_name)
        if self.options.portal_origin:
            self.portal_key = create_local_key(
                engine, self.options.table_name, "demo portal", Scope.READ
            )
        key, base = self.options.stripe_api_key, None
        if key is None:
            self.stripe = FakeStripe("127.0.0.1", 0)
            self._running.callback(self.stripe.stop)
            self.stripe.start()
            key, base = STAND_IN_KEY, self.stripe.url
        webhook_secret = self.options.stripe_webhook_secret or LOCAL_WEBHOOK_SECRET
        if self.stripe is not None and self.api is not None:  # its webhooks reach this API
            self.stripe.add_webhook_endpoint(f"{self.api_url}{WEBHOOK_PATH}", secret=webhook_secret)
            self.stripe.add_event_destination(f"{self.api_url}{EVENTS_PATH}", secret=webhook_secret)
        secrets = (
            self._store_secrets(key, webhook_secret) if self.options.secrets_manager_url else {}
        )
        table_arn = local_arn("dynamodb", f"table/{self.options.table_name}")
        roles = template_roles(
            self.template, self.parameters, {TABLE_LOGICAL_ID: table_arn, **secrets}
        )
        tables = {self.options.table_name: table_keys(self.template, TABLE_LOGICAL_ID, table_arn)}
        dynamodb = self._gate(IamGate(engine.endpoint_url, roles, tables=tables))
        secrets_url = None
        if self.options.secrets_manager_url:
            gate = IamGate(
                self.options.secrets_manager_url,
                roles,
                secret_arns={
                    self.parameters[name]: secrets[name]
                    for name in (STRIPE_SECRET_PARAMETER, WEBHOOK_SECRET_PARAMETER)
                },
            )
            secrets_url = self._gate(gate).url
        return Backends(
            dynamodb.url,
            self.options.table_name,
            key,
            base,
            secrets_manager_url=secrets_url,
            portal_token_secret_arn=secrets.get(PORTAL_SECRET_LOGICAL_ID),
            stripe_webhook_secret=webhook_secret,
        )

    def _gate(self, gate: IamGate) -> IamGate:
        self._running.callback(gate.stop)
        self.iam_gates.append(gate.start())
        return gate

    def _store_secrets(self, stripe_api_key: str, webhook_secret: str) -> dict[str, str]:
        """The secrets in the local Secrets Manager; their ARNs by the template's names."""
        client = boto3.client(
            "secretsmanager",
            endpoint_url=self.options.secrets_manager_url,
            region_name=PSEUDO_PARAMETERS["AWS::Region"],
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )

        def put(name: str, value: str) -> str:
            try:
                return str(client.create_secret(Name=name, SecretString=value)["ARN"])
            except client.exceptions.ResourceExistsException:
                return str(client.put_secret_value(SecretId=name, SecretString=value)["ARN"])

        stack = self.options.table_name
        return {
            PORTAL_SECRET_LOGICAL_ID: put(f"{stack}/portal-token", LOCAL_PORTAL_TOKEN_SECRET),
            STRIPE_SECRET_PARAMETER: put(self.parameters[STRIPE_SECRET_PARAMETER], stripe_api_key),
            WEBHOOK_SECRET_PARAMETER: put(
                self.parameters[WEBHOOK_SECRET_PARAMETER], webhook_secret
            ),
        }

    def _start_functions(self, backends: Backends) -> None:
        local_names = {TABLE_LOGICAL_ID: backends.table_name}
        if backends.portal_token_secret_arn is not None:
            local_names[PORTAL_SECRET_LOGICAL_ID] = backends.portal_token_secret_arn
        specs = function_specs(self.template, self.parameters, local_names)
        wanted = self.options.functions
        unknown = sorted(set(wanted or ()) - set(specs))
        if unknown:
            raise StackError(f"no function {', '.join(unknown)} in template.yaml: {sorted(specs)}")
        environment = {**backends.environment(), **self.options.environment}
        for logical_id, spec in specs.items():
            if wanted is not None and logical_id not in wanted:
                continue
            pool = FunctionPool(
                spec,
                build_dir=self.options.build_dir,
                environment={**environment, **function_credentials(logical_id)},
                size=self.options.concurrency,
                log=self.options.function_log,
            )
            self._running.callback(pool.stop)
            pool.start()
            self.pools[logical_id] = pool

    def _bind_api(self, port: int) -> None:
        try:
            self.api = LocalApiServer(
                self.routes,
                self.invoke,
                port=port,
                local_routes={FLUSH_ROUTE: self._flush_route},
                log=self.options.log,
            )
        except OSError as error:
            raise StackError(f"cannot serve the API on 127.0.0.1:{port}: {error}") from error
        self._running.callback(self.api.stop)

    def _start_schedules(self) -> None:
        for schedule in self.schedules:
            seconds = self.schedule_seconds(schedule)
            if seconds is None:
                continue
            timer = _Repeat(seconds, self.run_schedules)
            self._running.callback(timer.stop)
            timer.start()

    def schedule_seconds(self, schedule: Schedule) -> float | None:
        """Seconds between runs: --flush-every, else the template's rate; None when untimed."""
        if self.options.flush_every is not None:
            return self.options.flush_every or None
        try:
            return rate_seconds(schedule.expression)
        except ValueError as error:
            self.options.log(f"not timed locally: {error}; POST {FLUSH_ROUTE} runs it")
            return None

    # -- state file -------------------------------------------------------------------------------

    def _claim_state_file(self) -> None:
        path = self.options.state_file
        if path is None:
            return
        running = read_live_state(path)
        if running is not None:
            raise StackError(
                f"another local stack is running (pid {running.pid}, "
                f"{running.api_url or 'make invoke'}); stop it first, or use it"
            )

    def _write_state_file(self) -> None:
        path = self.options.state_file
        if path is None or self.backends is None:
            return
        state = StackState(
            pid=os.getpid(),
            api_url=self.api_url,
            backends=self.backends,
            parameter_overrides=dict(self.options.parameter_overrides),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state.to_json(), indent=2) + "\n")
        self._running.callback(path.unlink, missing_ok=True)

    # -- using it -------------------------------------------------------------------------------

    @property
    def api_url(self) -> str | None:
        return self.api.url if self.api else None

    def invoke(self, function: str, event: Any) -> Any:
        """Run one function once with event; its result (raises InvocationError otherwise)."""
        pool = self.pools.get(function)
        if pool is None:
            raise StackError(f"{function} is not running here; running: {sorted(self.pools)}")
        return pool.invoke(event).result

    def run_schedules(self) -> list[ScheduledRun]:
        """Run every scheduled function now, with the event its schedule sends; a line each."""
        runs = []
        for schedule in self.schedules:
            if schedule.function in self.pools:
                run = self._run_scheduled(schedule.function)
                self.options.log(f"schedule  {run_summary(run)}")
                runs.append(run)
        return runs

    def _run_scheduled(self, function: str) -> ScheduledRun:
        started = time.perf_counter()
        result, error = None, None
        try:
            result = self.invoke(function, scheduled_event(function))
        except FunctionError as failure:
            result = failure.payload
            error = f"{failure.payload['errorType']}: {failure.payload['errorMessage']}"
        except InvocationError as failure:
            error = str(failure)
        ms = (time.perf_counter() - started) * 1000
        return ScheduledRun(function, result, error, ms)

    def _flush_route(self, request: HttpRequest) -> HttpResponse:
        runs = self.run_schedules()
        body = {run.function: {"error": run.error} if run.error else run.result for run in runs}
        return json_response(502 if any(run.error for run in runs) else 200, body)


@dataclass(frozen=True)
class StackState:
    """What .local/stack.json holds while a stack owns the local data. A real Stripe key is
    never written; the stand-in's is a placeholder."""

    pid: int
    api_url: str | None
    backends: Backends
    parameter_overrides: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        state = asdict(self)
        if self.backends.stripe_api_base is None:
            state["backends"]["stripe_api_key"] = None
        return state

    @classmethod
    def from_json(cls, data: Mapping[str, Any], stripe_api_key: str | None) -> StackState:
        backends = dict(data["backends"])
        backends["stripe_api_key"] = backends.get("stripe_api_key") or stripe_api_key or ""
        return cls(
            pid=int(data["pid"]),
            api_url=data["api_url"],
            backends=Backends(**backends),
            parameter_overrides=dict(data.get("parameter_overrides") or {}),
        )


def read_live_state(path: Path = STATE_FILE) -> StackState | None:
    """The running stack recorded at path, or None when there is none (or it died)."""
    try:
        data = json.loads(path.read_text())
        state = StackState.from_json(data, os.environ.get("STRIPE_API_KEY"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (_process_alive(state.pid) and _reachable(state.backends.dynamodb_url)):
        return None
    return state


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reachable(url: str) -> bool:
    host, _, port = url.removeprefix("http://").partition(":")
    with contextlib.suppress(OSError, ValueError):
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    return False
