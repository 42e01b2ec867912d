"""A small usage-meter world for fault tests: a table on DynamoDB Local, the fake Stripe behind
the real SDK, a ledger of accepted usage, and flush runs that can be made to fail."""

import random
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import ClientError

from devtools.fake_stripe import FakeStripe
from tests.faults.harness import Crash, Fault, FaultyDynamoDB, Ledger, check_invariant
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.logic.record import record_events
from usage_meter.models.input import EventIn
from usage_meter.models.output import FlushSummary
from usage_meter.store.dynamodb import DynamoStore

METERS = {"ai_messages", "api_calls"}
FAST = FlushPolicy(reserve_seconds=1.0, backoff_base=0.01, backoff_cap=0.05)


class World:
    def __init__(self, table_name: str, endpoint_url: str, stripe: FakeStripe) -> None:
        self.table = table_name
        self.endpoint_url = endpoint_url
        self.stripe = stripe
        self.ledger = Ledger()
        self.store = DynamoStore(table_name, client=self.client())

    def client(self) -> Any:
        return boto3.client(
            "dynamodb",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )

    def record(self, events: Iterable[dict[str, Any]], now: datetime | None = None) -> None:
        requests = [EventIn.model_validate(e) for e in events]
        results = record_events(
            requests, meters=METERS, store=self.store, now=now or datetime.now(UTC), batch=True
        )
        for request, result in zip(requests, results, strict=True):
            if not result.duplicate:
                when = request.timestamp or now or datetime.now(UTC)
                self.ledger.add(
                    request.stripe_customer_id,
                    request.meter,
                    request.quantity,
                    int(when.timestamp()),
                )

    def record_random(self, rng: random.Random, count: int, customers: int = 3) -> None:
        now = int(time.time())
        self.record(
            {
                "stripe_customer_id": f"cus_F{rng.randrange(customers)}",
                "meter": rng.choice(sorted(METERS)),
                "quantity": rng.randint(1, 10 ** rng.randint(0, 6)),
                "timestamp": now - rng.randrange(6 * 3600),
                "idempotency_key": f"k{rng.randrange(10**9)}",
            }
            for _ in range(count)
        )

    def flush(
        self,
        faults: Iterable[Fault] = (),
        *,
        time_left: Any = None,
        policy: FlushPolicy = FAST,
        stripe_timeout: float = 2.0,
    ) -> FlushSummary | None:
        """One run, as one Lambda invocation; None when it was killed or failed."""
        store = DynamoStore(self.table, client=FaultyDynamoDB(self.client(), faults))
        billing = StripeMeterBilling(
            "sk_test_faults",
            api_base=self.stripe.url,
            timeout_seconds=stripe_timeout,
            max_network_retries=2,
            max_requests_per_second=1000,
        )
        flusher = Flusher(store, billing, time_left=time_left or (lambda: 300.0), policy=policy)
        try:
            return flusher.run()
        except (Crash, ClientError):  # killed, or failed reading the backlog: the invocation errs
            return None

    def settle(self, runs: int = 5) -> None:
        """Later runs with no faults: what every deployment gets on the next schedule ticks."""
        for _ in range(runs):
            summary = self.flush()
            assert summary is not None
            if (
                not summary.errors
                and summary.groups_deferred == 0
                and not self.store.open_batches()
            ):
                return

    def invariant(self) -> dict[str, int]:
        return check_invariant(self.ledger, self.stripe, self.store)
