"""DynamoDB adapter: the only module that talks to the usage table (DESIGN §5).

Items, all in one table:
  event       pk EVENT#<id>                 sk EVENT
  counter     pk USAGE#<customer>           sk PERIOD#<period start>#METER#<meter>#<shard>
  billing     pk USAGE#<customer>           sk BILLING  (the customer's Stripe subscription periods)
  quarantine  pk QUARANTINE                 sk <counter id>  (a counter with refused units)
  webhook     pk STRIPE_EVENT#<event id>    sk STRIPE_EVENT  (a Stripe event already handled)
  sent        pk SENT#<identifier>          sk SENT  (a decision, logged before its Stripe call)
  api key     pk APIKEY#<key id>            sk APIKEY  (the secret's hash, never the secret)
The sparse `backlog` index (keys only) holds exactly the counters with units not yet reported:
the record transaction puts a counter in, the flush takes it out once nothing is left to send.
Its partition key is spread over SHARDS values, so no index partition is hot.
"""

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError

from usage_meter import aws
from usage_meter.errors import StoreUnavailable
from usage_meter.logic.periods import period_key
from usage_meter.models.auth import ApiKey, Scope
from usage_meter.models.domain import (
    Counter,
    CustomerBilling,
    Decision,
    MeterTotals,
    SentDecision,
    Subscription,
    UsageEvent,
)

INDEX = "backlog"
PERIODS_INDEX = "periods"
SHARDS = 16
# A (customer, meter, period) counter takes its writes on shard 0; a write that meets another
# transaction on it moves to one of the others, so a hot pair spreads over this many items.
COUNTER_SHARDS = 16
# How long a record request keeps retrying a contended transaction before it answers 503.
WRITE_BUDGET_SECONDS = 3.0
SPREAD_SECONDS = 60  # how long a container keeps writing a contended pair to its other shard
QUARANTINE = "QUARANTINE"
DAY = 86_400
PAGE = 100  # counters read and worked on at once: BatchGetItem's limit
_TRANSACT_LIMIT = 100
_RETRYABLE = {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}
_THROTTLED = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
}

Item = dict[str, Any]
CounterId = tuple[str, str, str]  # customer, period start, meter


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def _event_key(event_id: str) -> Item:
    return {"pk": _s(f"EVENT#{event_id}"), "sk": _s("EVENT")}


def _counter_key(customer: str, period_start: str, meter: str, shard: int) -> Item:
    return {
        "pk": _s(f"USAGE#{customer}"),
        "sk": _s(f"PERIOD#{period_start}#METER#{meter}#{shard}"),
    }


def _key_of(counter: Counter) -> Item:
    return _counter_key(counter.customer, counter.period_start, counter.meter, counter.shard)


def _backlog_shard(key: Item) -> str:
    digest = hashlib.sha256(f"{key['pk']['S']}|{key['sk']['S']}".encode()).hexdigest()
    return f"U#{int(digest[:8], 16) % SHARDS}"


def _period_shard(key: Item, period_end: int) -> str:
    """The `periods` index key: the day the period ends, and a shard from the counter's key."""
    day = time.strftime("%Y-%m-%d", time.gmtime(period_end - 1))
    return f"END#{day}#{_backlog_shard(key).removeprefix('U#')}"


def _unavailable_when_throttled(parsed: Mapping[str, Any], **_: Any) -> None:
    """A request DynamoDB still throttles after botocore's retries is a busy table, like a
    transaction cancelled by throttling: the caller gets a 503 and retries, not a 500."""
    if parsed.get("Error", {}).get("Code") in _THROTTLED:
        raise StoreUnavailable("the usage table is busy; retry the request")


def _is_condition_failure(error: ClientError) -> bool:
    return bool(error.response["Error"]["Code"] == "ConditionalCheckFailedException")


def _is_cancelled_by_condition(error: ClientError) -> bool:
    reasons = error.response.get("CancellationReasons", [])
    return any(r.get("Code") == "ConditionalCheckFailed" for r in reasons)


class DynamoStore:
    def __init__(
        self,
        table_name: str,
        *,
        client: Any = None,
        retention_days: int = 400,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._table = table_name
        # Standard retry mode backs off on throttling; the endpoint comes from the environment.
        self._db: Any = client or aws.client(
            "dynamodb", Config(retries={"mode": "standard", "max_attempts": 6})
        )
        self._db.meta.events.register(
            "after-call.dynamodb", _unavailable_when_throttled, unique_id="usage-meter-throttled"
        )
        self._retention = retention_days * DAY
        self._clock = clock
        self._rng = rng or random.Random()
        self._spread: dict[CounterId, tuple[int, float]] = {}  # contended counters: shard, until

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
            if _key_reused(chunk, existing):
                break  # the request answers 409: it stores no more
        return existing

    def _put_chunk(self, events: list[UsageEvent]) -> Mapping[str, str]:
        """One transaction: the events and their counters. Replays drop out, the rest retry; a
        counter another transaction holds is tried on another of its shards."""
        existing: dict[str, str] = {}
        now = self._clock()
        shards = {c: shard for c, (shard, until) in self._spread.items() if until > now}
        deadline = time.monotonic() + WRITE_BUDGET_SECONDS
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            if not events:
                return existing
            counters = _counters_of(events)
            try:
                self._db.transact_write_items(TransactItems=self._writes(events, counters, shards))
                return existing
            except ClientError as error:
                reasons = [
                    r.get("Code", "None") for r in error.response.get("CancellationReasons", [])
                ]
                cancelled = error.response["Error"]["Code"] == "TransactionCanceledException"
                if not cancelled or not {"ConditionalCheckFailed", *_RETRYABLE} & set(reasons):
                    raise
            if "ConditionalCheckFailed" in reasons:
                replayed = [
                    e.id
                    for e, code in zip(events, reasons, strict=False)
                    if code == "ConditionalCheckFailed"
                ]
                existing.update(self.fingerprints(replayed))
                if _key_reused(events, existing):
                    # Another request stored one of these keys with another body since the
                    # request checked: it answers 409, so the rest of it is not stored either.
                    return existing
                events = [e for e in events if e.id not in replayed]
                continue
            for counter, code in zip(counters, reasons[len(events) :], strict=False):
                if code == "TransactionConflict":
                    # This container's next writes go there too: concurrent writers of a hot
                    # pair scatter over the shards and stay scattered while it is hot.
                    shards[counter] = self._rng.randrange(1, COUNTER_SHARDS)
                    self._spread[counter] = (shards[counter], now + SPREAD_SECONDS)
            # Full jitter, capped low: a transaction holds its items for milliseconds, so the
            # next attempt soon meets them free (or another shard).
            time.sleep(self._rng.uniform(0, min(0.1, 0.005 * 2**attempt)))
        raise StoreUnavailable("the usage table is busy; retry the request")

    def _writes(
        self,
        events: list[UsageEvent],
        counters: Mapping[CounterId, tuple[int, UsageEvent]],
        shards: Mapping[CounterId, int],
    ) -> list[Item]:
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
        # Counters outlive the events they count by two periods' worth of margin.
        expires = int(self._clock()) + self._retention + 62 * DAY
        for (customer, start, meter), (quantity, event) in counters.items():
            shard = shards.get((customer, start, meter), 0)
            counter_key = _counter_key(customer, start, meter, shard)
            end = int(event.period.end.timestamp())
            writes.append(
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": counter_key,
                        # The backlog keys never change while set, so a write to a counter
                        # already in the backlog costs no index write.
                        "UpdateExpression": "ADD quantity :q SET customer = :c, meter = :m,"
                        " period_start = :p, counter_shard = :h, expires_at = :x,"
                        " period_source = :ps, period_end = if_not_exists(period_end, :e),"
                        " period_pk = if_not_exists(period_pk, :pp),"
                        " backlog_pk = if_not_exists(backlog_pk, :bp),"
                        " backlog_sk = if_not_exists(backlog_sk, :bs)",
                        "ExpressionAttributeValues": {
                            ":q": _n(quantity),
                            ":c": _s(customer),
                            ":m": _s(meter),
                            ":p": _s(start),
                            ":e": _n(end),
                            ":pp": _s(_period_shard(counter_key, end)),
                            ":ps": _s(event.period.source),
                            ":h": _n(shard),
                            ":x": _n(expires),
                            ":bp": _s(_backlog_shard(counter_key)),
                            ":bs": counter_key["sk"],
                        },
                    }
                }
            )
        return writes

    def _event_item(self, event: UsageEvent) -> Item:
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
            "expires_at": _n(int(self._clock()) + self._retention),
        }
        if event.idempotency_key is not None:
            item["idempotency_key"] = _s(event.idempotency_key)
        return item

    # -- billing periods ---------------------------------------------------------------------

    def customer_billing(self, customer: str) -> CustomerBilling:
        return self.customer_billings([customer])[customer]

    def customer_billings(self, customers: Sequence[str]) -> Mapping[str, CustomerBilling]:
        """Each customer's known subscriptions (none when never synced): one read per 100."""
        unique = list(dict.fromkeys(customers))
        found = {
            item["customer"]["S"]: _to_billing(item)
            for item in self._batch_get([_billing_key(c) for c in unique])
        }
        return {c: found.get(c) or CustomerBilling(customer=c) for c in unique}

    def save_billing(self, billing: CustomerBilling, expected_version: int) -> bool:
        subscriptions = {k: v.model_dump(mode="json") for k, v in billing.subscriptions.items()}
        condition = "version = :seen" if expected_version else "attribute_not_exists(pk)"
        values = {
            ":c": _s(billing.customer),
            ":subs": _s(json.dumps(subscriptions, separators=(",", ":"))),
            ":next": _n(expected_version + 1),
        }
        if expected_version:
            values[":seen"] = _n(expected_version)
        return self._update_if(
            _billing_key(billing.customer),
            "SET customer = :c, subscriptions = :subs, version = :next",
            condition,
            values,
        )

    def customer_counters(self, customer: str, since: str) -> Sequence[Counter]:
        items = self._query(
            KeyConditionExpression="pk = :pk AND sk BETWEEN :from AND :to",
            ExpressionAttributeValues={
                ":pk": _s(f"USAGE#{customer}"),
                ":from": _s(f"PERIOD#{since}"),
                ":to": _s("PERIOD#~"),
            },
            ConsistentRead=True,
        )
        return [_to_counter(item, self._table) for item in items]

    def cut(self, counter: Counter, period_end: int) -> bool:
        key = _key_of(counter)
        return self._update_if(
            key,
            "SET period_end = :new, period_pk = :pp",
            "period_end = :old",
            {
                ":new": _n(period_end),
                ":old": _n(counter.period_end),
                ":pp": _s(_period_shard(key, period_end)),
            },
        )

    def counters_ending_on(self, day: str) -> Iterator[Sequence[Counter]]:
        """The counters whose period ends on `day` (YYYY-MM-DD, UTC), a page at a time."""
        for shard in range(SHARDS):
            keys = [
                {"pk": item["pk"], "sk": item["sk"]}
                for item in self._query(
                    IndexName=PERIODS_INDEX,
                    KeyConditionExpression="period_pk = :p",
                    ExpressionAttributeValues={":p": _s(f"END#{day}#{shard}")},
                )
            ]
            for start in range(0, len(keys), PAGE):
                page = self._batch_get(keys[start : start + PAGE])
                yield [_to_counter(item, self._table) for item in page]

    def stripe_event_handled(self, event_id: str) -> bool:
        item = self._db.get_item(
            TableName=self._table, Key=_stripe_event_key(event_id), ConsistentRead=True
        ).get("Item")
        return item is not None

    def remember_stripe_event(self, event_id: str, at: int) -> None:
        # Stripe retries a delivery for up to three days: remember it a little longer.
        self._db.put_item(
            TableName=self._table,
            Item={
                **_stripe_event_key(event_id),
                "handled_at": _n(at),
                "expires_at": _n(at + 4 * DAY),
            },
        )

    # -- reading -----------------------------------------------------------------------------

    def period_totals(
        self, customer: str, start: str, end: str | None = None
    ) -> Sequence[MeterTotals]:
        """The counters of the period starting at `start` (RFC 3339); given its `end`, also any
        shorter period a subscription change left inside it."""
        items = self._query(
            KeyConditionExpression="pk = :pk AND sk BETWEEN :from AND :to",
            ExpressionAttributeValues={
                ":pk": _s(f"USAGE#{customer}"),
                ":from": _s(f"PERIOD#{start}#"),
                ":to": _s(f"PERIOD#{end}" if end else f"PERIOD#{start}#~"),
            },
            ConsistentRead=True,
        )
        totals: dict[str, tuple[int, int]] = {}
        for item in items:
            counter = _to_counter(item, self._table)
            quantity, reported = totals.get(counter.meter, (0, 0))
            totals[counter.meter] = (quantity + counter.quantity, reported + counter.reported)
        return [MeterTotals(meter=m, quantity=q, reported=r) for m, (q, r) in totals.items()]

    # -- flushing ----------------------------------------------------------------------------

    def backlog(self) -> Iterator[Sequence[Counter]]:
        for shard in range(SHARDS):
            keys: list[Item] = []
            for item in self._query(
                IndexName=INDEX,
                KeyConditionExpression="backlog_pk = :s",
                ExpressionAttributeValues={":s": _s(f"U#{shard}")},
            ):
                keys.append({"pk": item["pk"], "sk": item["sk"]})
                if len(keys) == PAGE:
                    yield self._counters(keys)
                    keys = []
            if keys:
                yield self._counters(keys)

    def _counters(self, keys: list[Item]) -> list[Counter]:
        # The index is eventually consistent: decisions are made on a consistent read.
        counters = [_to_counter(item, self._table) for item in self._batch_get(keys)]
        return sorted(counters, key=lambda c: (c.customer, c.meter, c.period_start, c.shard))

    def log_send(self, counter: Counter, decision: Decision) -> None:
        key = _key_of(counter)
        try:
            self._db.put_item(
                TableName=self._table,
                Item={
                    **_sent_key(counter.identifier(decision)),
                    "counter_pk": key["pk"],
                    "counter_sk": key["sk"],
                    "customer": _s(counter.customer),
                    "meter": _s(counter.meter),
                    "period_start": _s(counter.period_start),
                    "counter_shard": _n(counter.shard),
                    "seq": _n(decision.seq),
                    "value": _n(decision.value),
                    "timestamp": _n(decision.timestamp),
                    # Stripe reports a rejection within hours; reconciliation looks back weeks.
                    "expires_at": _n(int(self._clock()) + 62 * DAY),
                },
                ConditionExpression="attribute_not_exists(pk)",  # a resend logs nothing new
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise

    def sent(self, identifier: str) -> SentDecision | None:
        item = self._db.get_item(
            TableName=self._table, Key=_sent_key(identifier), ConsistentRead=True
        ).get("Item")
        if item is None:
            return None
        return SentDecision(
            identifier=identifier,
            customer=item["customer"]["S"],
            meter=item["meter"]["S"],
            period_start=item["period_start"]["S"],
            shard=int(item["counter_shard"]["N"]),
            seq=int(item["seq"]["N"]),
            value=int(item["value"]["N"]),
            timestamp=int(item["timestamp"]["N"]),
            rejected_at=int(item["rejected_at"]["N"]) if "rejected_at" in item else None,
            reason=item["reason"]["S"] if "reason" in item else None,
        )

    def counter_of(self, sent: SentDecision) -> Counter | None:
        key = _counter_key(sent.customer, sent.period_start, sent.meter, sent.shard)
        item = self._db.get_item(TableName=self._table, Key=key, ConsistentRead=True).get("Item")
        return _to_counter(item, self._table) if item else None

    def unreport(self, counter: Counter, sent: SentDecision, reason: str, at: int) -> bool:
        key = _key_of(counter)
        values = {":v": _n(sent.value), ":s": _n(sent.seq), ":r": _s(reason[:500]), ":at": _n(at)}
        if counter.sending is not None and counter.sending.seq == sent.seq:
            # Still in flight: it leaves flight for the quarantine, as a refusal would.
            expression = (
                "ADD quarantined :v SET quarantine_reason = :r, quarantined_at = :at"
                " REMOVE sending_seq, sending_value, sending_timestamp, sending_at"
            )
            condition = "sending_seq = :s"
        else:
            expression = "ADD reported :minus, quarantined :v SET quarantine_reason = :r,"
            expression += " quarantined_at = :at"
            condition = "reported >= :v"
            condition += " AND (attribute_not_exists(sending_seq) OR sending_seq <> :s)"
            values[":minus"] = _n(-sent.value)
        return self._transact_if(
            [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": _sent_key(sent.identifier),
                        "UpdateExpression": "SET rejected_at = :at, reason = :r",
                        "ConditionExpression": "attribute_exists(pk)"
                        " AND attribute_not_exists(rejected_at)",
                        "ExpressionAttributeValues": {":at": _n(at), ":r": _s(reason[:500])},
                    }
                },
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": key,
                        "UpdateExpression": expression,
                        "ConditionExpression": condition,
                        "ExpressionAttributeValues": values,
                    }
                },
                self._quarantine_marker(counter),
            ]
        )

    def decide(self, counter: Counter, decision: Decision) -> bool:
        condition = "attribute_not_exists(sending_seq) AND "
        condition += "seq = :seen" if counter.seq else "attribute_not_exists(seq)"
        values = {
            ":next": _n(decision.seq),
            ":v": _n(decision.value),
            ":t": _n(decision.timestamp),
            ":at": _n(decision.decided_at),
        }
        if counter.seq:
            values[":seen"] = _n(counter.seq)
        return self._update_if(
            _key_of(counter),
            "SET seq = :next, sending_seq = :next, sending_value = :v, sending_timestamp = :t,"
            " sending_at = :at",
            condition,
            values,
        )

    def confirm(self, counter: Counter, decision: Decision) -> bool:
        return self._update_if(
            _key_of(counter),
            "ADD reported :v REMOVE sending_seq, sending_value, sending_timestamp, sending_at",
            "sending_seq = :s",
            {":s": _n(decision.seq), ":v": _n(decision.value)},
        )

    def quarantine(
        self, counter: Counter, decision: Decision, reason: str, at: int, *, hold: bool = False
    ) -> bool:
        key = _key_of(counter)
        values = {
            ":s": _n(decision.seq),
            ":v": _n(decision.value),
            ":r": _s(reason[:500]),
            ":at": _n(at),
        }
        expression = "ADD quarantined :v SET quarantine_reason = :r, quarantined_at = :at"
        condition = "sending_seq = :s"
        if hold:
            expression += ", held_seq = :s, held_value = :v, held_timestamp = :t, held_at = :d"
            condition += " AND attribute_not_exists(held_seq)"
            values |= {":t": _n(decision.timestamp), ":d": _n(decision.decided_at)}
        return self._transact_if(
            [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": key,
                        "UpdateExpression": expression
                        + " REMOVE sending_seq, sending_value, sending_timestamp, sending_at",
                        "ConditionExpression": condition,
                        "ExpressionAttributeValues": values,
                    }
                },
                self._quarantine_marker(counter),
            ]
        )

    def release(self, counter: Counter) -> bool:
        if counter.sending is not None or counter.unsent:
            return False
        return self._update_if(
            _key_of(counter),
            "REMOVE backlog_pk, backlog_sk",
            # `reported`: a rejection Stripe reported meanwhile takes units back to be resent
            "quantity = :q AND attribute_not_exists(sending_seq)"
            " AND (attribute_not_exists(reported) OR reported = :r)"
            " AND (attribute_not_exists(seq) OR seq = :seq)"
            " AND (attribute_not_exists(quarantined) OR quarantined = :qq)",
            {
                ":q": _n(counter.quantity),
                ":r": _n(counter.reported),
                ":seq": _n(counter.seq),
                ":qq": _n(counter.quarantined),
            },
        )

    # -- quarantine --------------------------------------------------------------------------

    def quarantined(self) -> Sequence[Counter]:
        markers = list(
            self._query(
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues={":pk": _s(QUARANTINE)},
                ConsistentRead=True,
            )
        )
        keys = [{"pk": m["counter_pk"], "sk": m["counter_sk"]} for m in markers]
        counters = [_to_counter(item, self._table) for item in self._batch_get(keys)]
        waiting = [c for c in counters if c.quarantined]
        return sorted(waiting, key=lambda c: (c.quarantined_at or 0, c.id))

    def quarantined_counter(self, counter_id: str) -> Counter | None:
        marker = self._db.get_item(
            TableName=self._table,
            Key={"pk": _s(QUARANTINE), "sk": _s(counter_id)},
            ConsistentRead=True,
        ).get("Item")
        if marker is None:
            return None
        item = self._db.get_item(
            TableName=self._table,
            Key={"pk": marker["counter_pk"], "sk": marker["counter_sk"]},
            ConsistentRead=True,
        ).get("Item")
        return _to_counter(item, self._table) if item else None

    def replay(
        self, counter: Counter, *, restamp_to: Counter | None = None, resend: bool = False
    ) -> bool:
        key = _key_of(counter)
        units = _n(counter.quarantined)
        condition = "quarantined = :q AND quarantined_at = :at"
        seen: Item = {":q": units, ":at": _n(counter.quarantined_at or 0)}
        backlog = {":bp": _s(_backlog_shard(key)), ":bs": key["sk"]}
        held = counter.held
        if resend and held is not None:
            # The held decision goes back in flight as it was: the next run sends it again.
            writes: list[Item] = [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": key,
                        "ConditionExpression": condition + " AND attribute_not_exists(sending_seq)"
                        " AND held_seq = :hs",
                        "UpdateExpression": "SET quarantined = :zero, backlog_pk = :bp,"
                        " backlog_sk = :bs, sending_seq = :hs, sending_value = :hv,"
                        " sending_timestamp = :ht, sending_at = :ha"
                        " REMOVE quarantine_reason, quarantined_at, held_seq, held_value,"
                        " held_timestamp, held_at",
                        "ExpressionAttributeValues": {
                            **seen,
                            ":zero": _n(0),
                            **backlog,
                            ":hs": _n(held.seq),
                            ":hv": _n(held.value),
                            ":ht": _n(held.timestamp),
                            ":ha": _n(held.decided_at),
                        },
                    }
                }
            ]
        elif restamp_to is None:
            # The units are unsent again: the next decision covers them, with a new identifier.
            writes = [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": key,
                        "ConditionExpression": condition,
                        "UpdateExpression": "SET quarantined = :zero, backlog_pk = :bp,"
                        " backlog_sk = :bs REMOVE quarantine_reason, quarantined_at, held_seq,"
                        " held_value, held_timestamp, held_at",
                        "ExpressionAttributeValues": {**seen, ":zero": _n(0), **backlog},
                    }
                }
            ]
        else:
            # The units leave their old period for the current one.
            target = _key_of(restamp_to)
            writes = [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": key,
                        "ConditionExpression": condition,
                        "UpdateExpression": "SET quarantined = :zero ADD quantity :minus"
                        " REMOVE quarantine_reason, quarantined_at, held_seq, held_value,"
                        " held_timestamp, held_at",
                        "ExpressionAttributeValues": {
                            **seen,
                            ":zero": _n(0),
                            ":minus": _n(-counter.quarantined),
                        },
                    }
                },
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": target,
                        "UpdateExpression": "ADD quantity :q SET customer = :c, meter = :m,"
                        " period_start = :p, period_end = if_not_exists(period_end, :e),"
                        " period_pk = if_not_exists(period_pk, :pp),"
                        " period_source = :ps, counter_shard = :h,"
                        " expires_at = if_not_exists(expires_at, :x),"
                        " backlog_pk = if_not_exists(backlog_pk, :bp),"
                        " backlog_sk = if_not_exists(backlog_sk, :bs)",
                        "ExpressionAttributeValues": {
                            ":x": _n(int(self._clock()) + self._retention + 62 * DAY),
                            ":q": units,
                            ":c": _s(restamp_to.customer),
                            ":m": _s(restamp_to.meter),
                            ":p": _s(restamp_to.period_start),
                            ":e": _n(restamp_to.period_end),
                            ":pp": _s(_period_shard(target, restamp_to.period_end)),
                            ":ps": _s(restamp_to.period_source),
                            ":h": _n(restamp_to.shard),
                            ":bp": _s(_backlog_shard(target)),
                            ":bs": target["sk"],
                        },
                    }
                },
            ]
        writes.append(
            {
                "Delete": {
                    "TableName": self._table,
                    "Key": {"pk": _s(QUARANTINE), "sk": _s(counter.id)},
                }
            }
        )
        return self._transact_if(writes)

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

    def _transact_if(self, writes: list[Item]) -> bool:
        """A transaction; False when a condition in it no longer holds (nothing is written)."""
        try:
            self._db.transact_write_items(TransactItems=writes)
        except ClientError as error:
            if _is_cancelled_by_condition(error):
                return False
            raise
        return True

    def _quarantine_marker(self, counter: Counter) -> Item:
        """The write that lists a counter among the quarantined ones (operators find it)."""
        key = _key_of(counter)
        return {
            "Put": {
                "TableName": self._table,
                "Item": {
                    "pk": _s(QUARANTINE),
                    "sk": _s(counter.id),
                    "counter_pk": key["pk"],
                    "counter_sk": key["sk"],
                },
            }
        }

    def _update_if(
        self, key: Item, expression: str, condition: str, values: Mapping[str, Any]
    ) -> bool:
        """A conditional update; False when its condition no longer holds."""
        try:
            self._db.update_item(
                TableName=self._table,
                Key=key,
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeValues=dict(values),
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True

    def _query(self, **kwargs: Any) -> Iterator[Item]:
        # Paged by hand: botocore's paginator loads its model by listing every service's data
        # directory, about 10 ms of a read's first request after a cold start (issue 13).
        while True:
            page = self._db.query(TableName=self._table, **kwargs)
            yield from page["Items"]
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

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
                time.sleep(self._rng.uniform(0, 0.05 * 2**attempt))
            else:
                raise StoreUnavailable("the usage table is busy; retry the request")


def _counters_of(events: Sequence[UsageEvent]) -> dict[CounterId, tuple[int, UsageEvent]]:
    """Each counter the events add to, in order of first use: (units, an event of it)."""
    counters: dict[CounterId, tuple[int, UsageEvent]] = {}
    for event in events:
        counter = (event.customer, period_key(event.period), event.meter)
        quantity, _ = counters.get(counter, (0, event))
        counters[counter] = (quantity + event.quantity, event)
    return counters


def _key_reused(events: Sequence[UsageEvent], stored: Mapping[str, str]) -> bool:
    """Whether one of the events' idempotency keys is stored with another body."""
    return any(e.id in stored and stored[e.id] != e.fingerprint for e in events)


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


def _sent_key(identifier: str) -> Item:
    return {"pk": _s(f"SENT#{identifier}"), "sk": _s("SENT")}


def _billing_key(customer: str) -> Item:
    return {"pk": _s(f"USAGE#{customer}"), "sk": _s("BILLING")}


def _stripe_event_key(event_id: str) -> Item:
    return {"pk": _s(f"STRIPE_EVENT#{event_id}"), "sk": _s("STRIPE_EVENT")}


def _to_billing(item: Item) -> CustomerBilling:
    subscriptions = json.loads(item["subscriptions"]["S"])
    return CustomerBilling(
        customer=item["customer"]["S"],
        subscriptions={k: Subscription.model_validate(v) for k, v in subscriptions.items()},
        version=int(item["version"]["N"]),
    )


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


def _to_counter(item: Item, namespace: str) -> Counter:
    def number(name: str) -> int:
        return int(item[name]["N"]) if name in item else 0

    def decision(prefix: str) -> Decision | None:
        """The decision stored under prefix_seq, _value, _timestamp and _at, if any."""
        if f"{prefix}_seq" not in item:
            return None
        return Decision(
            seq=number(f"{prefix}_seq"),
            value=number(f"{prefix}_value"),
            timestamp=number(f"{prefix}_timestamp"),
            decided_at=number(f"{prefix}_at"),
        )

    return Counter(
        namespace=namespace,
        sending=decision("sending"),
        held=decision("held"),
        customer=item["customer"]["S"],
        meter=item["meter"]["S"],
        period_start=item["period_start"]["S"],
        period_end=number("period_end"),
        period_source=item["period_source"]["S"] if "period_source" in item else "calendar_month",
        shard=number("counter_shard"),
        quantity=number("quantity"),
        reported=number("reported"),
        quarantined=number("quarantined"),
        seq=number("seq"),
        quarantine_reason=item["quarantine_reason"]["S"] if "quarantine_reason" in item else None,
        quarantined_at=number("quarantined_at") if "quarantined_at" in item else None,
    )
