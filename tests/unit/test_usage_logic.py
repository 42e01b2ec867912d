from datetime import UTC, datetime

from tests.fakes import InMemoryStore
from usage_meter.logic.usage import current_usage

NOW = datetime(2026, 11, 26, 8, 5, tzinfo=UTC)


def test_every_configured_meter_appears_with_zeros_when_unused():
    usage = current_usage("cus_A1", included={"b": 0, "a": 10}, store=InMemoryStore(), now=NOW)
    assert [(m.meter, m.quantity, m.included_remaining) for m in usage.meters] == [
        ("a", 0, 10),
        ("b", 0, 0),
    ]


def test_allowance_billable_and_pending_follow_the_counters():
    # Given 1234 accepted units of which 1200 are reported, and 1000 included
    store = InMemoryStore()
    store.counters[("cus_A1", "2026-11-01T00:00:00Z", "ai_messages")] = [1234, 1200]
    store.counters[("cus_A1", "2026-10-01T00:00:00Z", "ai_messages")] = [99, 99]
    # When the current usage is read
    usage = current_usage("cus_A1", included={"ai_messages": 1000}, store=store, now=NOW)
    # Then the DESIGN §4 figures come out, from this period only
    out = usage.model_dump(mode="json")
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
