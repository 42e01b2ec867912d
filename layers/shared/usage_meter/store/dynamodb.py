"""DynamoDB adapter: the only module that talks to the usage table (DESIGN §5).

Items, all in one table:
  event    pk EVENT#<id>                 sk EVENT
  counter  pk USAGE#<customer>           sk PERIOD#<period start>#METER#<meter>
  batch    pk BATCH#<id>                 sk BATCH
  api key  pk APIKEY#<key id>            sk APIKEY  (the secret's hash, never the secret)
The sparse `unreported` index is keyed on backlog_pk/backlog_sk, which only the backlog carries:
unclaimed events (U#<shard>), open batches (B#open) and quarantined batches (B#quarantined).
"""

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

from usage_meter.errors import StoreUnavailable
from usage_meter.logic.periods import period_key
from usage_meter.models.auth import ApiKey, Scope
from usage_meter.models.domain import BacklogEvent, Batch, BatchState, MeterTotals, UsageEvent

INDEX = "unreported"
SHARDS = 16
OPEN, QUARANTINED = "B#open", "B#quarantined"
DAY = 86_400
_TRANSACT_LIMIT = 100
_RETRYABLE = {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}

Item = dict[str, Any]


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def shard_of(customer: str) -> str:
    return f"U#{int(hashlib.sha256(customer.encode()).hexdigest()[:8], 16) % SHARDS}"


def _event_key(event_id: str) -> Item:
    return {"pk": _s(f"EVENT#{event_id}"), "sk": _s("EVENT")}


def _batch_key(batch_id: str) -> Item:
    return {"pk": _s(f"BATCH#{batch_id}"), "sk": _s("BATCH")}


def _counter_key(customer: str, period_start: str, meter: str) -> Item:
    return {"pk": _s(f"USAGE#{customer}"), "sk": _s(f"PERIOD#{period_start}#METER#{meter}")}


def _is_condition_failure(error: ClientError) -> bool:
    return bool(error.response["Error"]["Code"] == "ConditionalCheckFailedException")


class DynamoStore:
    def __init__(
        self,
        table_name: str,
        *,
        client: Any = None,
        retention_days: int = 400,
        clock: Callable[[], float] = time.time,
        claim_workers: int = 8,
    ) -> None:
        self._table = table_name
        # botocore without boto3: the same client, a third less cold-start import time.
        # Standard retry mode backs off on throttling; the endpoint comes from the environment.
        self._db: Any = client or botocore.session.get_session().create_client(
            "dynamodb", config=Config(retries={"mode": "standard", "max_attempts": 6})
        )
        self._retention = retention_days * DAY
        self._clock = clock
        self._claim_workers = claim_workers

    # -- recording ---------------------------------------------------------------------------

    def fingerprints(self, event_ids: Sequence[str]) -> Mapping[str, str]:
        keys = [_event_key(i) for i in event_ids]
        return {
            item["id"]["S"]: item["fingerprint"]["S"]
            for item in self._batch_get(keys, "id, fingerprint")
        }

    def put_events(self, events: Sequence[UsageEvent]) -> Mapping[str, str]:
        existing: dict[str, str] = {}
        for chunk in _transaction_chunks(events):
            existing.update(self._put_chunk(chunk))
        return existing

    def _put_chunk(self, events: list[UsageEvent]) -> Mapping[str, str]:
        """One transaction: the events and their counters. Replays drop out, the rest retry."""
        existing: dict[str, str] = {}
        while events:
            reasons = self._transact(self._event_writes(events))
            if reasons is None:
                break
            replayed = [
                e.id
                for e, code in zip(events, reasons, strict=False)
                if code == "ConditionalCheckFailed"
            ]
            existing.update(self.fingerprints(replayed))
            events = [e for e in events if e.id not in replayed]
        return existing

    def _event_writes(self, events: list[UsageEvent]) -> list[Item]:
        writes: list[Item] = [
            {
                "Put": {
                    "TableName": self._table,
                    "Item": self._event_item(event),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
            for event in events
        ]
        counters: dict[tuple[str, str, str], int] = {}
        for event in events:
            key = (event.customer, period_key(event.period), event.meter)
            counters[key] = counters.get(key, 0) + event.quantity
        # Counters outlive the events they count by two periods' worth of margin.
        expires = int(self._clock()) + self._retention + 62 * DAY
        for (customer, start, meter), quantity in counters.items():
            writes.append(
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": _counter_key(customer, start, meter),
                        "UpdateExpression": "ADD quantity :q SET customer = :c, meter = :m,"
                        " period_start = :p, expires_at = :x",
                        "ExpressionAttributeValues": {
                            ":q": _n(quantity),
                            ":c": _s(customer),
                            ":m": _s(meter),
                            ":p": _s(start),
                            ":x": _n(expires),
                        },
                    }
                }
            )
        return writes

    @staticmethod
    def _event_item(event: UsageEvent) -> Item:
        item = {
            **_event_key(event.id),
            "type": _s("event"),
            "id": _s(event.id),
            "customer": _s(event.customer),
            "meter": _s(event.meter),
            "quantity": _n(event.quantity),
            "event_time": _n(event.event_time),
            "received_at": _n(event.received_at),
            "period_start": _s(period_key(event.period)),
            "fingerprint": _s(event.fingerprint),
            "backlog_pk": _s(shard_of(event.customer)),
            "backlog_sk": _s(f"{event.event_time:011d}#{event.id}"),
        }
        if event.idempotency_key is not None:
            item["idempotency_key"] = _s(event.idempotency_key)
        return item

    # -- reading -----------------------------------------------------------------------------

    def period_totals(self, customer: str, period_start: str) -> Sequence[MeterTotals]:
        items = self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
            ExpressionAttributeValues={
                ":pk": _s(f"USAGE#{customer}"),
                ":prefix": _s(f"PERIOD#{period_start}#METER#"),
            },
            ConsistentRead=True,
        )
        return [
            MeterTotals(
                meter=item["meter"]["S"],
                quantity=int(item.get("quantity", {"N": "0"})["N"]),
                reported=int(item.get("reported", {"N": "0"})["N"]),
            )
            for item in items
        ]

    # -- flushing ----------------------------------------------------------------------------

    def backlog(self) -> Iterator[BacklogEvent]:
        for shard in range(SHARDS):
            items = self._query(
                IndexName=INDEX,
                KeyConditionExpression="backlog_pk = :s",
                ExpressionAttributeValues={":s": _s(f"U#{shard}")},
            )
            for item in items:
                yield BacklogEvent(
                    id=item["pk"]["S"].removeprefix("EVENT#"),
                    customer=item["customer"]["S"],
                    meter=item["meter"]["S"],
                    quantity=int(item["quantity"]["N"]),
                    event_time=int(item["event_time"]["N"]),
                    period_start=item["period_start"]["S"],
                )

    def open_batches(self) -> Sequence[Batch]:
        return self._batches_in(OPEN)

    def quarantined_batches(self) -> Sequence[Batch]:
        return self._batches_in(QUARANTINED)

    def _batches_in(self, partition: str) -> list[Batch]:
        index_items = self._query(
            IndexName=INDEX,
            KeyConditionExpression="backlog_pk = :s",
            ExpressionAttributeValues={":s": _s(partition)},
        )
        keys = [{"pk": i["pk"], "sk": i["sk"]} for i in index_items]
        batches = (_to_batch(item) for item in self._batch_get(keys))
        return sorted(batches, key=lambda b: (b.planned_at, b.id))

    def get_batch(self, batch_id: str) -> Batch | None:
        item = self._db.get_item(
            TableName=self._table, Key=_batch_key(batch_id), ConsistentRead=True
        ).get("Item")
        return _to_batch(item) if item else None

    def create_batch(self, batch: Batch) -> Batch:
        item = {
            **_batch_key(batch.id),
            "type": _s("batch"),
            "id": _s(batch.id),
            "identifier": _s(batch.identifier),
            "customer": _s(batch.customer),
            "meter": _s(batch.meter),
            "period_start": _s(batch.period_start),
            "hour": _n(batch.hour),
            "state": _s(batch.state),
            "event_ids": {"L": [_s(i) for i in batch.event_ids]},
            "quantity": _n(batch.quantity),
            "timestamp": _n(batch.timestamp),
            "planned_at": _n(batch.planned_at),
            "backlog_pk": _s(OPEN),
            "backlog_sk": _s(f"{batch.planned_at:011d}#{batch.id}"),
        }
        try:
            self._db.put_item(
                TableName=self._table, Item=item, ConditionExpression="attribute_not_exists(pk)"
            )
            return batch
        except ClientError as error:
            if not _is_condition_failure(error):
                raise
        return self._stored(batch.id)  # planned before, by this or a concurrent run

    def claim(self, batch: Batch) -> Mapping[str, tuple[int, int]]:
        expires = int(self._clock()) + self._retention

        def claim_one(event_id: str) -> tuple[str, tuple[int, int]] | None:
            item: Item
            try:
                item = self._db.update_item(
                    TableName=self._table,
                    Key=_event_key(event_id),
                    # Still unclaimed, or already ours from an interrupted run.
                    ConditionExpression="attribute_exists(backlog_pk) OR batch_id = :b",
                    UpdateExpression="REMOVE backlog_pk, backlog_sk"
                    " SET batch_id = :b, expires_at = :x",
                    ExpressionAttributeValues={":b": _s(batch.id), ":x": _n(expires)},
                    ReturnValues="ALL_NEW",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )["Attributes"]
            except ClientError as error:
                if not _is_condition_failure(error):
                    raise
                # A retry whose first attempt was applied sees its own claim: still ours.
                item = cast(Item, error.response.get("Item") or {})
                if item.get("batch_id") != _s(batch.id):
                    return None  # a concurrent run's batch has it
            return event_id, (int(item["quantity"]["N"]), int(item["event_time"]["N"]))

        with ThreadPoolExecutor(max_workers=self._claim_workers) as pool:
            return dict(r for r in pool.map(claim_one, batch.event_ids) if r is not None)

    def mark_claimed(
        self, batch: Batch, quantity: int, timestamp: int, event_ids: Sequence[str]
    ) -> Batch:
        state = BatchState.CLAIMED if event_ids else BatchState.EMPTY
        leave_index = " REMOVE backlog_pk, backlog_sk" if state == BatchState.EMPTY else ""
        try:
            self._db.update_item(
                TableName=self._table,
                Key=_batch_key(batch.id),
                ConditionExpression="#state = :planned",
                UpdateExpression="SET #state = :state, quantity = :q, #ts = :t, event_ids = :ids,"
                " claimed_at = :now" + leave_index,
                ExpressionAttributeNames={"#state": "state", "#ts": "timestamp"},
                ExpressionAttributeValues={
                    ":planned": _s(BatchState.PLANNED),
                    ":state": _s(state),
                    ":q": _n(quantity),
                    ":t": _n(timestamp),
                    ":ids": {"L": [_s(i) for i in event_ids]},
                    ":now": _n(int(self._clock())),
                },
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise
            return self._stored(batch.id)  # another run fixed it first; theirs is the truth
        return batch.model_copy(
            update={
                "state": state,
                "quantity": quantity,
                "timestamp": timestamp,
                "event_ids": tuple(event_ids),
            }
        )

    def confirm(self, batch: Batch, reported_at: int) -> None:
        failed = self._transact(
            [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": _batch_key(batch.id),
                        "ConditionExpression": "#state = :claimed AND identifier = :id",
                        "UpdateExpression": "SET #state = :reported, reported_at = :at,"
                        " expires_at = :x REMOVE backlog_pk, backlog_sk",
                        "ExpressionAttributeNames": {"#state": "state"},
                        "ExpressionAttributeValues": {
                            ":claimed": _s(BatchState.CLAIMED),
                            ":reported": _s(BatchState.REPORTED),
                            ":id": _s(batch.identifier),
                            ":at": _n(reported_at),
                            ":x": _n(reported_at + self._retention),
                        },
                    }
                },
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": _counter_key(batch.customer, batch.period_start, batch.meter),
                        "UpdateExpression": "ADD reported :q",
                        "ExpressionAttributeValues": {":q": _n(batch.quantity)},
                    }
                },
            ]
        )
        # A failed condition is fine only when a concurrent run confirmed it: counted once.
        if failed and self._stored(batch.id).state != BatchState.REPORTED:
            raise RuntimeError(f"batch {batch.id} changed state while it was being confirmed")

    def quarantine(self, batch: Batch, reason: str) -> None:
        now = int(self._clock())
        self._db.update_item(
            TableName=self._table,
            Key=_batch_key(batch.id),
            ConditionExpression="#state = :claimed",
            UpdateExpression="SET #state = :q, reason = :r, quarantined_at = :now,"
            " backlog_pk = :pk, backlog_sk = :sk",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":claimed": _s(BatchState.CLAIMED),
                ":q": _s(BatchState.QUARANTINED),
                ":r": _s(reason[:1000]),
                ":now": _n(now),
                ":pk": _s(QUARANTINED),
                ":sk": _s(f"{now:011d}#{batch.id}"),
            },
        )

    def replay(self, batch: Batch, identifier: str, timestamp: int) -> Batch:
        now = int(self._clock())
        self._db.update_item(
            TableName=self._table,
            Key=_batch_key(batch.id),
            ConditionExpression="#state = :q AND identifier = :old",
            UpdateExpression="SET #state = :claimed, identifier = :new, #ts = :t,"
            " replayed_at = :now, backlog_pk = :pk, backlog_sk = :sk",
            ExpressionAttributeNames={"#state": "state", "#ts": "timestamp"},
            ExpressionAttributeValues={
                ":q": _s(BatchState.QUARANTINED),
                ":claimed": _s(BatchState.CLAIMED),
                ":old": _s(batch.identifier),
                ":new": _s(identifier),
                ":t": _n(timestamp),
                ":now": _n(now),
                ":pk": _s(OPEN),
                ":sk": _s(f"{now:011d}#{batch.id}"),
            },
        )
        return batch.model_copy(
            update={"state": BatchState.CLAIMED, "identifier": identifier, "timestamp": timestamp}
        )

    # -- server keys -------------------------------------------------------------------------

    def get_api_key(self, key_id: str) -> ApiKey | None:
        item = self._db.get_item(
            TableName=self._table, Key=_api_key_key(key_id), ConsistentRead=True
        ).get("Item")
        return _to_api_key(item) if item else None

    def put_api_key(self, key: ApiKey) -> None:
        self._db.put_item(
            TableName=self._table,
            Item={
                **_api_key_key(key.key_id),
                "type": _s("api_key"),
                "key_id": _s(key.key_id),
                "name": _s(key.name),
                "scopes": {"SS": sorted(key.scopes)},
                "secret_hash": _s(key.secret_hash),
                "created_at": _n(key.created_at),
            },
            ConditionExpression="attribute_not_exists(pk)",
        )

    def list_api_keys(self) -> Sequence[ApiKey]:
        # Keys are few and listed rarely, by an operator: a filtered scan is the right cost.
        paginator = self._db.get_paginator("scan")
        pages = paginator.paginate(
            TableName=self._table,
            FilterExpression="#type = :t",
            ExpressionAttributeNames={"#type": "type"},
            ExpressionAttributeValues={":t": _s("api_key")},
        )
        keys = [_to_api_key(item) for page in pages for item in page["Items"]]
        return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    def revoke_api_key(self, key_id: str, at: int) -> bool:
        try:
            self._db.update_item(
                TableName=self._table,
                Key=_api_key_key(key_id),
                ConditionExpression="attribute_exists(pk) AND attribute_not_exists(revoked_at)",
                UpdateExpression="SET revoked_at = :at",
                ExpressionAttributeValues={":at": _n(at)},
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True

    # -- plumbing ----------------------------------------------------------------------------

    def _transact(self, writes: list[Item]) -> list[str] | None:
        """Run a transaction, retrying contention and throttling.

        Returns None once it commits, or the per-item cancellation codes when a condition failed.
        """
        for attempt in range(8):
            try:
                self._db.transact_write_items(TransactItems=writes)
                return None
            except ClientError as error:
                if error.response["Error"]["Code"] != "TransactionCanceledException":
                    raise
                reasons = [
                    r.get("Code", "None") for r in error.response.get("CancellationReasons", [])
                ]
                if "ConditionalCheckFailed" in reasons:
                    return reasons
                if not _RETRYABLE.intersection(reasons):
                    raise
                time.sleep(random.uniform(0, 0.05 * 2**attempt))
        raise StoreUnavailable("the usage table is busy; retry the request")

    def _stored(self, batch_id: str) -> Batch:
        stored = self.get_batch(batch_id)
        if stored is None:
            raise LookupError(f"batch {batch_id} vanished")
        return stored

    def _query(self, **kwargs: Any) -> Iterator[Item]:
        paginator = self._db.get_paginator("query")
        for page in paginator.paginate(TableName=self._table, **kwargs):
            yield from page["Items"]

    def _batch_get(self, keys: list[Item], projection: str | None = None) -> Iterable[Item]:
        for start in range(0, len(keys), 100):
            request: Item = {"Keys": keys[start : start + 100], "ConsistentRead": True}
            if projection:
                request["ProjectionExpression"] = projection
            pending = {self._table: request}
            for attempt in range(10):
                response = self._db.batch_get_item(RequestItems=pending)
                yield from response["Responses"].get(self._table, [])
                pending = response.get("UnprocessedKeys") or {}
                if not pending:
                    break
                time.sleep(random.uniform(0, 0.05 * 2**attempt))
            else:
                raise StoreUnavailable("the usage table is busy; retry the request")


def _transaction_chunks(events: Sequence[UsageEvent]) -> Iterator[list[UsageEvent]]:
    """Chunks whose events plus distinct counters fit in one transaction."""
    chunk: list[UsageEvent] = []
    counters: set[tuple[str, str, str]] = set()
    for event in events:
        counter = (event.customer, period_key(event.period), event.meter)
        if len(chunk) + 1 + len(counters | {counter}) > _TRANSACT_LIMIT:
            yield chunk
            chunk, counters = [], set()
        chunk.append(event)
        counters.add(counter)
    if chunk:
        yield chunk


def _api_key_key(key_id: str) -> Item:
    return {"pk": _s(f"APIKEY#{key_id}"), "sk": _s("APIKEY")}


def _to_api_key(item: Item) -> ApiKey:
    revoked = item.get("revoked_at")
    return ApiKey(
        key_id=item["key_id"]["S"],
        name=item["name"]["S"],
        scopes=frozenset(Scope(s) for s in item["scopes"]["SS"]),
        secret_hash=item["secret_hash"]["S"],
        created_at=int(item["created_at"]["N"]),
        revoked_at=int(revoked["N"]) if revoked else None,
    )


def _to_batch(item: Item) -> Batch:
    def optional(name: str, kind: str) -> Any:
        return item[name][kind] if name in item else None

    reported_at = optional("reported_at", "N")
    return Batch(
        id=item["id"]["S"],
        identifier=item["identifier"]["S"],
        customer=item["customer"]["S"],
        meter=item["meter"]["S"],
        period_start=item["period_start"]["S"],
        hour=int(item["hour"]["N"]),
        state=BatchState(item["state"]["S"]),
        event_ids=tuple(v["S"] for v in item["event_ids"]["L"]),
        quantity=int(item["quantity"]["N"]),
        timestamp=int(item["timestamp"]["N"]),
        planned_at=int(item["planned_at"]["N"]),
        reported_at=int(reported_at) if reported_at is not None else None,
        reason=optional("reason", "S"),
    )
