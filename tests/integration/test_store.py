"""DynamoStore on DynamoDB Local (AWS's engine): the storage contract the logic relies on."""

import threading
from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling
from usage_meter.logic.flush import Flusher, plan
from usage_meter.logic.record import record_events
from usage_meter.models.domain import BatchState
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import INDEX, DynamoStore

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
T = int(NOW.timestamp())
PERIOD = "2026-11-01T00:00:00Z"


@pytest.fixture
def store(local_table):
    return DynamoStore(local_table.name, client=local_table.client, clock=lambda: T)


def record(store, *events: dict) -> list:
    requests = [EventIn.model_validate({"meter": "m", "quantity": 1, **e}) for e in events]
    return record_events(requests, meters={"m", "n"}, store=store, now=NOW, batch=len(requests) > 1)


def totals(store, customer: str = "cus_A") -> dict[str, tuple[int, int]]:
    return {t.meter: (t.quantity, t.reported) for t in store.period_totals(customer, PERIOD)}


def index_partitions(local_table) -> list[str]:
    items = local_table.client.scan(TableName=local_table.name, IndexName=INDEX)["Items"]
    return sorted(i["backlog_pk"]["S"] for i in items)


def test_an_event_and_its_counter_are_written_together(store, local_table):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 7})
    assert totals(store) == {"m": (7, 0)}
    [partition] = index_partitions(local_table)
    assert partition.startswith("U#")


def test_a_replay_is_a_failed_conditional_put_not_a_second_row(store, local_table):
    record(store, {"stripe_customer_id": "cus_A", "idempotency_key": "k"})
    [again] = record(store, {"stripe_customer_id": "cus_A", "idempotency_key": "k"})
    assert again.duplicate and totals(store) == {"m": (1, 0)}
    assert (
        local_table.client.scan(TableName=local_table.name, Select="COUNT")["Count"] == 2
    )  # event + counter


def test_a_batch_of_100_events_with_100_counters_is_stored_in_several_transactions(store):
    events = [{"stripe_customer_id": f"cus_{i}", "quantity": i + 1} for i in range(100)]
    results = record(store, *events)
    assert not any(r.duplicate for r in results)
    assert totals(store, "cus_99") == {"m": (100, 0)}


def test_a_batch_mixing_replays_and_new_events_stores_only_the_new_ones(store):
    record(store, {"stripe_customer_id": "cus_A", "idempotency_key": "old", "quantity": 5})
    results = record(
        store,
        {"stripe_customer_id": "cus_A", "idempotency_key": "old", "quantity": 5},
        {"stripe_customer_id": "cus_A", "idempotency_key": "new", "quantity": 2},
    )
    assert [r.duplicate for r in results] == [True, False]
    assert totals(store) == {"m": (7, 0)}


def test_the_backlog_reads_every_shard_and_every_page(store, local_table):
    # Given 200 events over 100 customers (so every shard), and pages of at most 7 items
    record(store, *[{"stripe_customer_id": f"cus_{i}"} for i in range(100)])
    record(store, *[{"stripe_customer_id": f"cus_{i}"} for i in range(100)])
    pages = []

    def small_pages(params, **_):
        params.setdefault("Limit", 7)
        pages.append(params.get("ExclusiveStartKey"))

    local_table.client.meta.events.register("provide-client-params.dynamodb.Query", small_pages)
    # When the backlog is read / Then nothing is missed
    assert len({e.id for e in store.backlog()}) == 200
    assert len(pages) >= 200 / 7 and sum(p is not None for p in pages) >= 200 / 7 - 16


def test_claiming_takes_events_out_of_the_sparse_index(store, local_table):
    record(store, {"stripe_customer_id": "cus_A"}, {"stripe_customer_id": "cus_A"})
    [batch] = plan(store.backlog(), T)
    store.create_batch(batch)
    claimed = store.claim(batch)
    assert len(claimed) == 2 and list(store.backlog()) == []
    assert index_partitions(local_table) == ["B#open"]


def test_a_claim_lost_to_another_batch_drops_out(store):
    record(store, {"stripe_customer_id": "cus_A"}, {"stripe_customer_id": "cus_A"})
    events = list(store.backlog())
    [mine] = plan(events[:1], T)
    [theirs] = plan(events, T)
    store.create_batch(mine)
    store.create_batch(theirs)
    assert len(store.claim(mine)) == 1
    assert list(store.claim(theirs)) == [events[1].id]
    # and claiming again is idempotent for the owner
    assert len(store.claim(mine)) == 1


def test_concurrent_claims_give_each_event_to_exactly_one_batch(store):
    record(store, *[{"stripe_customer_id": "cus_A"} for _ in range(60)])
    events = list(store.backlog())
    batches = [plan(events[i::2] + events[:10], T)[0] for i in range(2)]
    for b in batches:
        store.create_batch(b)
    results: list = [None, None]

    def claim(i: int) -> None:
        results[i] = store.claim(batches[i])

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(results[0]) & set(results[1])
    assert set(results[0]) | set(results[1]) == {e.id for e in events}


def test_mark_claimed_is_decided_once(store):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 3})
    [batch] = plan(store.backlog(), T)
    store.create_batch(batch)
    first = store.mark_claimed(batch, 3, T, batch.event_ids)
    second = store.mark_claimed(batch, 99, T, ())
    assert first == second and second.quantity == 3 and second.state == BatchState.CLAIMED


def test_confirm_counts_a_batch_once_even_if_repeated(store, local_table):
    record(store, {"stripe_customer_id": "cus_A", "quantity": 3})
    [batch] = plan(store.backlog(), T)
    store.create_batch(batch)
    batch = store.mark_claimed(batch, 3, T, sorted(store.claim(batch)))
    store.confirm(batch, T)
    store.confirm(batch, T + 1)  # a concurrent run confirming the same batch
    assert totals(store) == {"m": (3, 3)}
    assert index_partitions(local_table) == []
    assert store.get_batch(batch.id).state == BatchState.REPORTED


def test_a_quarantined_batch_is_listed_with_its_reason(store):
    record(store, {"stripe_customer_id": "cus_A"})
    [batch] = plan(store.backlog(), T)
    store.create_batch(batch)
    batch = store.mark_claimed(batch, 1, T, sorted(store.claim(batch)))
    store.quarantine(batch, "resource_missing: No such customer")
    [listed] = store.quarantined_batches()
    assert (listed.id, listed.reason) == (batch.id, "resource_missing: No such customer")
    assert store.open_batches() == []


def test_a_full_flush_on_the_real_engine_reports_everything_once(store):
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
    assert summary.groups_sent == 6 and billing.totals() == {
        (f"cus_{c}", m): 2 for c in "ABC" for m in "mn"
    }
    assert totals(store, "cus_B") == {"m": (2, 2), "n": (2, 2)}
    assert Flusher(store, billing, time_left=lambda: 300, clock=lambda: T).run().groups_sent == 0


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
