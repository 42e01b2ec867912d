"""Fault injection for the flush: a DynamoDB client that throttles, conflicts or dies on cue, and
the invariant every scenario must end in."""

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from devtools.fake_stripe import FakeStripe
from usage_meter.logic.periods import calendar_month, period_key
from usage_meter.models.domain import BatchState
from usage_meter.store.dynamodb import DynamoStore


class Crash(BaseException):
    """The process died here. BaseException, so no `except Exception` in the code under test
    can swallow it, as nothing survives a real kill."""


def _client_error(code: str, operation: str, reasons: list[str] | None = None) -> ClientError:
    response: dict[str, Any] = {"Error": {"Code": code, "Message": f"injected {code}"}}
    if reasons is not None:
        response["CancellationReasons"] = [{"Code": r} for r in reasons]
    return ClientError(response, operation)  # type: ignore[arg-type]


@dataclass
class Fault:
    operation: str  # boto3 method name: update_item, put_item, transact_write_items, ...
    at_call: int  # 1-based count of calls to that operation
    kind: str  # crash | throttle | conflict | condition


class FaultyDynamoDB:
    """Wraps a real boto3 DynamoDB client. After a crash every call raises Crash: the process is
    gone, so nothing it would have done afterwards happens."""

    def __init__(self, client: Any, faults: Iterable[Fault] = ()) -> None:
        self._client = client
        self._faults = list(faults)
        self._calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target) or name in ("get_paginator", "meta", "exceptions"):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            fault = self._before(name)
            if fault is None:
                return target(*args, **kwargs)
            if fault.kind == "throttle":
                raise _client_error("ProvisionedThroughputExceededException", name)
            if fault.kind == "conflict":  # a concurrent transaction touched the same items
                writes = len(kwargs.get("TransactItems", [])) or 1
                raise _client_error(
                    "TransactionCanceledException",
                    name,
                    ["TransactionConflict"] + ["None"] * (writes - 1),
                )
            if fault.kind == "condition":
                return self._applied_then_condition_failed(name, target, kwargs)
            raise ValueError(f"unknown fault {fault.kind}")

        return call

    def _applied_then_condition_failed(self, name: str, target: Any, kwargs: dict[str, Any]) -> Any:
        """The write is applied, its answer is lost, and the SDK's retry fails its own
        condition: what DynamoDB really does to a conditional write retried after a timeout."""
        target(**kwargs)
        if name == "transact_write_items":
            writes = len(kwargs["TransactItems"])
            raise _client_error(
                "TransactionCanceledException",
                name,
                ["ConditionalCheckFailed"] + ["None"] * (writes - 1),
            )
        error = _client_error("ConditionalCheckFailedException", name)
        if kwargs.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD":
            current = self._client.get_item(
                TableName=kwargs["TableName"], Key=kwargs["Key"], ConsistentRead=True
            )
            error.response["Item"] = current.get("Item", {})
        raise error

    def get_paginator(self, name: str) -> Any:
        if self._before(name) is not None:
            raise _client_error("ProvisionedThroughputExceededException", name)
        return self._client.get_paginator(name)

    def _before(self, operation: str) -> Fault | None:
        """Count the call; die if the process is dead or this is its kill point; else the fault."""
        with self._lock:
            if self.dead:
                raise Crash(f"dead before {operation}")
            self._calls[operation] += 1
            count = self._calls[operation]
            fault = next(
                (f for f in self._faults if f.operation == operation and f.at_call == count), None
            )
            if fault is not None and fault.kind == "crash":
                self.dead = True
                raise Crash(f"killed at {operation} #{count}")
            return fault


@dataclass
class Ledger:
    """What the service accepted, per (customer, meter, period): the truth Stripe must match."""

    accepted: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def add(self, customer: str, meter: str, quantity: int, timestamp: int) -> None:
        period = period_key(calendar_month(datetime.fromtimestamp(timestamp, UTC)))
        self.accepted[(customer, meter, period)] += quantity


def stripe_totals(stripe: FakeStripe) -> Counter[tuple[str, str, str]]:
    """What Stripe accepted, each identifier once, by the period its timestamp falls in."""
    totals: Counter[tuple[str, str, str]] = Counter()
    for event in stripe.accepted():
        period = period_key(calendar_month(datetime.fromtimestamp(event.timestamp, UTC)))
        totals[(event.customer, event.event_name, period)] += event.value
    return totals


def check_invariant(ledger: Ledger, stripe: FakeStripe, store: DynamoStore) -> dict[str, int]:
    """Nothing lost, nothing doubled, nothing left unreported except quarantined batches.

    Returns the units lost and doubled (both 0 when the invariant holds)."""
    quarantined: Counter[tuple[str, str, str]] = Counter()
    for batch in store.quarantined_batches():
        quarantined[(batch.customer, batch.meter, batch.period_start)] += batch.quantity
    billed = stripe_totals(stripe)
    lost = doubled = 0
    for key in set(ledger.accepted) | set(billed):
        difference = billed[key] + quarantined[key] - ledger.accepted[key]
        doubled += max(difference, 0)
        lost += max(-difference, 0)
    left = sum(1 for _ in store.backlog()) + sum(
        1 for b in store.open_batches() if b.state in (BatchState.PLANNED, BatchState.CLAIMED)
    )
    return {"lost": lost, "doubled": doubled, "left_unreported": left}
