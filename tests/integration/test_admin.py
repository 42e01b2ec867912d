"""The operators' command against a real table: status, quarantine list, replay (and restamp)."""

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fakes import FakeBilling
from usage_meter import admin
from usage_meter.billing import PermanentBillingError
from usage_meter.logic.flush import Flusher
from usage_meter.logic.quarantine import REPLAY_GUARD
from usage_meter.logic.record import record_events
from usage_meter.models.domain import Decision
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore

# Quarantined this long ago, a counter may be replayed: every run that read it has given up.
LONG_AGO = REPLAY_GUARD + 60


def record(table: str, customer: str, quantity: int, at: float) -> None:
    request = EventIn(stripe_customer_id=customer, meter="m", quantity=quantity)
    when = datetime.fromtimestamp(at, UTC)
    record_events([request], meters={"m"}, store=DynamoStore(table), now=when)


def flush(table: str, billing: FakeBilling, at: float):
    return Flusher(DynamoStore(table), billing, time_left=lambda: 300, clock=lambda: at).run()


def quarantine_one(table: str, customer: str, *, ago: float = LONG_AGO) -> None:
    """Units Stripe refused for good, `ago` seconds ago."""
    at = time.time() - ago
    record(table, customer, 4, at)
    refusal = PermanentBillingError("No such customer", code="resource_missing")
    summary = flush(table, FakeBilling(script=[refusal]), at)
    assert summary.quarantined == 1


def run(table: str, *argv: str) -> int:
    return admin.main(["--table", table, *argv])


def lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_status_counts_the_backlog_the_decisions_in_flight_and_the_quarantine(local_table, capsys):
    # Given one pair waiting, one whose decision Stripe has not answered, one quarantined
    now = time.time()
    quarantine_one(local_table.name, "cus_Gone")
    record(local_table.name, "cus_Wait", 3, now)
    record(local_table.name, "cus_Flight", 5, now)
    store = DynamoStore(local_table.name)
    [flight] = [c for page in store.backlog() for c in page if c.customer == "cus_Flight"]
    assert store.decide(flight, Decision(seq=1, value=5, timestamp=int(now), decided_at=int(now)))
    # When the operator asks for the status, for a script
    assert run(local_table.name, "status", "--json") == 0
    # Then (the quarantined counter stays in the backlog until the next run releases it)
    [status] = lines(capsys)
    assert status == status | {
        "counters_in_backlog": 3,
        "units_unsent": 3,
        "decisions_in_flight": 1,
        "units_in_flight": 5,
        "quarantined_counters": 1,
        "units_quarantined": 4,
        "quarantined_pairs": 1,
    }
    assert status["oldest_decision_in_flight_seconds"] < 60
    # and for a person: the same, readable, with what needs attention
    assert run(local_table.name, "status") == 0
    readable = capsys.readouterr().out
    assert "counters waiting for Stripe    3" in readable
    assert "verdict: units are quarantined" in readable


def test_quarantine_list_shows_each_counter_with_its_units_and_reason(local_table, capsys):
    quarantine_one(local_table.name, "cus_A")
    assert run(local_table.name, "quarantine", "list") == 0
    [counter] = lines(capsys)
    assert counter["id"].startswith("umc_")
    assert (counter["customer"], counter["meter"], counter["quantity"]) == ("cus_A", "m", 4)
    assert (counter["quarantined"], counter["reported"]) == (4, 0)
    assert counter["quarantine_reason"] == "resource_missing: No such customer"


def test_a_replay_right_after_the_quarantine_is_refused_until_the_guard_has_passed(
    local_table, capsys
):
    # Given units quarantined a moment ago: a run that read them may still be sending
    quarantine_one(local_table.name, "cus_A", ago=0)
    [counter] = DynamoStore(local_table.name).quarantined()
    # When the operator replays them / Then it is refused, saying from when it may be
    assert run(local_table.name, "quarantine", "replay", counter.id) == 1
    [refused] = lines(capsys)
    assert (refused["id"], refused["error"]) == (counter.id, "replay_refused")
    assert "replay it from" in refused["message"]
    assert [c.id for c in DynamoStore(local_table.name).quarantined()] == [counter.id]


def test_replay_all_puts_every_old_quarantine_back_for_the_next_flush(local_table, capsys):
    # Given two counters quarantined long enough ago
    quarantine_one(local_table.name, "cus_A")
    quarantine_one(local_table.name, "cus_B")
    # When the operator replays them all
    assert run(local_table.name, "quarantine", "replay", "--all") == 0
    replayed = lines(capsys)
    assert sorted(c["customer"] for c in replayed) == ["cus_A", "cus_B"]
    # Then the quarantine is empty and the next flush sends them, under new identifiers
    assert DynamoStore(local_table.name).quarantined() == []
    billing = FakeBilling()
    summary = flush(local_table.name, billing, time.time())
    assert summary.sent == 2 and billing.totals() == {("cus_A", "m"): 4, ("cus_B", "m"): 4}
    assert {r.identifier.rsplit(".", 1)[1] for r in billing.calls} == {"2"}


def test_replaying_an_unknown_counter_fails_clearly(local_table, capsys):
    assert run(local_table.name, "quarantine", "replay", "umc_nope") == 1
    assert lines(capsys) == [
        {
            "id": "umc_nope",
            "error": "not_found",
            "message": "no quarantined units in counter umc_nope",
        }
    ]


# The replay restamps into the period current on its own clock: this test's `now` must be in it.
@pytest.mark.usefixtures("quiet_clock")
def test_units_too_old_for_stripe_are_replayed_only_with_restamp_into_the_current_period(
    local_table, capsys
):
    # Given units of a period that ended more than 35 days ago, which the flush quarantined
    now = time.time()
    old = now - timedelta(days=70).total_seconds()
    record(local_table.name, "cus_Old", 6, old)
    summary = flush(local_table.name, FakeBilling(), now - LONG_AGO)
    assert summary.quarantined == 1
    [held] = DynamoStore(local_table.name).quarantined()
    assert held.quarantine_reason is not None
    assert held.quarantine_reason.startswith("timestamp_too_far_in_past")
    # When the operator replays them as they are / Then it is refused: Stripe would refuse again
    assert run(local_table.name, "quarantine", "replay", held.id) == 1
    [refused] = lines(capsys)
    assert refused["error"] == "replay_refused" and "restamp" in refused["message"]
    # When they are replayed with --restamp
    assert run(local_table.name, "quarantine", "replay", held.id, "--restamp") == 0
    capsys.readouterr()
    # Then the next flush bills them in the current period, and the old period no longer has them
    billing = FakeBilling()
    summary = flush(local_table.name, billing, now)
    assert billing.totals() == {("cus_Old", "m"): 6}
    [request] = billing.calls
    assert now - 3600 <= request.timestamp <= now
    store = DynamoStore(local_table.name)
    assert [t.quantity for t in store.period_totals("cus_Old", held.period_start)] == [0]
    assert store.quarantined() == []
