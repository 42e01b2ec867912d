"""Accepting usage, at the edges (issue 15, mutation testing: what a changed line of
logic/record.py would get wrong that tests/unit/test_record_logic.py and the property tests do
not see): the period of a meter on its own billing cycle, a repeated key after an event without
one, and what a refused request is told."""

from datetime import UTC, datetime

import pytest

from tests.fakes import InMemoryStore
from usage_meter.errors import IdempotencyConflict, ValidationFailed
from usage_meter.logic.record import LateUsage, record_events
from usage_meter.models.domain import CustomerBilling, ItemPeriods, Subscription
from usage_meter.models.input import EventIn

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def two_cycles() -> InMemoryStore:
    """Meter "a" billed monthly from the 13th, meter "b" yearly from March."""
    items = (
        ItemPeriods(item="si_a", meter="a", anchor=at("2026-11-13T00:00:00"), interval="month",
                    periods=((at("2026-11-13T00:00:00"), at("2026-12-13T00:00:00")),)),
        ItemPeriods(item="si_b", meter="b", anchor=at("2026-03-01T00:00:00"), interval="year",
                    periods=((at("2026-03-01T00:00:00"), at("2027-03-01T00:00:00")),)),
    )  # fmt: skip
    store = InMemoryStore()
    subscription = Subscription(
        id="sub_1", customer="cus_A", status="active", read_at=1, items=items
    )
    store.billings["cus_A"] = CustomerBilling(
        customer="cus_A", subscriptions={"sub_1": subscription}
    )
    return store


def event(**fields) -> EventIn:
    return EventIn.model_validate(
        {"stripe_customer_id": "cus_A", "meter": "a", "quantity": 1, **fields}
    )


def record(store, *events, late: LateUsage | None = None, batch: bool = False):
    return record_events(
        list(events), meters={"a", "b"}, store=store, now=NOW, batch=batch, late=late or LateUsage()
    )


def test_an_event_counts_in_its_own_meters_period():
    store = two_cycles()
    record(store, event(meter="b", quantity=7))
    [(_, period, meter, _)] = store.counters
    assert (period, meter) == ("2026-03-01T00:00:00Z", "b")


def test_late_usage_billed_in_the_current_period_goes_to_its_own_meters_period():
    # Given meter b billed monthly from the 20th: its period before Nov 20 is closed
    store = two_cycles()
    subscription = store.billings["cus_A"].subscriptions["sub_1"]
    b = ItemPeriods(item="si_b", meter="b", anchor=at("2026-10-20T00:00:00"), interval="month",
                    periods=((at("2026-10-20T00:00:00"), at("2026-11-20T00:00:00")),
                             (at("2026-11-20T00:00:00"), at("2026-12-20T00:00:00"))))  # fmt: skip
    items = (subscription.items[0], b)
    store.billings["cus_A"] = CustomerBilling(
        customer="cus_A",
        subscriptions={"sub_1": subscription.model_copy(update={"items": items})},
    )
    # When usage of Nov 19 comes, with the current_period policy
    late = LateUsage(policy="current_period")
    record(store, event(meter="b", timestamp="2026-11-19T00:00:00Z"), late=late)
    # Then it counts in b's current period
    [(_, period, meter, _)] = store.counters
    assert (period, meter) == ("2026-11-20T00:00:00Z", "b")


def test_a_repeated_key_after_an_event_without_one_is_refused_naming_it():
    with pytest.raises(ValidationFailed) as refused:
        record(InMemoryStore(), event(), event(idempotency_key="k"), event(idempotency_key="k"),
               batch=True)  # fmt: skip
    assert refused.value.message == "the request is not valid"
    assert refused.value.details == [
        {
            "field": "events[2].idempotency_key",
            "message": "repeats the idempotency key of events[1]",
        }
    ]


def test_a_conflict_says_the_key_was_reused_with_another_body():
    store = InMemoryStore()
    record(store, event(idempotency_key="k"))
    with pytest.raises(IdempotencyConflict) as conflict:
        record(store, event(idempotency_key="k", quantity=2))
    assert conflict.value.message == "an idempotency key was reused with a different body"
