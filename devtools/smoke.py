"""`make smoke URL=<ApiUrl> KEY=<key>`: one round trip through a running stack, deployed or local.

It records one unit for a smoke-test customer, replays it (a duplicate), flushes, and reads the
usage back, first with the key, then with a portal token. A deployed stack is flushed with
`--flush-function <FlushFunctionName>` (your AWS credentials invoke it) or, without it, by
waiting for the schedule; a local stack (`make dev`) through `POST /_local/flush`. Each step
prints one line; the exit code is 0 when every step did what it should, 1 otherwise.

The key needs the `record` and `read` scopes (or `admin`). The customer defaults to
cus_UsageMeterSmoke: on a stack that reports to live Stripe, pass --customer with a real
customer, or Stripe reports the units as an error event later.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import requests

DEFAULT_CUSTOMER = "cus_UsageMeterSmoke"


class SmokeFailed(Exception):
    """A step did not answer as it should; the message says which and what came back."""


def _say(line: str) -> None:
    print(line, flush=True)


class Smoke:
    def __init__(
        self,
        url: str,
        key: str,
        *,
        customer: str = DEFAULT_CUSTOMER,
        meter: str | None = None,
        flush_function: str | None = None,
        wait_seconds: float = 420,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.url = url.rstrip("/")
        self.customer = customer
        self.meter = meter
        self.flush_function = flush_function
        self.wait_seconds = wait_seconds
        self.say = say
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"

    def _call(
        self, step: str, method: str, path: str, expect: int, **kwargs: Any
    ) -> dict[str, Any]:
        started = time.monotonic()
        try:
            answer = self.http.request(method, f"{self.url}{path}", timeout=60, **kwargs)
        except requests.RequestException as error:
            raise SmokeFailed(f"{step}: {method} {path} did not answer: {error}") from None
        ms = (time.monotonic() - started) * 1000
        if answer.status_code != expect:
            raise SmokeFailed(
                f"{step}: {method} {path} answered {answer.status_code}, not {expect}: "
                f"{answer.text[:500]}"
            )
        self.say(f"ok  {step:<10} {method} {path}  {answer.status_code}  {ms:.0f} ms")
        body: dict[str, Any] = answer.json() if answer.content else {}
        return body

    def usage(self, step: str) -> dict[str, Any]:
        body = self._call(step, "GET", f"/v1/customers/{self.customer}/usage", 200)
        meters = {m["meter"]: m for m in body["meters"]}
        if not meters:
            raise SmokeFailed(f"{step}: the stack has no meter configured")
        self.meter = self.meter or sorted(meters)[0]
        if self.meter not in meters:
            raise SmokeFailed(f"{step}: no meter {self.meter!r}; the stack's: {sorted(meters)}")
        return dict(meters[self.meter])

    def run(self) -> None:
        before = self.usage("read")
        event = {
            "stripe_customer_id": self.customer,
            "meter": self.meter,
            "quantity": 1,
            "idempotency_key": f"smoke-{uuid.uuid4().hex}",
        }
        first = self._call("record", "POST", "/v1/events", 202, json=event)
        again = self._call("replay", "POST", "/v1/events", 200, json=event)
        if again != {"id": first["id"], "duplicate": True}:
            raise SmokeFailed(f"replay: expected the same id as a duplicate, got {again}")
        recorded = self.usage("read")
        if recorded["quantity"] < before["quantity"] + 1:
            raise SmokeFailed(f"read: the unit is not counted: {before} then {recorded}")
        self.flush(before["reported"] + 1)
        token = self._call(
            "token",
            "POST",
            "/v1/portal-tokens",
            201,
            json={"stripe_customer_id": self.customer, "ttl_seconds": 300},
        )["token"]
        portal = requests.get(
            f"{self.url}/v1/customers/{self.customer}/usage",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        if portal.status_code != 200:
            raise SmokeFailed(f"portal: the token's read answered {portal.status_code}")
        self.say(f"ok  {'portal':<10} GET with the portal token  200")

    def flush(self, reported: int) -> None:
        """Report the unit to Stripe: the flush function, /_local/flush, or the schedule."""
        if self.flush_function:
            self._invoke_flush()
        else:
            local = self.http.post(f"{self.url}/_local/flush", timeout=330)
            if local.status_code == 200:
                self.say(f"ok  {'flush':<10} POST /_local/flush  200")
            elif local.status_code != 404:
                raise SmokeFailed(f"flush: /_local/flush answered {local.status_code}")
            else:
                self.say(
                    f"..  {'flush':<10} waiting for the schedule (up to {self.wait_seconds:g} s)"
                )
        deadline = time.monotonic() + self.wait_seconds
        while True:
            now = self.usage("read")
            if now["reported"] >= reported:
                self.say(
                    f"ok  {'reported':<10} Stripe confirmed the unit ({now['reported']} reported)"
                )
                return
            if time.monotonic() > deadline:
                raise SmokeFailed(f"flush: the unit was not reported within the wait: {now}")
            time.sleep(15)

    def _invoke_flush(self) -> None:
        import boto3  # only for a deployed stack; your AWS credentials and region

        assert self.flush_function is not None
        started = time.monotonic()
        answer = boto3.client("lambda").invoke(FunctionName=self.flush_function, Payload=b"{}")
        result = json.loads(answer["Payload"].read() or b"null")
        if answer.get("FunctionError"):
            raise SmokeFailed(f"flush: {self.flush_function} failed: {result}")
        ms = (time.monotonic() - started) * 1000
        self.say(
            f"ok  {'flush':<10} invoked {self.flush_function}  {ms:.0f} ms: {json.dumps(result)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make smoke", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", required=True, help="the stack's ApiUrl (or make dev's API)")
    parser.add_argument(
        "--key", default=os.environ.get("SMOKE_KEY"), help="a server key (default: $SMOKE_KEY)"
    )
    parser.add_argument("--customer", default=DEFAULT_CUSTOMER)
    parser.add_argument("--meter", help="default: the stack's first meter")
    parser.add_argument("--flush-function", help="the stack's FlushFunctionName output")
    parser.add_argument(
        "--wait", type=float, default=420, help="seconds to wait for the report (default 420)"
    )
    args = parser.parse_args(argv)
    if not args.key:
        parser.error("a key is needed: KEY=umk_... (or --key, or SMOKE_KEY)")
    smoke = Smoke(
        args.url,
        args.key,
        customer=args.customer,
        meter=args.meter,
        flush_function=args.flush_function,
        wait_seconds=args.wait,
    )
    try:
        smoke.run()
    except SmokeFailed as error:
        _say(f"FAILED  {error}")
        return 1
    _say(f"smoke test passed: {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
