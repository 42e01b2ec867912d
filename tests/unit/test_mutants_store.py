"""The DynamoDB store's contract on moto, fast enough for the mutation run (issue 15).

tests/integration/test_store.py checks the same adapter in depth on DynamoDB Local; the mutation
run can't start a JVM per mutant, so these tests pin, on moto, what a changed line of
store/dynamodb.py would break: every conditional write refused when its condition fails and
changing nothing, the items' expiry, the backlog's pages and shards, the retries of a contended
or throttled write and of BatchGetItem's unprocessed keys.
"""

import json
import random
from datetime import UTC, datetime

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from usage_meter.errors import StoreUnavailable
from usage_meter.logic.record import record_events
from usage_meter.models.auth import ApiKey, Scope
from usage_meter.models.domain import (
    Counter,
    CustomerBilling,
    Decision,
    ItemPeriods,
    Period,
    SentDecision,
    Subscription,
    UsageEvent,
)
from usage_meter.models.input import EventIn
from usage_meter.store import dynamodb
from usage_meter.store.dynamodb import DAY, DynamoStore

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
T = int(NOW.timestamp())
PERIOD = "2026-11-01T00:00:00Z"
PERIOD_END = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
NEXT_PERIOD = "2026-12-01T00:00:00Z"
RETENTION_DAYS = 30


class Clock:
    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NoWait(random.Random):
    """Jitter of zero seconds, so retries take no time (it remembers each upper bound asked
    for, checking the lower one is 0), and the lowest shard a contended write may move to."""

    def __init__(self) -> None:
        super().__init__(3)
        self.bounds: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        assert a == 0
        self.bounds.append(b)
        return 0.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        return start if stop is not None else 0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(moto_table, clock) -> DynamoStore:
    return DynamoStore(
        moto_table.name,
        client=moto_table.client,
        clock=clock,
        rng=NoWait(),
        retention_days=RETENTION_DAYS,
    )


def record(store, *events: dict, now: datetime = NOW) -> list:
    requests = [
        EventIn.model_validate({"stripe_customer_id": "cus_A", "meter": "m", "quantity": 1, **e})
        for e in events
    ]
    return record_events(requests, meters={"m", "n"}, store=store, now=now, batch=len(requests) > 1)


def get(table, pk: str, sk: str) -> dict | None:
    key = {"pk": {"S": pk}, "sk": {"S": sk}}
    return table.client.get_item(TableName=table.name, Key=key, ConsistentRead=True).get("Item")


def counter_item(table, customer="cus_A", meter="m", shard=0, period=PERIOD) -> dict | None:
    return get(table, f"USAGE#{customer}", f"PERIOD#{period}#METER#{meter}#{shard}")


def backlog(store) -> list[Counter]:
    return [counter for page in store.backlog() for counter in page]


def only(store) -> Counter:
    [counter] = backlog(store)
    return counter


def totals(store, customer="cus_A", start=PERIOD, end=None) -> dict[str, tuple[int, int]]:
    return {t.meter: (t.quantity, t.reported) for t in store.period_totals(customer, start, end)}


def decision_for(counter: Counter, *, value: int | None = None, at: int = T) -> Decision:
    value = counter.unsent if value is None else value
    return Decision(seq=counter.seq + 1, value=value, timestamp=at - 60, decided_at=at)


def in_flight(store, counter: Counter, decision: Decision | None = None) -> Counter:
    decision = decision or decision_for(counter)
    assert store.decide(counter, decision)
    return counter.model_copy(update={"seq": decision.seq, "sending": decision})


def quarantined(store, counter: Counter, *, hold: bool = False, at: int = T) -> Counter:
    flying = in_flight(store, counter)
    assert flying.sending is not None
    assert store.quarantine(flying, flying.sending, "resource_missing: no customer", at, hold=hold)
    found = store.quarantined_counter(counter.id)
    assert found is not None
    return found


def transactions(table) -> list[list[dict]]:
    """Every TransactWriteItems the table is sent from now on: its writes."""
    sent: list[list[dict]] = []
    table.client.meta.events.register(
        "before-call.dynamodb.TransactWriteItems",
        lambda params, **_: sent.append(json.loads(params["body"])["TransactItems"]),
    )
    return sent


def cancel_transactions(table, codes, count: int) -> list[int]:
    """AWS's cancellation of the next `count` TransactWriteItems: `codes(write)` is each write's
    reason. Returns a one-item list counting the cancellations left."""
    left = [count]

    def answer(params, **_):
        if left[0] <= 0:
            return None
        left[0] -= 1
        writes = json.loads(params["body"])["TransactItems"]
        body = {
            "Error": {"Code": "TransactionCanceledException", "Message": "cancelled"},
            "CancellationReasons": [{"Code": codes(w)} for w in writes],
        }
        return AWSResponse("http://moto", 400, {}, None), body

    table.client.meta.events.register("before-call.dynamodb.TransactWriteItems", answer)
    return left


def on_counters(code: str):
    return lambda write: code if "Update" in write else "None"


# -- recording ---------------------------------------------------------------------------------


def test_an_event_is_the_audit_record_kept_for_the_retention_period(store, moto_table):
    # Given a store keeping events 30 days
    # When an event with an idempotency key and its own time is recorded
    [result] = record(
        store, {"quantity": 3, "idempotency_key": "k1", "timestamp": "2026-11-26T07:30:00Z"}
    )
    # Then its item holds every fact of it, and expires 30 days after it was recorded
    item = get(moto_table, f"EVENT#{result.id}", "EVENT")
    fingerprint = store.fingerprints([result.id])[result.id]
    assert item == {
        "pk": {"S": f"EVENT#{result.id}"},
        "sk": {"S": "EVENT"},
        "type": {"S": "event"},
        "id": {"S": result.id},
        "customer": {"S": "cus_A"},
        "meter": {"S": "m"},
        "quantity": {"N": "3"},
        "event_time": {"N": str(T - 1800)},
        "received_at": {"N": str(T)},
        "period_start": {"S": PERIOD},
        "fingerprint": {"S": fingerprint},
        "expires_at": {"N": str(T + RETENTION_DAYS * DAY)},
        "idempotency_key": {"S": "k1"},
    }


def test_an_event_without_a_key_stores_none(store, moto_table):
    [result] = record(store, {})
    assert "idempotency_key" not in get(moto_table, f"EVENT#{result.id}", "EVENT")


def test_a_counter_outlives_its_events_by_two_periods_and_joins_the_backlog(store, moto_table):
    # When two events of one counter are recorded
    record(store, {"quantity": 2}, {"quantity": 5})
    # Then one counter holds both, its period, and expires 62 days after its events
    item = counter_item(moto_table)
    shard = int(item["backlog_pk"]["S"].removeprefix("U#"))
    assert item == {
        "pk": {"S": "USAGE#cus_A"},
        "sk": {"S": f"PERIOD#{PERIOD}#METER#m#0"},
        "quantity": {"N": "7"},
        "customer": {"S": "cus_A"},
        "meter": {"S": "m"},
        "period_start": {"S": PERIOD},
        "counter_shard": {"N": "0"},
        "expires_at": {"N": str(T + RETENTION_DAYS * DAY + 62 * DAY)},
        "period_source": {"S": "calendar_month"},
        "period_end": {"N": str(PERIOD_END)},
        "period_pk": {"S": f"END#2026-11-30#{shard}"},
        "backlog_pk": {"S": f"U#{shard}"},
        "backlog_sk": {"S": f"PERIOD#{PERIOD}#METER#m#0"},
    }
    assert 0 <= shard < dynamodb.SHARDS


def test_events_of_several_meters_and_periods_count_on_their_own_counters(store):
    # When one batch holds events of two meters, and a later one an event of the next period
    record(store, {"quantity": 2}, {"meter": "n", "quantity": 3}, {"quantity": 4})
    record(store, {"quantity": 9}, now=datetime(2026, 12, 2, tzinfo=UTC))
    # Then each (meter, period) counter holds its own units
    assert totals(store) == {"m": (6, 0), "n": (3, 0)}
    assert totals(store, start=NEXT_PERIOD) == {"m": (9, 0)}


def test_a_replay_returns_the_stored_fingerprint_and_counts_nothing_again(store):
    # Given an event recorded with a key
    [first] = record(store, {"quantity": 2, "idempotency_key": "k1"})
    # When the same event is recorded again, in a batch with a new one
    replay, new = record(
        store, {"quantity": 2, "idempotency_key": "k1"}, {"quantity": 5, "idempotency_key": "k2"}
    )
    # Then the replay is a duplicate of the first, and only the new event counts
    assert (replay.id, replay.duplicate, new.duplicate) == (first.id, True, False)
    assert totals(store) == {"m": (7, 0)}


def usage_event(key: str, quantity: int = 1) -> UsageEvent:
    period = Period(start=datetime(2026, 11, 1, tzinfo=UTC), end=datetime(2026, 12, 1, tzinfo=UTC))
    return UsageEvent(
        id=f"ev_{key}", customer="cus_A", meter="m", quantity=quantity, event_time=T,
        received_at=T, period=period, idempotency_key=key, fingerprint=f"fp_{key}",
    )  # fmt: skip


def test_a_replay_met_by_the_transaction_itself_lets_the_new_events_in(store):
    # Given a stored event, put again with a new one (a race the request's own read missed)
    assert store.put_events([usage_event("k1", quantity=2)]) == {}
    # When both are put / Then the stored one answers with its fingerprint, the new one counts
    stored = store.put_events([usage_event("k1", quantity=2), usage_event("k2", quantity=5)])
    assert stored == {"ev_k1": "fp_k1"}
    assert totals(store) == {"m": (7, 0)}


def test_a_transaction_holds_at_most_100_writes_an_event_and_its_new_counter_together(
    store, moto_table
):
    # Given 100 events of one counter: 100 event writes and 1 counter write
    sent = transactions(moto_table)
    record(store, *[{"quantity": 1} for _ in range(100)])
    # Then they take two transactions, the first as full as DynamoDB allows
    assert [len(writes) for writes in sent] == [100, 2]
    # And given 98 events of one counter then one of another: the last and its counter move on
    sent.clear()
    record(store, *[{"quantity": 1} for _ in range(98)], {"meter": "n"})
    assert [len(writes) for writes in sent] == [99, 2]
    assert totals(store) == {"m": (198, 0), "n": (1, 0)}


def test_a_contended_counter_moves_to_another_shard_and_stays_there_a_minute(
    store, moto_table, clock
):
    # Given a counter another transaction holds, on the first attempt
    cancel_transactions(moto_table, on_counters("TransactionConflict"), 1)
    # When an event is recorded, and another soon after
    record(store, {"quantity": 2})
    record(store, {"quantity": 3})
    # Then both went to one other shard, and reads sum the shards
    [counter] = backlog(store)
    assert counter.shard == 1 and counter.quantity == 5
    assert counter_item(moto_table) is None and totals(store) == {"m": (5, 0)}
    # and once the pair has been calm for SPREAD_SECONDS, writes go back to shard 0
    clock.now += dynamodb.SPREAD_SECONDS - 1
    record(store, {"quantity": 1})
    clock.now += 1
    record(store, {"quantity": 10})
    assert counter_item(moto_table)["quantity"] == {"N": "10"}
    assert totals(store) == {"m": (16, 0)}


def test_a_throttled_transaction_is_retried_and_stores_its_events_once(store, moto_table):
    for code in ("ThrottlingError", "ProvisionedThroughputExceeded"):
        # Given a table that throttles the next two transactions
        cancel_transactions(moto_table, on_counters(code), 2)
        # When an event is recorded / Then it is stored once, on shard 0
        record(store, {"quantity": 2})
    assert counter_item(moto_table)["quantity"] == {"N": "4"}


def test_a_counter_still_contended_after_the_budget_answers_503_and_stores_nothing(
    store, moto_table, monkeypatch
):
    # Given a table that keeps cancelling the transaction, and a short write budget
    monkeypatch.setattr(dynamodb, "WRITE_BUDGET_SECONDS", 0.2)
    left = cancel_transactions(moto_table, on_counters("ThrottlingError"), 10**6)
    # When an event is recorded / Then the store is unavailable (503), after several tries
    with pytest.raises(StoreUnavailable, match=r"^the usage table is busy; retry the request$"):
        record(store, {"quantity": 2})
    assert 10**6 - left[0] > 1
    assert totals(store) == {}


def test_a_transaction_cancelled_for_another_reason_fails_at_once(store, moto_table):
    left = cancel_transactions(moto_table, on_counters("ValidationError"), 5)
    with pytest.raises(ClientError):
        record(store, {"quantity": 2})
    assert left == [4] and totals(store) == {}


def test_the_retry_pause_grows_with_each_attempt_and_stays_short(store, moto_table):
    cancel_transactions(moto_table, on_counters("TransactionConflict"), 6)
    record(store, {"quantity": 2})
    pauses = [b for b in store._rng.bounds if b <= 0.1]
    assert pauses == [0.01, 0.02, 0.04, 0.08, 0.1, 0.1]


# -- billing periods ---------------------------------------------------------------------------


def billing(version: int = 0, status: str = "active") -> CustomerBilling:
    items = (ItemPeriods(item="si_1", meter="m", anchor=T, interval="month"),)
    subscription = Subscription(id="sub_1", customer="cus_A", status=status, read_at=T, items=items)
    return CustomerBilling(customer="cus_A", subscriptions={"sub_1": subscription}, version=version)


def test_billing_is_saved_only_on_the_version_read(store):
    # Given a customer never synced
    assert store.customer_billing("cus_A") == CustomerBilling(customer="cus_A")
    # When two syncs both read "never synced" and save / Then the second is refused
    assert store.save_billing(billing(), expected_version=0)
    assert not store.save_billing(billing(status="canceled"), expected_version=0)
    saved = store.customer_billing("cus_A")
    assert saved == billing(version=1)
    # and a save on version 1 wins, one on a stale version does not
    assert store.save_billing(billing(status="past_due"), expected_version=1)
    assert not store.save_billing(billing(status="canceled"), expected_version=1)
    assert store.customer_billing("cus_A") == billing(version=2, status="past_due")


def test_billings_of_several_customers_come_in_one_read_each_once(store, moto_table):
    assert store.save_billing(billing(), expected_version=0)
    assert get(moto_table, "USAGE#cus_A", "BILLING")["version"] == {"N": "1"}
    found = store.customer_billings(["cus_A", "cus_B", "cus_A"])
    assert found == {"cus_A": billing(version=1), "cus_B": CustomerBilling(customer="cus_B")}


def test_customer_counters_are_the_counters_of_periods_from_the_given_one(store):
    record(store, {"quantity": 2}, now=datetime(2026, 10, 20, tzinfo=UTC))
    record(store, {"quantity": 3}, {"meter": "n"})
    record(store, {"quantity": 4}, now=datetime(2026, 12, 2, tzinfo=UTC))
    record(store, {"stripe_customer_id": "cus_B"})
    store.save_billing(billing(), expected_version=0)
    counters = store.customer_counters("cus_A", PERIOD)
    assert sorted((c.period_start, c.meter, c.quantity) for c in counters) == [
        (PERIOD, "m", 3),
        (PERIOD, "n", 1),
        (NEXT_PERIOD, "m", 4),
    ]


def test_a_cut_moves_the_counters_end_only_from_the_end_it_read(store):
    # Given a counter of the calendar month, found by the day its period ends
    record(store, {"quantity": 2})
    [[counter]] = list(store.counters_ending_on("2026-11-30"))
    assert counter.period_end == PERIOD_END
    new_end = PERIOD_END - 5 * DAY
    # When a sync cuts it short, and another sync cuts it from the end it had read before
    assert store.cut(counter, new_end)
    assert not store.cut(counter, new_end - DAY)
    # Then the counter ends at the first cut, and is found under that day only
    assert [c.period_end for page in store.counters_ending_on("2026-11-25") for c in page] == [
        new_end
    ]
    assert list(store.counters_ending_on("2026-11-30")) == []
    assert list(store.counters_ending_on("2026-11-24")) == []


def test_counters_ending_on_a_day_come_in_pages(store, monkeypatch):
    monkeypatch.setattr(dynamodb, "PAGE", 2)
    record(store, *[{"stripe_customer_id": f"cus_{n}"} for n in range(12)])
    pages = list(store.counters_ending_on("2026-11-30"))
    assert max(len(page) for page in pages) == 2
    assert sorted(c.customer for page in pages for c in page) == sorted(
        f"cus_{n}" for n in range(12)
    )


def test_a_stripe_event_is_remembered_for_four_days(store, moto_table):
    assert not store.stripe_event_handled("evt_1")
    store.remember_stripe_event("evt_1", at=T)
    assert store.stripe_event_handled("evt_1") and not store.stripe_event_handled("evt_2")
    item = get(moto_table, "STRIPE_EVENT#evt_1", "STRIPE_EVENT")
    assert item["expires_at"] == {"N": str(T + 4 * DAY)} and item["handled_at"] == {"N": str(T)}


# -- reading -----------------------------------------------------------------------------------


def test_period_totals_sum_the_shards_and_with_an_end_the_periods_inside_it(store, moto_table):
    # Given a counter on two shards, a shorter period inside the month, and the next month
    record(store, {"quantity": 2})
    cancel_transactions(moto_table, on_counters("TransactionConflict"), 1)
    record(store, {"quantity": 3})
    inner = "2026-11-15T00:00:00Z"
    store.save_billing(billing(), expected_version=0)
    _put_counter(moto_table, inner, quantity=7, reported=4)
    record(store, {"quantity": 100}, now=datetime(2026, 12, 2, tzinfo=UTC))
    # Then the month alone sums its shards; given its end, the inner period too, not beyond
    assert totals(store) == {"m": (5, 0)}
    assert totals(store, end="2026-12-01T00:00:00Z") == {"m": (12, 4)}


def _put_counter(table, start: str, **numbers: int) -> None:
    item = {
        "pk": {"S": "USAGE#cus_A"},
        "sk": {"S": f"PERIOD#{start}#METER#m#0"},
        "customer": {"S": "cus_A"},
        "meter": {"S": "m"},
        "period_start": {"S": start},
        "period_end": {"N": str(PERIOD_END)},
        **{name: {"N": str(value)} for name, value in numbers.items()},
    }
    table.client.put_item(TableName=table.name, Item=item)


# -- the backlog -------------------------------------------------------------------------------


def test_the_backlog_finds_every_counter_whatever_its_shard_in_pages_in_order(store, monkeypatch):
    # Given 40 counters, spread over the index's shards
    customers = [f"cus_{n:02}" for n in range(40)]
    record(store, *[{"stripe_customer_id": c} for c in customers])
    monkeypatch.setattr(dynamodb, "PAGE", 3)
    # When the backlog is read a page at a time
    pages = list(store.backlog())
    # Then each counter comes once, pages hold at most PAGE, each sorted by customer
    assert sorted(c.customer for page in pages for c in page) == customers
    assert max(len(page) for page in pages) == 3
    assert all([c.customer for c in page] == sorted(c.customer for c in page) for page in pages)


def test_the_backlog_reads_every_page_of_the_index(store, moto_table, monkeypatch):
    # Given an index that answers one item per page
    customers = [f"cus_{n}" for n in range(5)]
    record(store, *[{"stripe_customer_id": c} for c in customers])
    moto_table.client.meta.events.register(
        "before-parameter-build.dynamodb.Query", lambda params, **_: params.update(Limit=1)
    )
    assert sorted(c.customer for c in backlog(store)) == customers


def test_unprocessed_keys_are_read_again_until_every_counter_is_there(store, moto_table):
    # Given a table that leaves every key but the first unprocessed, twice
    record(store, {"stripe_customer_id": "cus_0"}, {"stripe_customer_id": "cus_1"})
    record(store, {"stripe_customer_id": "cus_2"})
    moto_table.client.meta.events.register(
        "before-parameter-build.dynamodb.Query", lambda params, **_: params.update(Limit=3)
    )
    left = [2]

    def partial(params, **_):
        if left[0] <= 0:
            return None
        left[0] -= 1
        request = json.loads(params["body"])["RequestItems"]
        [(table, keys)] = request.items()
        first, *rest = keys["Keys"]
        item = get(moto_table, first["pk"]["S"], first["sk"]["S"])
        body = {
            "Responses": {table: [item]},
            "UnprocessedKeys": {table: {**keys, "Keys": rest}} if rest else {},
        }
        return AWSResponse("http://moto", 200, {}, None), body

    moto_table.client.meta.events.register("before-call.dynamodb.BatchGetItem", partial)
    # When the backlog's counters are read / Then all three come back
    assert sorted(c.customer for c in backlog(store)) == ["cus_0", "cus_1", "cus_2"]


def test_keys_that_stay_unprocessed_make_the_store_unavailable(store, moto_table):
    record(store, {})

    def never(params, **_):
        request = json.loads(params["body"])["RequestItems"]
        return AWSResponse("http://moto", 200, {}, None), {
            "Responses": {},
            "UnprocessedKeys": request,
        }

    moto_table.client.meta.events.register("before-call.dynamodb.BatchGetItem", never)
    with pytest.raises(StoreUnavailable, match=r"^the usage table is busy; retry the request$"):
        backlog(store)
    assert store._rng.bounds == [0.05 * 2**n for n in range(10)]


def test_fingerprints_are_read_a_hundred_keys_at_a_time(store, moto_table):
    # Given two stored events, asked for among 99 unknown ids
    first, last = record(store, {"idempotency_key": "k1"}, {"idempotency_key": "k2"})
    unknown = [f"ev_unknown{n}" for n in range(99)]
    requested: list[int] = []
    moto_table.client.meta.events.register(
        "before-call.dynamodb.BatchGetItem",
        lambda params, **_: requested.append(
            len(next(iter(json.loads(params["body"])["RequestItems"].values()))["Keys"])
        ),
    )
    # When their fingerprints are read / Then in two reads (BatchGetItem takes 100 keys)
    found = store.fingerprints([first.id, *unknown, last.id])
    assert set(found) == {first.id, last.id} and requested == [100, 1]


# -- decisions ---------------------------------------------------------------------------------


def test_the_first_decision_needs_a_counter_without_one(store, moto_table):
    # Given a counter no run decided on yet
    record(store, {"quantity": 4})
    counter = only(store)
    decision = decision_for(counter)
    # When two runs decide on that read / Then one wins
    assert store.decide(counter, decision)
    assert not store.decide(counter, decision)
    # and the decision is on the counter, as read back
    assert only(store).sending == decision and only(store).seq == 1


def test_a_decision_on_a_stale_read_is_refused(store):
    # Given a counter with a confirmed decision, read before it
    record(store, {"quantity": 4})
    before = only(store)
    flying = in_flight(store, before)
    assert store.confirm(flying, flying.sending)
    after = only(store)
    assert (after.seq, after.reported, after.sending) == (1, 4, None)
    record(store, {"quantity": 1})
    # When a run decides on the stale read / Then it is refused; on a fresh read it is not
    assert not store.decide(before, decision_for(before, value=1))
    fresh = only(store)
    assert store.decide(fresh, decision_for(fresh))
    assert only(store).sending.seq == 2


def test_confirming_adds_the_units_only_for_the_decision_in_flight(store):
    record(store, {"quantity": 4})
    counter = in_flight(store, only(store))
    other = counter.sending.model_copy(update={"seq": 7})
    # A confirmation of another decision changes nothing
    assert not store.confirm(counter, other)
    assert only(store).sending == counter.sending
    # The decision's own confirmation reports its units and ends the flight; a second one fails
    assert store.confirm(counter, counter.sending)
    assert not store.confirm(counter, counter.sending)
    assert (only(store).reported, only(store).sending) == (4, None)


def test_quarantine_is_refused_unless_its_decision_is_in_flight(store, moto_table):
    # Given a counter whose decision was confirmed
    record(store, {"quantity": 4})
    counter = in_flight(store, only(store))
    assert store.confirm(counter, counter.sending)
    # When a stale run quarantines that decision / Then nothing is written, no marker either
    assert not store.quarantine(counter, counter.sending, "late", T)
    assert store.quarantined() == [] and only(store).quarantined == 0
    assert get(moto_table, "QUARANTINE", counter.id) is None


def test_a_quarantine_keeps_the_units_reason_and_time_and_lists_the_counter(store, moto_table):
    record(store, {"quantity": 4})
    counter = quarantined(store, only(store), at=T + 5)
    assert (counter.quarantined, counter.quarantine_reason, counter.quarantined_at) == (
        4,
        "resource_missing: no customer",
        T + 5,
    )
    assert counter.sending is None and counter.held is None and counter.unsent == 0
    assert store.quarantined() == [counter]
    marker = get(moto_table, "QUARANTINE", counter.id)
    assert (marker["counter_pk"], marker["counter_sk"]) == (
        {"S": "USAGE#cus_A"},
        {"S": f"PERIOD#{PERIOD}#METER#m#0"},
    )


def test_a_long_reason_is_kept_to_500_characters(store):
    record(store, {"quantity": 4})
    counter = in_flight(store, only(store))
    assert store.quarantine(counter, counter.sending, "x" * 600, T)
    assert store.quarantined_counter(counter.id).quarantine_reason == "x" * 500


def test_a_held_quarantine_keeps_the_decision_and_refuses_a_second_hold(store):
    # Given a counter whose resent decision Stripe refused: it is held as it was
    record(store, {"quantity": 4})
    counter = in_flight(store, only(store))
    decision = counter.sending
    assert store.quarantine(counter, decision, "rejected", T, hold=True)
    held = store.quarantined_counter(counter.id)
    assert held.held == decision and held.quarantined == 4
    # When more units come, are decided and refused while that hold stands
    record(store, {"quantity": 2})
    again = in_flight(store, store.quarantined_counter(counter.id))
    # Then a second hold is refused; a plain quarantine is not
    assert not store.quarantine(again, again.sending, "rejected", T, hold=True)
    assert store.quarantine(again, again.sending, "rejected", T)
    assert store.quarantined_counter(counter.id).held == decision


def test_the_quarantine_lists_oldest_first(store):
    record(store, {"stripe_customer_id": "cus_B"}, {"stripe_customer_id": "cus_C"})
    b, c = sorted(backlog(store), key=lambda x: x.customer)
    quarantined(store, c, at=T - 10)
    quarantined(store, b, at=T)
    assert [x.customer for x in store.quarantined()] == ["cus_C", "cus_B"]
    assert store.quarantined_counter("umc_unknown") is None


def test_a_replayed_counter_leaves_the_quarantine_list(store):
    record(store, {"quantity": 4})
    counter = quarantined(store, only(store))
    assert store.replay(counter)
    assert store.quarantined() == [] and store.quarantined_counter(counter.id) is None


# -- release -----------------------------------------------------------------------------------


def confirmed(store) -> Counter:
    counter = in_flight(store, only(store))
    assert store.confirm(counter, counter.sending)
    return only(store)


def in_backlog(store) -> bool:
    return bool(backlog(store))


def test_a_counter_with_everything_reported_leaves_the_backlog(store, moto_table):
    record(store, {"quantity": 4})
    counter = confirmed(store)
    assert store.release(counter)
    assert not in_backlog(store)
    assert "backlog_pk" not in counter_item(moto_table)
    # and new usage puts it back
    record(store, {"quantity": 1})
    assert only(store).unsent == 1


def test_release_is_refused_when_an_event_arrived_since_the_read(store):
    record(store, {"quantity": 4})
    counter = confirmed(store)
    record(store, {"quantity": 1})
    assert not store.release(counter) and in_backlog(store)


def test_release_is_refused_when_a_decision_was_made_since_the_read(store):
    # Given a read of a counter with everything reported, then one more unit decided on
    record(store, {"quantity": 4})
    counter = confirmed(store)
    record(store, {"quantity": 1})
    in_flight(store, only(store))
    # When a run releases on its read / Then it is refused
    assert not store.release(counter) and in_backlog(store)


def test_release_is_refused_when_the_quarantined_units_changed(store):
    record(store, {"quantity": 4})
    read = only(store)
    quarantined(store, read)
    stale = read.model_copy(update={"seq": 1, "reported": 4})
    assert not store.release(stale) and in_backlog(store)
    fresh = store.quarantined_counter(read.id)
    assert store.release(fresh) and not in_backlog(store)


def test_release_refuses_a_read_with_something_unsent_or_in_flight_without_writing(
    store, moto_table
):
    record(store, {"quantity": 4})
    counter = only(store)
    writes = []
    moto_table.client.meta.events.register(
        "before-call.dynamodb.UpdateItem", lambda **kw: writes.append(kw)
    )
    assert not store.release(counter)
    flying = counter.model_copy(update={"reported": 4, "sending": decision_for(counter)})
    assert not store.release(flying)
    assert writes == [] and in_backlog(store)


# -- replays -----------------------------------------------------------------------------------


def test_a_replay_makes_the_units_sendable_again_once(store):
    # Given 4 quarantined units
    record(store, {"quantity": 4})
    counter = quarantined(store, only(store))
    # When an operator replays them twice on the same read / Then the second is refused
    assert store.replay(counter)
    assert not store.replay(counter)
    again = only(store)
    assert (again.quarantined, again.unsent, again.quarantine_reason, again.quarantined_at) == (
        0,
        4,
        None,
        None,
    )


def test_a_replay_is_refused_when_the_counter_was_quarantined_again_since_the_read(store):
    record(store, {"quantity": 4})
    first = quarantined(store, only(store), at=T)
    assert store.replay(first)
    second = quarantined(store, only(store), at=T + 60)
    assert second.quarantined == first.quarantined
    assert not store.replay(first)
    assert store.replay(second)


def test_a_resend_puts_the_held_decision_back_in_flight_as_it_was(store):
    record(store, {"quantity": 4})
    counter = only(store)
    flying = in_flight(store, counter)
    assert store.quarantine(flying, flying.sending, "rejected", T, hold=True)
    held = store.quarantined_counter(counter.id)
    # A resend of a read whose hold has another decision is refused
    assert not store.replay(held.model_copy(update={"held": decision_for(held)}), resend=True)
    assert store.replay(held, resend=True)
    back = only(store)
    assert back.sending == flying.sending and back.held is None and back.quarantined == 0
    assert back.quarantine_reason is None and back.unsent == 0


def test_a_resend_is_refused_while_a_decision_is_in_flight(store):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    assert store.quarantine(flying, flying.sending, "rejected", T, hold=True)
    record(store, {"quantity": 1})
    held = store.quarantined_counter(flying.id)
    in_flight(store, held)
    assert not store.replay(held, resend=True)


def test_a_replay_without_resend_drops_the_held_decision(store):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    assert store.quarantine(flying, flying.sending, "rejected", T, hold=True)
    held = store.quarantined_counter(flying.id)
    assert store.replay(held)
    again = only(store)
    assert again.held is None and again.sending is None and again.unsent == 4


def test_a_restamped_replay_moves_the_units_into_the_target_counter(store, moto_table, clock):
    # Given 4 quarantined units of November, and December's counter as the target
    record(store, {"quantity": 4})
    old = quarantined(store, only(store))
    target = Counter(
        customer="cus_A",
        meter="m",
        period_start=NEXT_PERIOD,
        period_end=PERIOD_END + 31 * DAY,
        period_source="stripe_subscription",
        shard=2,
    )
    # When they are replayed with restamp
    assert store.replay(old, restamp_to=target)
    # Then November no longer counts them and December does, in the backlog
    assert totals(store) == {"m": (0, 0)}
    assert totals(store, start=NEXT_PERIOD) == {"m": (4, 0)}
    assert counter_item(moto_table)["quarantined"] == {"N": "0"}
    [moved] = [c for c in backlog(store) if c.period_start == NEXT_PERIOD]
    assert (moved.shard, moved.unsent, moved.period_end, moved.period_source) == (
        2,
        4,
        PERIOD_END + 31 * DAY,
        "stripe_subscription",
    )
    item = counter_item(moto_table, shard=2, period=NEXT_PERIOD)
    assert item["expires_at"] == {"N": str(T + RETENTION_DAYS * DAY + 62 * DAY)}
    assert item["period_pk"]["S"].startswith("END#2026-12-31#")
    assert item["backlog_sk"] == item["sk"]
    assert store.quarantined() == []


# -- sent decisions ----------------------------------------------------------------------------


def test_a_send_is_logged_once_with_what_it_carries(store, moto_table):
    record(store, {"quantity": 4})
    counter = in_flight(store, only(store))
    decision = counter.sending
    store.log_send(counter, decision)
    # A resend logs nothing new, even with other values
    store.log_send(counter, decision.model_copy(update={"value": 99}))
    identifier = counter.identifier(decision)
    assert store.sent(identifier) == SentDecision(
        identifier=identifier,
        customer="cus_A",
        meter="m",
        period_start=PERIOD,
        shard=0,
        seq=1,
        value=4,
        timestamp=decision.timestamp,
    )
    assert get(moto_table, f"SENT#{identifier}", "SENT")["expires_at"] == {"N": str(T + 62 * DAY)}
    assert store.sent("umc_unknown.1") is None
    assert store.counter_of(store.sent(identifier)) == only(store)


def test_a_log_send_failure_other_than_the_condition_is_raised(store, moto_table):
    record(store, {"quantity": 4})
    counter = in_flight(store, only(store))
    moto_table.client.meta.events.register(
        "before-call.dynamodb.PutItem",
        lambda **_: (
            AWSResponse("http://moto", 400, {}, None),
            {"Error": {"Code": "ValidationException", "Message": "bad"}},
        ),
    )
    with pytest.raises(ClientError):
        store.log_send(counter, counter.sending)


def logged(store, counter: Counter) -> SentDecision:
    store.log_send(counter, counter.sending)
    return store.sent(counter.identifier(counter.sending))


def test_a_rejection_of_a_confirmed_send_moves_its_units_to_the_quarantine_once(store):
    # Given 4 units Stripe confirmed, then rejected asynchronously
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    sent = logged(store, flying)
    assert store.confirm(flying, flying.sending)
    counter = only(store)
    # When the rejection is applied twice
    assert store.unreport(counter, sent, "meter_event_customer_not_found", T + 9)
    assert not store.unreport(only(store), sent, "meter_event_customer_not_found", T + 9)
    # Then the units are quarantined once, no longer reported, and the log says when and why
    after = store.quarantined_counter(counter.id)
    assert (after.reported, after.quarantined, after.quarantine_reason, after.quarantined_at) == (
        0,
        4,
        "meter_event_customer_not_found",
        T + 9,
    )
    logged_again = store.sent(sent.identifier)
    assert (logged_again.rejected_at, logged_again.reason) == (
        T + 9,
        "meter_event_customer_not_found",
    )


def test_a_rejection_of_a_send_still_in_flight_ends_the_flight(store):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    sent = logged(store, flying)
    assert store.unreport(flying, sent, "no_meter", T)
    after = store.quarantined_counter(flying.id)
    assert (after.sending, after.reported, after.quarantined) == (None, 0, 4)
    # and the run that still holds the decision can no longer confirm it
    assert not store.confirm(flying, flying.sending)


def test_a_rejection_is_refused_when_fewer_units_are_reported_than_it_takes_back(store):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    sent = logged(store, flying)
    assert store.confirm(flying, flying.sending)
    counter = only(store)
    bigger = sent.model_copy(update={"value": 5})
    assert not store.unreport(counter, bigger, "no_meter", T)
    assert store.sent(sent.identifier).rejected_at is None and only(store).reported == 4


def test_a_long_rejection_reason_is_kept_to_500_characters_on_both_items(store):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    sent = logged(store, flying)
    assert store.unreport(flying, sent, "x" * 600, T)
    assert store.quarantined_counter(flying.id).quarantine_reason == "x" * 500
    assert store.sent(sent.identifier).reason == "x" * 500


def test_the_counter_of_a_send_whose_counter_expired_is_none(store, moto_table):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    sent = logged(store, flying)
    key = {"pk": {"S": "USAGE#cus_A"}, "sk": {"S": f"PERIOD#{PERIOD}#METER#m#0"}}
    moto_table.client.delete_item(TableName=moto_table.name, Key=key)
    assert store.counter_of(sent) is None


def test_a_rejection_of_a_send_nobody_logged_is_refused(store):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    unlogged = SentDecision(
        identifier=flying.identifier(flying.sending), customer="cus_A", meter="m",
        period_start=PERIOD, shard=0, seq=1, value=4, timestamp=T,
    )  # fmt: skip
    assert not store.unreport(flying, unlogged, "no_meter", T)
    assert only(store).sending == flying.sending


def test_a_rejection_of_an_older_send_while_the_next_is_in_flight_takes_back_reported_units(
    store,
):
    # Given decision 1 confirmed (4 units), then decision 2 in flight (1 unit)
    record(store, {"quantity": 4})
    first = in_flight(store, only(store))
    sent = logged(store, first)
    assert store.confirm(first, first.sending)
    record(store, {"quantity": 1})
    second = in_flight(store, only(store))
    # When Stripe rejects decision 1 / Then its units leave reported; decision 2 still flies
    assert store.unreport(second, sent, "no_meter", T)
    after = store.quarantined_counter(second.id)
    assert (after.reported, after.quarantined, after.sending) == (0, 4, second.sending)


# -- server keys -------------------------------------------------------------------------------


def api_key(key_id: str, created_at: int = T) -> ApiKey:
    return ApiKey(
        key_id=key_id,
        name=f"key {key_id}",
        scopes=frozenset({Scope("record"), Scope("read")}),
        secret_hash="ab" * 32,
        created_at=created_at,
    )


def test_server_keys_are_stored_listed_and_revoked_once(store):
    store.put_api_key(api_key("k2", created_at=T))
    store.put_api_key(api_key("k1", created_at=T + 1))
    record(store, {})  # other items are not keys
    assert store.get_api_key("k2") == api_key("k2") and store.get_api_key("nope") is None
    assert [k.key_id for k in store.list_api_keys()] == ["k2", "k1"]
    with pytest.raises(ClientError):
        store.put_api_key(api_key("k2"))
    assert store.revoke_api_key("k2", at=T + 5)
    assert not store.revoke_api_key("k2", at=T + 6)
    assert not store.revoke_api_key("nope", at=T)
    assert store.get_api_key("k2").revoked_at == T + 5


def test_a_server_key_lives_at_its_documented_key_with_its_hash_only(store, moto_table):
    store.put_api_key(api_key("k1"))
    item = get(moto_table, "APIKEY#k1", "APIKEY")
    assert item["secret_hash"] == {"S": "ab" * 32} and item["type"] == {"S": "api_key"}


def test_an_unknown_table_is_an_error_not_a_refusal(moto_table):
    store = DynamoStore("missing", client=moto_table.client, clock=Clock())
    with pytest.raises(ClientError):
        store.revoke_api_key("k1", at=T)
    with pytest.raises(ClientError):
        store.cut(Counter(customer="cus_A", meter="m", period_start=PERIOD, period_end=1), 2)
    with pytest.raises(ClientError):
        store.replay(Counter(customer="cus_A", meter="m", period_start=PERIOD, period_end=1))


def test_without_a_client_the_store_builds_one_from_the_environment(moto_table):
    store = DynamoStore(moto_table.name)
    store.put_api_key(api_key("k1"))
    assert store.get_api_key("k1") == api_key("k1")


def test_a_decision_on_a_read_from_before_a_resend_is_refused(store):
    # Given a held decision (4 units), one more unit recorded, and a run's read of that state
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    assert store.quarantine(flying, flying.sending, "rejected", T, hold=True)
    record(store, {"quantity": 1})
    stale = only(store)
    # When an operator resends the held decision, then the run decides on its read
    assert store.replay(store.quarantined_counter(stale.id), resend=True)
    # Then its decision is refused: the resent one is in flight, with the same decision number
    assert not store.decide(stale, decision_for(stale))
    assert only(store).sending == flying.sending


def test_a_quarantine_cancelled_for_another_reason_is_an_error_not_a_refusal(store, moto_table):
    record(store, {"quantity": 4})
    flying = in_flight(store, only(store))
    cancel_transactions(moto_table, on_counters("TransactionConflict"), 1)
    with pytest.raises(ClientError):
        store.quarantine(flying, flying.sending, "rejected", T)


def test_a_quarantine_marker_whose_counter_expired_finds_nothing(store, moto_table):
    record(store, {"quantity": 4})
    counter = quarantined(store, only(store))
    key = {"pk": {"S": "USAGE#cus_A"}, "sk": {"S": f"PERIOD#{PERIOD}#METER#m#0"}}
    moto_table.client.delete_item(TableName=moto_table.name, Key=key)
    assert store.quarantined_counter(counter.id) is None


def test_a_transaction_refused_outright_is_an_error(store, moto_table):
    moto_table.client.meta.events.register(
        "before-call.dynamodb.TransactWriteItems",
        lambda **_: (
            AWSResponse("http://moto", 400, {}, None),
            {"Error": {"Code": "ValidationException", "Message": "bad"}},
        ),
    )
    with pytest.raises(ClientError):
        record(store, {"quantity": 2})


def test_every_page_of_a_query_is_read(store, moto_table):
    # Given a customer's counters of three periods, and a table that answers one item a page
    for month in (10, 11, 12):
        record(store, {"quantity": month}, now=datetime(2026, month, 2, tzinfo=UTC))
    moto_table.client.meta.events.register(
        "before-parameter-build.dynamodb.Query", lambda params, **_: params.update(Limit=1)
    )
    # Then all three are read
    found = store.customer_counters("cus_A", "2026-10-01T00:00:00Z")
    assert sorted(c.quantity for c in found) == [10, 11, 12]


def test_by_default_events_are_kept_400_days_and_throttling_retried_five_times(moto_table):
    store = DynamoStore(moto_table.name, clock=Clock())
    [result] = record(store, {})
    expires = get(moto_table, f"EVENT#{result.id}", "EVENT")["expires_at"]
    assert expires == {"N": str(T + 400 * DAY)}
    # botocore counts the first attempt too
    assert store._db.meta.config.retries == {"mode": "standard", "total_max_attempts": 7}


def test_a_request_still_throttled_after_botocores_retries_is_a_busy_table():
    for code in ("ProvisionedThroughputExceededException", "ThrottlingException"):
        with pytest.raises(StoreUnavailable, match=r"^the usage table is busy; retry the request$"):
            dynamodb._unavailable_when_throttled({"Error": {"Code": code}})
    dynamodb._unavailable_when_throttled({"Error": {"Code": "ValidationException"}})


def test_counters_carry_their_tables_name_so_two_stacks_never_share_an_identifier(
    store, moto_table
):
    record(store, {})
    counter = only(store)
    assert counter.namespace == moto_table.name
    assert counter.id != counter.model_copy(update={"namespace": "other-stack"}).id


def test_a_key_reused_with_another_body_stops_the_put_and_names_the_stored_body(store):
    # Given an event stored under key k1
    assert store.put_events([usage_event("k1", quantity=2)]) == {}
    # When another body with k1 is put, with a new event: the request will answer 409
    reused = usage_event("k1", quantity=3).model_copy(update={"fingerprint": "fp_other"})
    stored = store.put_events([reused, usage_event("k2", quantity=5)])
    # Then the stored body is named and nothing else is stored
    assert stored == {"ev_k1": "fp_k1"}
    assert totals(store) == {"m": (2, 0)}


def test_every_read_of_the_table_itself_is_consistent(store, moto_table):
    # Given a table that records the reads the store makes
    reads: list[tuple[str, dict]] = []
    for operation in ("GetItem", "Query", "BatchGetItem"):
        moto_table.client.meta.events.register(
            f"before-call.dynamodb.{operation}",
            lambda params, model, **_: reads.append((model.name, json.loads(params["body"]))),
        )
    # When every kind of read runs: decisions, rejections, quarantine, keys, webhooks, usage
    record(store, {"quantity": 4})
    counter = in_flight(store, only(store))
    store.counter_of(logged(store, counter))
    assert store.quarantine(counter, counter.sending, "rejected", T)
    store.quarantined()
    store.quarantined_counter(counter.id)
    store.get_api_key("k1")
    store.stripe_event_handled("evt_1")
    store.customer_counters("cus_A", PERIOD)
    store.period_totals("cus_A", PERIOD)
    # Then each read of the table asks for the latest write (an index cannot be read so)
    table_reads = [(op, body) for op, body in reads if "IndexName" not in body]
    assert {op for op, _ in table_reads} == {"GetItem", "Query", "BatchGetItem"}
    for operation, body in table_reads:
        requests = body["RequestItems"].values() if operation == "BatchGetItem" else [body]
        assert all(r.get("ConsistentRead") is True for r in requests), (operation, body)
