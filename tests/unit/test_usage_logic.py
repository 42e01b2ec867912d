from datetime import UTC, datetime

from tests.fakes import InMemoryStore
from usage_meter.logic.usage import current_usage
from usage_meter.models.domain import Counter

NOW = datetime(2026, 11, 26, 8, 5, tzinfo=UTC)
NOV, OCT = "2026-11-01T00:00:00Z", "2026-10-01T00:00:00Z"


def put_counter(
    store: InMemoryStore, period: str, quantity: int, reported: int, shard: int = 0
) -> None:
    store.counters[("cus_A1", period, "ai_messages", shard)] = Counter(
        customer="cus_A1",
        meter="ai_messages",
        period_start=period,
        period_end=0,
        shard=shard,
        quantity=quantity,
        reported=reported,
    )


def test_every_configured_meter_appears_with_zeros_when_unused():
    usage = current_usage("cus_A1", included={"b": 0, "a": 10}, store=InMemoryStore(), now=NOW)
    assert [(m.meter, m.quantity, m.included_remaining) for m in usage.meters] == [
        ("a", 0, 10),
        ("b", 0, 0),
    ]


def test_allowance_billable_and_pending_follow_the_counters():
    # Given 1234 accepted units of which 1200 are reported, and 1000 included
    store = InMemoryStore()
    put_counter(store, NOV, quantity=1234, reported=1200)
    put_counter(store, OCT, quantity=99, reported=99)
    # When the current usage is read
    usage = current_usage("cus_A1", included={"ai_messages": 1000}, store=store, now=NOW)
    # Then the DESIGN §4 figures come out, from this period only
    out = usage.model_dump(mode="json", exclude_none=True)
    assert out["meters"] == [
        {
            "meter": "ai_messages",
            "quantity": 1234,
            "reported": 1200,
            "pending": 34,
            "included": 1000,
            "included_remaining": 0,
            "billable": 234,
        }
    ]
    assert out["period"] == {
        "start": "2026-11-01T00:00:00Z",
        "end": "2026-12-01T00:00:00Z",
        "source": "calendar_month",
    }
    assert out["as_of"] == "2026-11-26T08:05:00Z"


def test_december_ends_at_new_year():
    usage = current_usage(
        "cus_A1", included={}, store=InMemoryStore(), now=datetime(2026, 12, 31, 23, tzinfo=UTC)
    )
    assert usage.period.end == datetime(2027, 1, 1, tzinfo=UTC)


def test_the_shards_of_a_hot_counter_add_up():
    # Given a contended counter spread over three shards
    store = InMemoryStore()
    put_counter(store, NOV, quantity=10, reported=10)
    put_counter(store, NOV, quantity=5, reported=0, shard=3)
    put_counter(store, NOV, quantity=7, reported=2, shard=5)
    # When the current usage is read
    usage = current_usage("cus_A1", included={"ai_messages": 0}, store=store, now=NOW)
    # Then the meter shows their sums
    [meter] = usage.meters
    assert (meter.quantity, meter.reported, meter.pending) == (22, 12, 10)
