"""Replaying quarantined units, at the edges (issue 15, mutation testing: what a changed line of
logic/quarantine.py would get wrong that tests/unit/test_quarantine.py does not see): when a
period is too old or closed for Stripe, where restamped units go, and what an operator is told
when a replay is refused."""

from datetime import UTC, datetime

import pytest

from tests.fakes import InMemoryStore, key_of
from usage_meter.errors import NotFound
from usage_meter.logic.flush import IDENTIFIER_WINDOW, SEND_MARGIN, STRIPE_MAX_AGE
from usage_meter.logic.quarantine import REPLAY_GUARD, ReplayRefused, replay
from usage_meter.models.domain import (
    Counter,
    CustomerBilling,
    Decision,
    ItemPeriods,
    Subscription,
)

START, END = "2026-11-01T00:00:00Z", int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
QUARANTINED_AT = END - 86_400
HOUR = 3600


def quarantined(source: str = "calendar_month", held: Decision | None = None) -> InMemoryStore:
    store = InMemoryStore()
    counter = Counter(
        customer="cus_A",
        meter="m",
        period_start=START,
        period_end=END,
        period_source=source,
        quantity=5,
        quarantined=5,
        seq=1,
        quarantine_reason="resource_missing: No such customer",
        quarantined_at=QUARANTINED_AT,
        held=held,
    )
    store.counters[key_of(counter)] = counter
    return store


def the_counter(store: InMemoryStore) -> Counter:
    [counter] = store.counters.values()
    return counter


def refused(store: InMemoryStore, now: int, **options) -> str:
    with pytest.raises(ReplayRefused) as refusal:
        replay(store, the_counter(store).id, now=now, **options)
    return refusal.value.message


def test_an_unknown_counter_is_not_found_by_its_id():
    with pytest.raises(NotFound, match=r"^no quarantined units in counter umc_x$"):
        replay(InMemoryStore(), "umc_x", now=END)


def test_a_replay_before_the_guard_says_from_when_it_may_run():
    store = quarantined()
    counter_id = the_counter(store).id
    assert refused(store, QUARANTINED_AT + REPLAY_GUARD - 1) == (
        f"counter {counter_id} was quarantined a moment ago, and a flush that read it may still "
        "be running: replay it from 2026-11-30T00:15:00Z"
    )


def test_a_held_decision_resent_exactly_at_stripes_window_is_still_resent():
    held = Decision(seq=1, value=5, timestamp=END - 60, decided_at=QUARANTINED_AT)
    store = quarantined(held=held)
    replay(store, the_counter(store).id, now=QUARANTINED_AT + IDENTIFIER_WINDOW)
    assert the_counter(store).sending == held


def test_a_held_decision_past_stripes_window_names_its_identifier():
    held = Decision(seq=1, value=5, timestamp=END - 60, decided_at=QUARANTINED_AT)
    store = quarantined(held=held)
    identifier = the_counter(store).identifier(held)
    assert refused(store, QUARANTINED_AT + IDENTIFIER_WINDOW + 1) == (
        f"Stripe may already have {identifier} (an answer to it was lost) and no longer "
        "recognises it: check the meter's events in Stripe, and replay with fresh only if it is "
        "not there"
    )


def test_a_held_decision_is_not_resent_while_another_is_in_flight():
    held = Decision(seq=1, value=5, timestamp=END - 60, decided_at=QUARANTINED_AT)
    store = quarantined(held=held)
    counter = the_counter(store)
    flying = Decision(seq=2, value=1, timestamp=END - 60, decided_at=QUARANTINED_AT + 60)
    store.counters[key_of(counter)] = counter.model_copy(update={"sending": flying})
    assert refused(store, QUARANTINED_AT + REPLAY_GUARD) == (
        f"counter {counter.id} has a decision in flight; replay it after the next flush"
    )


@pytest.mark.parametrize("held", [None, Decision(seq=1, value=5, timestamp=1, decided_at=END)])
def test_a_counter_changed_while_replaying_says_to_try_again(held):
    store = quarantined(held=held)
    store.replay = lambda *args, **kwargs: False
    assert refused(store, END + HOUR) == (
        f"counter {the_counter(store).id} changed while replaying it; try again"
    )


# The last second Stripe still takes the period's last second in: 35 days back, less the margin.
LAST_CHANCE = END - 1 + STRIPE_MAX_AGE - SEND_MARGIN


def test_a_period_is_replayed_as_it_is_until_stripes_window_closes_on_its_last_second():
    store = quarantined()
    replay(store, the_counter(store).id, now=LAST_CHANCE)
    assert store.in_backlog == {key_of(the_counter(store))}


def test_a_period_older_than_stripes_window_needs_restamp_saying_why():
    store = quarantined()
    assert refused(store, LAST_CHANCE + 1) == (
        f"counter {the_counter(store).id}'s period ended more than Stripe's 35 days ago, so "
        "Stripe would not bill it there; replay it with restamp to bill the units in the current "
        "period instead"
    )


def test_a_calendar_month_never_closes_for_an_invoice():
    store = quarantined(source="calendar_month")
    replay(store, the_counter(store).id, now=END + 30 * 86_400)
    assert the_counter(store).quarantined == 0


def test_a_subscription_period_closes_when_its_invoice_grace_ends():
    # Before the end of the grace (an hour by default), the units are replayed in their period
    store = quarantined(source="stripe_subscription")
    replay(store, the_counter(store).id, now=END + HOUR - 1)
    assert the_counter(store).quarantined == 0
    # At its end, they are not: the invoice is finalized
    store = quarantined(source="stripe_subscription")
    assert refused(store, END + HOUR) == (
        f"counter {the_counter(store).id}'s period has a finalized invoice, so Stripe would not "
        "bill it there; replay it with restamp to bill the units in the current period instead"
    )


def test_restamped_units_move_to_the_customers_current_subscription_period():
    # Given a customer now on a subscription whose period started on the 13th
    store = quarantined(source="stripe_subscription")
    period = (int(datetime(2026, 12, 13, tzinfo=UTC).timestamp()), END + 43 * 86_400)
    item = ItemPeriods(
        item="si_1", meter="m", anchor=period[0], interval="month", periods=(period,)
    )
    other_period = (period[0] - 86_400, period[0] + 86_400)  # another meter, on a daily cycle
    other = ItemPeriods(
        item="si_2", meter="other", anchor=other_period[0], interval="day", periods=(other_period,)
    )
    subscription = Subscription(
        id="sub_1", customer="cus_A", status="active", read_at=1, items=(other, item)
    )
    store.billings["cus_A"] = CustomerBilling(
        customer="cus_A", subscriptions={"sub_1": subscription}
    )
    # When the units are replayed with restamp on the 20th
    replay(store, the_counter(store).id, now=period[0] + 7 * 86_400, restamp=True)
    # Then they count in that period's counter, in the backlog
    target = store.counters[("cus_A", "2026-12-13T00:00:00Z", "m", 0)]
    assert (target.period_end, target.period_source, target.quantity) == (
        period[1],
        "stripe_subscription",
        5,
    )
    assert key_of(target) in store.in_backlog
