"""A customer's usage when its meters are billed on different cycles (issue 15, mutation
testing: what a changed line of logic/usage.py would get wrong that tests/unit/test_usage_logic.py
does not see)."""

from datetime import UTC, datetime

from tests.fakes import InMemoryStore
from usage_meter.logic.usage import current_usage
from usage_meter.models.domain import Counter, CustomerBilling, ItemPeriods, Subscription

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def subscribed(*items: ItemPeriods, status: str = "active") -> InMemoryStore:
    store = InMemoryStore()
    subscription = Subscription(id="sub_1", customer="cus_A", status=status, read_at=1, items=items)
    store.billings["cus_A"] = CustomerBilling(
        customer="cus_A", subscriptions={"sub_1": subscription}
    )
    return store


def item(meter: str, start: str, end: str, interval: str = "month", renews: bool = True):
    return ItemPeriods(
        item=f"si_{meter}", meter=meter, anchor=at(start), interval=interval,
        periods=((at(start), at(end)),), renews=renews,
    )  # fmt: skip


def put(store: InMemoryStore, meter: str, start: str, quantity: int) -> None:
    counter = Counter(
        customer="cus_A", meter=meter, period_start=start, period_end=0, quantity=quantity
    )
    store.counters[("cus_A", start, meter, 0)] = counter


def test_a_meter_on_its_own_cycle_says_its_period_and_counts_in_it():
    # Given meter "a" billed monthly from the 13th, and meter "b" yearly from March (listed first)
    store = subscribed(
        item("b", "2026-03-01T00:00:00", "2027-03-01T00:00:00", interval="year"),
        item("a", "2026-11-13T00:00:00", "2026-12-13T00:00:00"),
    )
    put(store, "a", "2026-11-13T00:00:00Z", 3)
    put(store, "b", "2026-03-01T00:00:00Z", 7)
    # When the usage is read
    usage = current_usage("cus_A", included={"a": 0, "b": 0}, store=store, now=NOW)
    # Then the customer's period is the first meter's, and b says its own period
    assert (usage.period.start, usage.period.end) == (
        datetime(2026, 11, 13, tzinfo=UTC),
        datetime(2026, 12, 13, tzinfo=UTC),
    )
    a, b = usage.meters
    assert (a.meter, a.quantity, a.period) == ("a", 3, None)
    assert (b.meter, b.quantity) == ("b", 7)
    assert (b.period.start, b.period.end, b.period.source) == (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2027, 3, 1, tzinfo=UTC),
        "stripe_subscription",
    )


def test_a_period_cut_short_inside_the_current_one_counts_in_it():
    # Given a counter of the period's start and one a plan change started inside it
    store = subscribed(item("a", "2026-11-13T00:00:00", "2026-12-13T00:00:00"))
    put(store, "a", "2026-11-13T00:00:00Z", 3)
    put(store, "a", "2026-11-20T00:00:00Z", 4)
    usage = current_usage("cus_A", included={"a": 0}, store=store, now=NOW)
    assert usage.meters[0].quantity == 7


def test_after_a_cancellation_the_month_starts_where_the_subscription_ended():
    store = subscribed(item("a", "2026-10-13T00:00:00", "2026-11-10T00:00:00", renews=False))
    usage = current_usage("cus_A", included={"a": 0}, store=store, now=NOW)
    assert (usage.period.start, usage.period.end, usage.period.source) == (
        datetime(2026, 11, 10, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
        "calendar_month",
    )
