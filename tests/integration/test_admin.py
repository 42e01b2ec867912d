"""The operators' command against a real table: list quarantined batches, replay them."""

import json
from datetime import UTC, datetime

from tests.fakes import FakeBilling
from usage_meter import admin
from usage_meter.billing import PermanentBillingError
from usage_meter.logic.flush import Flusher
from usage_meter.logic.record import record_events
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore


def quarantine_one(table: str, customer: str) -> None:
    store = DynamoStore(table)
    request = EventIn(stripe_customer_id=customer, meter="m", quantity=4)
    record_events([request], meters={"m"}, store=store, now=datetime.now(UTC))
    billing = FakeBilling(
        script=[PermanentBillingError("No such customer", code="resource_missing")]
    )
    Flusher(store, billing, time_left=lambda: 300).run()


def lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_quarantine_list_shows_each_batch_with_its_reason(local_table, capsys):
    quarantine_one(local_table.name, "cus_A")
    assert admin.main(["--table", local_table.name, "quarantine", "list"]) == 0
    [batch] = lines(capsys)
    assert (batch["customer"], batch["quantity"], batch["events"]) == ("cus_A", 4, 1)
    assert batch["reason"] == "resource_missing: No such customer"


def test_replay_all_puts_every_batch_back_for_the_next_flush(local_table, capsys):
    quarantine_one(local_table.name, "cus_A")
    quarantine_one(local_table.name, "cus_B")
    assert admin.main(["--table", local_table.name, "quarantine", "replay", "--all"]) == 0
    assert [b["state"] for b in lines(capsys)] == ["claimed", "claimed"]
    billing = FakeBilling()
    summary = Flusher(DynamoStore(local_table.name), billing, time_left=lambda: 300).run()
    assert summary.groups_sent == 2 and billing.totals() == {("cus_A", "m"): 4, ("cus_B", "m"): 4}


def test_replaying_an_unknown_batch_fails_clearly(local_table, capsys):
    assert admin.main(["--table", local_table.name, "quarantine", "replay", "umb_nope"]) == 1
    assert lines(capsys) == [
        {"id": "umb_nope", "error": "not_found", "message": "no batch umb_nope"}
    ]


def test_status_counts_the_backlog(local_table, capsys):
    store = DynamoStore(local_table.name)
    record_events(
        [EventIn(stripe_customer_id="cus_A", meter="m", quantity=1)] * 1,
        meters={"m"},
        store=store,
        now=datetime.now(UTC),
    )
    assert admin.main(["--table", local_table.name, "status"]) == 0
    assert lines(capsys) == [{"unreported_events": 1, "open_batches": 0, "quarantined_batches": 0}]
