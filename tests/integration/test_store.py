"""DynamoStore on DynamoDB Local (AWS's engine): the storage contract the logic relies on.

Every flush write is conditional on what its caller read; each test below forces the race that
condition exists for (a second run, a new event, an operator) and checks the write is refused and
changes nothing.
"""

import json
import random
import threading
from datetime import UTC, datetime

import pytest
from botocore.awsrequest import AWSResponse

from tests.fakes import FakeBilling
from usage_meter.billing import PermanentBillingError, TransientBillingError
from usage_meter.errors import IdempotencyConflict, StoreUnavailable
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.models.domain import Counter, Decision
from usage_meter.models.input import EventIn
from usage_meter.store import dynamodb
from usage_meter.store.dynamodb import COUNTER_SHARDS, INDEX, PAGE, DynamoStore

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
T = int(NOW.timestamp())
PERIOD = "2026-11-01T00:00:00Z"


@pytest.fixture
def store(local_table):
    return DynamoStore(
        local_table.name, client=local_table.client, clock=lambda: T, rng=random.Random(3)
    )


def record(store, *events: dict) -> list:
    requests = [EventIn.model_validate({"meter": "m", "quantity": 1, **e}) for e in events]
    return record_events(requests, meters={"m", "n"}, store=store, now=NOW, batch=len(requests) > 1)


def totals(store, customer: str = "cus_A") -> dict[str, tuple[int, int]]:
    return {t.meter: (t.quantity, t.reported) for t in store.period_totals(customer, PERIOD)}


def backlog(store) -> list[Counter]:
    return [counter for page in store.backlog() for counter in page]


def only(store) -> Counter:
    [counter] = backlog(store)
    return counter


def index_keys(local_table) -> list[tuple[str, str]]:
    """What the sparse index holds, straight from the engine."""
    items = local_table.client.scan(TableName=local_table.name, IndexName=INDEX)["Items"]
    return sorted((i["pk"]["S"], i["sk"]["S"]) for i in items)


def counter_keys(*customers: str, meter: str = "m", shard: int = 0) -> list[tuple[str, str]]:
    return sorted((f"USAGE#{c}", f"PERIOD#{PERIOD}#METER#{meter}#{shard}") for c in customers)


def decision_for(counter: Counter, *, at: int = T) -> Decision:
    return Decision(seq=counter.seq + 1, value=counter.unsent, timestamp=at, decided_at=at)


def sent(store, counter: Counter) -> Counter:
    """Decide and confirm all of the counter's unsent units, as a run would; the counter after."""
    decision = decision_for(counter)
    assert store.decide(counter, decision)
    assert store.confirm(counter, decision)
    return counter.model_copy(
        update={"seq": decision.seq, "reported": counter.reported + decision.value}
    )


def quarantined(store, counter: Counter, *, at: int = T) -> Counter:
    decision = decision_for(counter)
    assert store.decide(counter, decision)
    assert store.quarantine(counter, decision, "resource_missing: No such customer", at)
    [held] = store.quarantined()
    return held


def conflict_on_first_transactions(client, count: int) -> list[int]:
    """AWS's answer to a transaction that met another one on an item, for the next `count`
    TransactWriteItems calls. DynamoDB Local serializes transactions and never gives it."""
    left = [count]
    lock = threading.Lock()

    def answer(params, **_):
        with lock:
            if left[0] <= 0:
                return None
            left[0] -= 1
        writes = json.loads(params["body"])["TransactItems"]
        reasons = [{"Code": "TransactionConflict" if "Update" in w else "None"} for w in writes]
        body = {
            "Error": {"Code": "TransactionCanceledException", "Message": "conflict"},
            "CancellationReasons": reasons,
        }
        return AWSResponse("http://local", 400, {}, None), body

    client.meta.events.register("before-call.dynamodb.TransactWriteItems", answer)
    return left


# -- recording ---------------------------------------------------------------------------------


def test_an_event_and_its_counter_are_written_together_and_the_counter_joins_the_backlog(
    store, local_table
):
    # When one event is recorded
    record(store, {"stripe_customer_id": "cus_A", "quantity": 7})
    # Then its counter holds it and the keys-only index holds the counter, not the event
    assert totals(store) == {"m": (7, 0)}
    assert index_keys(local_table) == counter_keys("cus_A")
    counter = only(store)
    assert (counter.quantity, counter.unsent, counter.sending) == (7, 7, None)


def test_more_usage_on_a_counter_in_the_backlog_adds_to_it(store, local_table):
    # Given a counter in the backlog
    record(store, {"stripe_customer_id": "cus_A", "quantity": 2})
    # When more is recorded in the same period
    record(store, {"stripe_customer_id": "cus_A", "quantity": 3}, {"stripe_customer_id": "cus_A"})
    # Then it is still one counter, in the index once
    assert totals(store) == {"m": (6, 0)} and index_keys(local_table) == counter_keys("cus_A")


def test_a_replay_is_a_failed_conditional_put_not_a_second_row(store, local_table):
    record(store, {"stripe_customer_id": "cus_A", "idempotency_key": "k"})
    [again] = record(store, {"stripe_customer_id": "cus_A", "idempotency_key": "k"})
    assert again.duplicate and totals(store) == {"m": (1, 0)}
    count = local_table.client.scan(TableName=local_table.name, Select="COUNT")["Count"]
    assert count == 2  # event + counter


def test_a_batch_of_100_events_with_100_counters_is_stored_in_several_transactions(store):
    events = [{"stripe_customer_id": f"cus_{i}", "quantity": i + 1} for i in range(100)]
    results = record(store, *events)
    assert not any(r.duplicate for r in results)
    assert totals(store, "cus_99") == {"m": (100, 0)}
    assert len(backlog(store)) == 100


def test_a_batch_mixing_replays_and_new_events_stores_only_the_new_ones(store):
    record(store, {"stripe_customer_id": "cus_A", "idempotency_key": "old", "quantity": 5})
    results = record(
        store,
        {"stripe_customer_id": "cus_A", "idempotency_key": "old", "quantity": 5},
        {"stripe_customer_id": "cus_A", "idempotency_key": "new", "quantity": 2},
    )
    assert [r.duplicate for r in results] == [True, False]
    assert totals(store) == {"m": (7, 0)}


def test_concurrent_requests_with_one_idempotency_key_store_one_event_and_count_it_once(store):
    # Given 20 keys, each sent by two requests at once: with the same body (even keys) or with
    # different quantities (odd keys)
    outcomes: dict[str, list[tuple[int, str]]] = {}

    def send(key: str, quantity: int, gate: threading.Barrier) -> None:
        body = {"stripe_customer_id": "cus_A", "idempotency_key": key, "quantity": quantity}
        gate.wait()
        try:
            [result] = record(store, body)
            outcome = "replay" if result.duplicate else "stored"
        except IdempotencyConflict:
            outcome = "409"
        outcomes.setdefault(key, []).append((quantity, outcome))

    for i in range(20):
        gate = threading.Barrier(2)
        quantities = (1, 1) if i % 2 == 0 else (1, 2)
        threads = [threading.Thread(target=send, args=(f"k{i}", q, gate)) for q in quantities]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # Then one request stored the event; the other was a replay (same body) or a 409
    expected_units = 0
    for i in range(20):
        seen = outcomes[f"k{i}"]
        assert sorted(o for _, o in seen) == ["replay" if i % 2 == 0 else "409", "stored"], seen
        expected_units += next(q for q, outcome in seen if outcome == "stored")
    # and the counter counted each key once (DynamoDB Local serializes transactions: none met
    # another, so none moved to another shard)
    assert totals(store) == {"m": (expected_units, 0)}
    [counter] = backlog(store)
    assert (counter.shard, counter.quantity) == (0, expected_units)


def test_a_counter_met_by_another_transaction_moves_to_another_shard_and_reads_sum_shards(
    store, local_table
):
    # Given a counter on shard 0, and transactions that meet another one on their first try
    record(store, {"stripe_customer_id": "cus_A", "quantity": 5})
    conflict_on_first_transactions(local_table.client, 3)
    # When three more events are recorded, one after another
    for quantity in (1, 2, 3):
        record(store, {"stripe_customer_id": "cus_A", "quantity": quantity})
    # Then the retries wrote on other shards, each a counter in the backlog of its own
    counters = backlog(store)
    shards = {c.shard for c in counters}
    assert len(counters) > 1 and shards <= set(range(COUNTER_SHARDS)), shards
    assert sum(c.quantity for c in counters) == 11
    # and a read sums them
    assert totals(store) == {"m": (11, 0)}


def test_concurrent_writers_on_one_hot_counter_spread_over_shards_and_lose_nothing(
    store, local_table
):
    # Given 8 writers recording into one counter at once, whose first 40 transactions meet
    # another one (as they would on AWS; DynamoDB Local serializes them)
    left = conflict_on_first_transactions(local_table.client, 40)

    def write(n: int) -> None:
        for i in range(10):
            record(store, {"stripe_customer_id": "cus_Hot", "idempotency_key": f"{n}-{i}"})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then every event counts once, over several shards, and reads and the flush agree
    assert left[0] == 0
    assert totals(store, "cus_Hot") == {"m": (80, 0)}
    counters = backlog(store)
    assert len({c.shard for c in counters}) > 1
    billing = FakeBilling()
    summary = Flusher(store, billing, time_left=lambda: 300, clock=lambda: T).run()
    assert billing.totals() == {("cus_Hot", "m"): 80}
    assert summary.sent == len(counters) and totals(store, "cus_Hot") == {"m": (80, 80)}


# -- the backlog --------------------------------------------------------------------------------


def test_the_backlog_reads_every_shard_and_every_page(store, local_table):
    # Given 150 counters (so every index shard), and index pages of at most 7 keys
    record(store, *[{"stripe_customer_id": f"cus_{i}"} for i in range(100)])
    record(store, *[{"stripe_customer_id": f"cus_{i}", "meter": "n"} for i in range(50)])
    queries = []

    def small_pages(params, **_):
        params.setdefault("Limit", 7)
        queries.append(params.get("ExclusiveStartKey"))

    local_table.client.meta.events.register("provide-client-params.dynamodb.Query", small_pages)
    # When the backlog is read
    pages = list(store.backlog())
    # Then nothing is missed, nothing repeated, and no page is larger than a BatchGetItem
    ids = [c.id for page in pages for c in page]
    assert len(ids) == len(set(ids)) == 150
    assert all(0 < len(page) <= PAGE for page in pages)
    assert sum(q is not None for q in queries) >= 150 / 7 - 16


def test_the_backlog_holds_exactly_the_counters_with_something_left(store, local_table):
    # Given four pairs with usage: one Stripe takes, one it refuses, one it cannot take now
    for customer in ("cus_Ok", "cus_Gone", "cus_Later", "cus_Next"):
        record(store, {"stripe_customer_id": customer, "quantity": 3})
    gone = PermanentBillingError("No such customer", code="resource_missing")
    unavailable = TransientBillingError("503")

    class Billing(FakeBilling):
        def send(self, request):
            if request.customer == "cus_Gone":
                raise gone
            if request.customer == "cus_Later":
                raise unavailable
            return super().send(request)

    # When a run reports them
    Flusher(store, Billing(), time_left=lambda: 300, clock=lambda: T).run()
    # Then the sent ones left the backlog; the refused one waits for the next run to release
    # it, the unanswered one keeps its decision in flight
    assert index_keys(local_table) == counter_keys("cus_Gone", "cus_Later")
    # When the next run finds Stripe answering, and a new event arrives for a reported pair
    billing = FakeBilling()
    Flusher(store, billing, time_left=lambda: 300, clock=lambda: T).run()
    record(store, {"stripe_customer_id": "cus_Ok", "quantity": 1})
    # Then only that pair is in the backlog, and the refused units wait in the quarantine
    assert index_keys(local_table) == counter_keys("cus_Ok")
    assert billing.totals() == {("cus_Later", "m"): 3}
    assert [(c.customer, c.quarantined) for c in store.quarantined()] == [("cus_Gone", 3)]


# -- decide, confirm, quarantine ----------------------------------------------------------------


def test_two_runs_deciding_on_the_same_read_one_wins(store):
    # Given two runs that read the same counter
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = only(store)
    # When both decide
    first = store.decide(read, decision_for(read))
    second = store.decide(read, decision_for(read, at=T + 1))
    # Then only the first decision is written
    assert (first, second) == (True, False)
    stored = only(store)
    assert stored.sending == decision_for(read) and stored.seq == 1 and stored.unsent == 0


def test_a_decision_on_a_stale_read_is_refused_even_with_nothing_in_flight(store):
    # Given a run that read the counter before another decided and confirmed
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    stale = only(store)
    sent(store, stale)
    record(store, {"stripe_customer_id": "cus_A", "quantity": 1})
    # When the stale run decides / Then it is refused: its seq names an identifier already used
    assert store.decide(stale, decision_for(stale)) is False
    assert only(store).seq == 1


def test_confirming_a_decision_no_longer_in_flight_changes_nothing(store):
    # Given a decision confirmed once
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = only(store)
    decision = decision_for(read)
    assert store.decide(read, decision)
    assert store.confirm(read, decision)
    # When a second run confirms the same decision / Then it is refused, reported stays
    assert store.confirm(read, decision) is False
    assert totals(store) == {"m": (4, 4)}


def test_confirming_a_decision_that_was_quarantined_meanwhile_changes_nothing(store):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = only(store)
    decision = decision_for(read)
    assert store.decide(read, decision)
    assert store.quarantine(read, decision, "resource_missing: gone", T)
    assert store.confirm(read, decision) is False
    assert totals(store) == {"m": (4, 0)} and only(store).quarantined == 4


def test_quarantining_a_decision_no_longer_in_flight_writes_nothing(store, local_table):
    # Given a decision another run confirmed
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = only(store)
    decision = decision_for(read)
    assert store.decide(read, decision)
    assert store.confirm(read, decision)
    # When a stale run quarantines it / Then neither the counter nor a marker is written
    assert store.quarantine(read, decision, "late", T) is False
    assert store.quarantined() == [] and totals(store) == {"m": (4, 4)}
    markers = local_table.client.query(
        TableName=local_table.name,
        KeyConditionExpression="pk = :q",
        ExpressionAttributeValues={":q": {"S": "QUARANTINE"}},
    )
    assert markers["Count"] == 0


def test_a_quarantine_keeps_the_units_the_reason_and_the_time(store):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    held = quarantined(store, only(store), at=T + 5)
    assert (held.customer, held.quarantined, held.quarantined_at) == ("cus_A", 4, T + 5)
    assert held.quarantine_reason == "resource_missing: No such customer"
    assert held.sending is None and held.unsent == 0
    assert store.quarantined_counter(held.id) == held


# -- release ------------------------------------------------------------------------------------


def test_a_counter_with_everything_reported_is_released(store, local_table):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    done = sent(store, only(store))
    assert store.release(done) is True
    assert index_keys(local_table) == [] and totals(store) == {"m": (4, 4)}


def test_release_is_refused_when_an_event_arrived_since_the_read(store, local_table):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    done = sent(store, only(store))
    record(store, {"stripe_customer_id": "cus_A", "quantity": 1})
    assert store.release(done) is False
    assert index_keys(local_table) == counter_keys("cus_A") and only(store).unsent == 1


def test_release_is_refused_while_another_runs_decision_is_in_flight(store, local_table):
    # Given a run that read the counter all reported, then an event and another run's decision
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    done = sent(store, only(store))
    record(store, {"stripe_customer_id": "cus_A", "quantity": 1})
    other = only(store)
    assert store.decide(other, decision_for(other))
    # When the first run releases / Then it is refused
    assert store.release(done) is False
    # and even a read that matched every number but the decision would be refused
    in_flight = only(store)
    looks_done = in_flight.model_copy(update={"sending": None, "reported": in_flight.quantity})
    assert store.release(looks_done) is False
    assert index_keys(local_table) == counter_keys("cus_A")


def test_release_is_refused_when_the_quarantined_units_changed(store, local_table):
    # Given a run that read a counter whose units are all quarantined
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = quarantined(store, only(store), at=T)
    # When an operator replays them before the run releases it
    assert store.replay(read)
    # Then the release is refused: the units are unsent again
    assert store.release(read) is False
    assert index_keys(local_table) == counter_keys("cus_A") and only(store).unsent == 4


def test_release_refuses_a_read_with_something_unsent_without_asking_the_table(store):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    assert store.release(only(store)) is False


# -- replay -------------------------------------------------------------------------------------


def test_a_replay_makes_the_quarantined_units_sendable_under_a_new_identifier(store, local_table):
    # Given a counter whose units Stripe refused, released from the backlog by the next run
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = quarantined(store, only(store))
    assert store.release(read) and index_keys(local_table) == []
    # When an operator replays it
    assert store.replay(read) is True
    # Then it is back in the backlog with its units unsent, out of the quarantine
    again = only(store)
    assert (again.unsent, again.quarantined, again.quarantine_reason) == (4, 0, None)
    assert store.quarantined() == [] and store.quarantined_counter(read.id) is None
    # and the next decision is a new one: a new identifier
    assert decision_for(again).seq == 2


def test_a_second_replay_of_the_same_read_is_refused(store):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = quarantined(store, only(store))
    assert store.replay(read) is True
    assert store.replay(read) is False
    assert only(store).unsent == 4 and totals(store) == {"m": (4, 0)}


def test_a_replay_is_refused_when_the_counter_was_quarantined_again_since_the_read(store):
    # Given an operator's read of a quarantine, then a replay, and a new refusal of those units
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = quarantined(store, only(store), at=T)
    assert store.replay(read)
    quarantined(store, only(store), at=T + 60)
    # When the stale read is replayed / Then it is refused and the new quarantine stays
    assert store.replay(read) is False
    [held] = store.quarantined()
    assert (held.quarantined, held.quarantined_at) == (4, T + 60)


def test_a_restamped_replay_moves_the_units_into_the_target_period(store, local_table):
    # Given quarantined units in November
    record(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    read = quarantined(store, only(store))
    target = Counter(
        customer="cus_A",
        meter="m",
        period_start="2027-01-01T00:00:00Z",
        period_end=int(datetime(2027, 2, 1, tzinfo=UTC).timestamp()),
    )
    # When they are replayed into January
    assert store.replay(read, restamp_to=target) is True
    # Then November no longer counts them and January holds them, in the backlog
    assert totals(store) == {"m": (0, 0)}
    january = {t.meter: t.quantity for t in store.period_totals("cus_A", target.period_start)}
    assert january == {"m": 4}
    moved = [c for c in backlog(store) if c.period_start == target.period_start]
    assert [(c.unsent, c.shard) for c in moved] == [(4, 0)]
    assert store.replay(read, restamp_to=target) is False  # once only


# -- the whole flush on the real engine ----------------------------------------------------------


def test_a_full_flush_on_the_real_engine_reports_everything_once(store, local_table):
    record(
        store,
        *[
            {"stripe_customer_id": f"cus_{c}", "meter": m, "quantity": 2}
            for c in "ABC"
            for m in "mn"
        ],
    )
    billing = FakeBilling()
    summary = Flusher(store, billing, time_left=lambda: 300, clock=lambda: T).run()
    assert (summary.counters_read, summary.sent, summary.units_reported) == (6, 6, 12)
    assert billing.totals() == {(f"cus_{c}", m): 2 for c in "ABC" for m in "mn"}
    assert totals(store, "cus_B") == {"m": (2, 2), "n": (2, 2)}
    assert index_keys(local_table) == []
    again = Flusher(store, billing, time_left=lambda: 300, clock=lambda: T).run()
    assert (again.counters_read, again.sent) == (0, 0) and len(billing.calls) == 6


def test_a_usage_read_is_one_query_returning_one_item_per_meter_whatever_the_event_count(
    store, local_table
):
    # Given 300 events for one customer over two meters
    for _ in range(3):
        record(
            store, *[{"stripe_customer_id": "cus_A", "meter": m} for m in "mn" for _ in range(50)]
        )
    calls = []
    local_table.client.meta.events.register(
        "after-call.dynamodb",
        lambda http_response, parsed, model, **_: calls.append((model.name, parsed)),
    )
    # When the portal reads the period's totals
    result = totals(store)
    # Then one Query returned two items: the cost follows meters, not events
    assert result == {"m": (150, 0), "n": (150, 0)}
    assert [(name, parsed["Count"]) for name, parsed in calls] == [("Query", 2)]


def test_a_counter_that_stays_contended_answers_503_and_stores_nothing(
    store, local_table, monkeypatch
):
    # Given every transaction meeting another one, and a short retry budget
    monkeypatch.setattr(dynamodb, "WRITE_BUDGET_SECONDS", 0.2)
    conflict_on_first_transactions(local_table.client, 10_000)
    # When an event is recorded / Then the store gives up with the retryable 503 error
    with pytest.raises(StoreUnavailable):
        record(store, {"stripe_customer_id": "cus_A", "quantity": 5})
    # And nothing was stored: the client's retry is safe
    assert totals(store) == {} and index_keys(local_table) == []
