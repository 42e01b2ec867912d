import random
from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling, InMemoryStore
from usage_meter.billing import (
    BillingAuthError,
    PermanentBillingError,
    RateLimited,
    TransientBillingError,
)
from usage_meter.logic.flush import MAX_BATCH_EVENTS, MAX_STRIPE_VALUE, Flusher, FlushPolicy, plan
from usage_meter.logic.record import record_events
from usage_meter.models.domain import BacklogEvent, Batch, BatchState, MeterEventRequest
from usage_meter.models.input import EventIn

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
T = int(NOW.timestamp())


def backlog_event(
    i: int, *, t: int = T, q: int = 1, customer: str = "cus_A", meter: str = "m"
) -> BacklogEvent:
    return BacklogEvent(
        id=f"ev_{i:05d}",
        customer=customer,
        meter=meter,
        quantity=q,
        event_time=t,
        period_start="2026-11-01T00:00:00Z",
    )


def seed(store: InMemoryStore, *events: dict) -> None:
    requests = [EventIn.model_validate({"meter": "m", "quantity": 1, **e}) for e in events]
    record_events(requests, meters={"m", "n"}, store=store, now=NOW, batch=True)


def flusher(
    store, billing, *, time_left: float = 300.0, sleeps: list | None = None, **policy
) -> Flusher:
    return Flusher(
        store,
        billing,
        time_left=lambda: time_left,
        clock=lambda: T + 60,
        sleep=(sleeps.append if sleeps is not None else lambda _: None),
        rng=random.Random(7),
        policy=FlushPolicy(**policy),
    )


def _request(batch: Batch) -> MeterEventRequest:
    return MeterEventRequest(
        identifier=batch.identifier,
        event_name=batch.meter,
        customer=batch.customer,
        value=batch.quantity,
        timestamp=batch.timestamp,
    )


# -- planning ----------------------------------------------------------------------------------


def test_plan_groups_by_customer_meter_period_and_hour():
    events = [
        backlog_event(1),
        backlog_event(2, t=T + 3599 - T % 3600),  # same hour
        backlog_event(3, t=T + 3600),  # next hour
        backlog_event(4, customer="cus_B"),
        backlog_event(5, meter="n"),
    ]
    batches = plan(events, planned_at=T)
    assert sorted(len(b.event_ids) for b in batches) == [1, 1, 1, 2]


def test_plan_is_deterministic_so_concurrent_runs_agree_on_ids():
    events = [backlog_event(i) for i in range(10)]
    assert [b.id for b in plan(events, T)] == [b.id for b in plan(list(reversed(events)), T + 5)]


def test_plan_stamps_each_batch_with_an_event_time_inside_its_hour():
    [batch] = plan([backlog_event(1, t=T + 10), backlog_event(2, t=T + 20)], T)
    assert batch.timestamp == T + 20 and batch.hour <= batch.timestamp < batch.hour + 3600


def test_plan_splits_a_group_whose_total_exceeds_15_digits():
    big = 10**12
    events = [backlog_event(i, q=big) for i in range(1001)]
    batches = plan(events, T)
    assert all(b.quantity <= MAX_STRIPE_VALUE for b in batches)
    assert sum(b.quantity for b in batches) == 1001 * big and len(batches) == 2


def test_plan_caps_events_per_batch():
    batches = plan([backlog_event(i) for i in range(MAX_BATCH_EVENTS + 1)], T)
    assert [len(b.event_ids) for b in batches] == [MAX_BATCH_EVENTS, 1]


# -- a run ---------------------------------------------------------------------------------


def test_a_flush_reports_every_unit_once_in_one_call_per_group():
    # Given events for two customers and two meters in one hour
    store, billing = InMemoryStore(), FakeBilling()
    seed(
        store,
        *[
            {"stripe_customer_id": c, "meter": m, "quantity": 2}
            for c in ("cus_A", "cus_B")
            for m in ("m", "n")
            for _ in range(3)
        ],
    )
    # When the flush runs
    summary = flusher(store, billing).run()
    # Then each (customer, meter) got one call with its total, and the counters show it reported
    assert billing.totals() == {(c, m): 6 for c in ("cus_A", "cus_B") for m in ("m", "n")}
    assert len(billing.calls) == 4
    assert (summary.groups_sent, summary.events_reported, summary.units_reported) == (4, 12, 24)
    assert all(q == r == 6 for q, r in store.counters.values())


def test_a_second_flush_sends_nothing():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A"})
    flusher(store, billing).run()
    summary = flusher(store, billing).run()
    assert len(billing.calls) == 1 and summary.groups_sent == 0


def test_the_stripe_timestamp_is_the_events_own_time_not_now():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A", "timestamp": "2026-10-31T23:30:00Z"})
    flusher(store, billing).run()
    [call] = billing.calls
    assert call.timestamp == int(datetime(2026, 10, 31, 23, 30, tzinfo=UTC).timestamp())


def test_a_batch_planned_by_a_dead_run_is_resumed_with_the_same_identifier():
    # Given a run that planned a batch and died
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A"})
    [planned] = plan(store.backlog(), T)
    store.create_batch(planned)
    # When the next run flushes
    summary = flusher(store, billing).run()
    # Then it sends that batch under its identifier, once
    assert [c.identifier for c in billing.calls] == [planned.identifier]
    assert summary.batches_resumed == 1 and store.batches[planned.id].state == BatchState.REPORTED


def test_a_batch_delivered_but_not_confirmed_is_not_counted_twice():
    # Given Stripe accepted a batch but the run died before confirming it
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A", "quantity": 5})
    [planned] = plan(store.backlog(), T)
    store.create_batch(planned)
    claimed = store.claim(planned)
    batch = store.mark_claimed(planned, 5, T, sorted(claimed))
    billing.send(_request(batch))
    # When the next run resumes it
    flusher(store, billing).run()
    # Then Stripe holds 5 units, and the counter says 5 reported
    assert billing.totals() == {("cus_A", "m"): 5}
    assert store.counters[("cus_A", "2026-11-01T00:00:00Z", "m")] == [5, 5]


def test_a_rate_limited_call_is_retried_with_backoff_honouring_retry_after():
    store, billing, sleeps = InMemoryStore(), FakeBilling(), []
    seed(store, {"stripe_customer_id": "cus_A"})
    billing.script = [RateLimited("slow down"), RateLimited("slow down", retry_after=3.0)]
    summary = flusher(store, billing, sleeps=sleeps).run()
    assert summary.groups_sent == 1 and len(billing.calls) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and sleeps[1] >= 3.0


def test_a_pair_still_rate_limited_after_all_attempts_is_deferred_not_lost():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A"})
    billing.script = [RateLimited("slow down") for _ in range(5)]
    summary = flusher(store, billing).run()
    assert (summary.groups_sent, summary.groups_deferred) == (0, 1)
    # and the next run delivers it
    assert flusher(store, billing).run().groups_sent == 1
    assert billing.totals() == {("cus_A", "m"): 1}


def test_a_stripe_outage_defers_the_batch_and_reports_an_error():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A"})
    billing.script = [TransientBillingError("503")]
    summary = flusher(store, billing).run()
    assert summary.groups_deferred == 1 and summary.errors
    assert flusher(store, billing).run().groups_sent == 1


def test_a_permanent_rejection_quarantines_only_that_batch():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A"}, {"stripe_customer_id": "cus_B"})
    billing.script = [PermanentBillingError("No such customer", code="resource_missing")]
    summary = flusher(store, billing, parallel_pairs=1).run()
    assert (summary.groups_quarantined, summary.groups_sent) == (1, 1)
    [quarantined] = store.quarantined_batches()
    assert quarantined.reason == "resource_missing: No such customer"
    # and it is never retried by later runs
    calls = len(billing.calls)
    flusher(store, billing).run()
    assert len(billing.calls) == calls


def test_a_bad_api_key_stops_the_run_without_quarantining_anything():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, *[{"stripe_customer_id": f"cus_{c}"} for c in "ABCDEF"])
    billing.script = [BillingAuthError("Invalid API Key")] * 6
    summary = flusher(store, billing, parallel_pairs=1).run()
    assert summary.errors and summary.stopped_early and summary.groups_quarantined == 0
    assert len(billing.calls) == 1
    billing.script = []
    assert flusher(store, billing).run().groups_sent == 6


def test_an_event_too_old_for_stripe_is_quarantined_and_counted():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A", "timestamp": "2026-10-24T08:00:00Z"})
    summary = Flusher(store, billing, time_left=lambda: 300, clock=lambda: T + 3 * 86400).run()
    assert summary.groups_quarantined == 1 and billing.calls == []
    assert store.quarantined_batches()[0].reason.startswith("timestamp_out_of_window")


def test_with_no_time_left_a_run_takes_no_new_work():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A"})
    summary = flusher(store, billing, time_left=10).run()
    assert summary.stopped_early and billing.calls == [] and store.batches == {}


def test_two_runs_planning_the_same_events_report_them_once():
    # Given two runs that planned different batches over overlapping events
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, *[{"stripe_customer_id": "cus_A", "quantity": 2}] * 3)
    events = list(store.backlog())
    for chunk in (events[:2], events):
        for batch in plan(chunk, T):
            store.create_batch(batch)
    # When a run flushes
    flusher(store, billing).run()
    # Then every unit is reported once: each event went to exactly one batch
    assert billing.totals() == {("cus_A", "m"): 6}
    assert sorted(b.quantity for b in store.batches.values()) == [2, 4]


def test_calls_for_one_pair_never_overlap():
    store = InMemoryStore()
    seed(store, *[{"stripe_customer_id": "cus_A", "timestamp": T - h * 3600} for h in range(6)])
    seed(store, *[{"stripe_customer_id": f"cus_{c}"} for c in "BCDE"])

    class Overlaps(FakeBilling):
        in_flight: set = set()
        overlapped: bool = False

        def send(self, request):
            import time

            pair = (request.customer, request.event_name)
            if pair in self.in_flight:
                self.overlapped = True
            self.in_flight.add(pair)
            time.sleep(0.01)
            self.in_flight.discard(pair)
            return super().send(request)

    billing = Overlaps()
    summary = flusher(store, billing, parallel_pairs=4).run()
    assert summary.groups_sent == 10 and not billing.overlapped


@pytest.mark.parametrize("fault_on", ["create_batch", "claim", "mark_claimed", "confirm"])
def test_a_store_fault_leaves_the_work_for_the_next_run(fault_on):
    # Given the table fails one kind of write during a run
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A", "quantity": 4})
    original = getattr(store, fault_on)

    def broken(*args, **kwargs):
        raise ConnectionError("table unavailable")

    setattr(store, fault_on, broken)
    # When the run meets it / Then it reports the error instead of losing or inventing usage
    summary = flusher(store, billing).run()
    assert summary.errors and summary.groups_sent == 0
    # and once the table is back, the next run finishes the job, once
    setattr(store, fault_on, original)
    flusher(store, billing).run()
    assert billing.totals() == {("cus_A", "m"): 4}
    assert store.counters[("cus_A", "2026-11-01T00:00:00Z", "m")] == [4, 4]


def test_a_plan_that_lost_every_event_to_another_run_ends_empty():
    store, billing = InMemoryStore(), FakeBilling()
    seed(store, {"stripe_customer_id": "cus_A"})
    events = list(store.backlog())
    [first] = plan(events, T)
    [second] = plan([*events, backlog_event(99)], T)
    store.create_batch(first)
    flusher(store, billing).run()  # reports `first`
    store.create_batch(second)  # a slower run planned over the same event (and a vanished one)
    summary = flusher(store, billing).run()
    assert summary.groups_empty == 1 and store.batches[second.id].state == BatchState.EMPTY
    assert billing.totals() == {("cus_A", "m"): 1}
