from datetime import UTC, datetime

import pytest

from tests.fakes import FakeBilling, InMemoryStore
from usage_meter.billing import PermanentBillingError
from usage_meter.errors import NotFound
from usage_meter.logic.flush import Flusher
from usage_meter.logic.quarantine import ReplayRefused, replay
from usage_meter.logic.record import record_events
from usage_meter.models.domain import BatchState
from usage_meter.models.input import EventIn

T = int(datetime(2026, 11, 26, 8, tzinfo=UTC).timestamp())
DAY = 86_400


def quarantined_store(
    *, event_time: int = T, now: int = T
) -> tuple[InMemoryStore, FakeBilling, str]:
    store, billing = InMemoryStore(), FakeBilling()
    request = EventIn(stripe_customer_id="cus_A", meter="m", quantity=5, timestamp=event_time)
    record_events([request], meters={"m"}, store=store, now=datetime.fromtimestamp(event_time, UTC))
    billing.script = [PermanentBillingError("No such customer", code="resource_missing")]
    Flusher(store, billing, time_left=lambda: 300, clock=lambda: now).run()
    [batch] = store.quarantined_batches()
    return store, billing, batch.id


def test_a_replayed_batch_is_sent_by_the_next_flush_under_a_fresh_identifier():
    # Given a batch Stripe refused because the customer did not exist yet
    store, billing, batch_id = quarantined_store()
    refused = store.get_batch(batch_id).identifier
    # When the operator replays it after creating the customer, and the flush runs
    replayed = replay(store, batch_id, now=T + 60)
    summary = Flusher(store, billing, time_left=lambda: 300, clock=lambda: T + 120).run()
    # Then it is delivered once, under a new identifier, and counted as reported
    assert replayed.identifier == f"{batch_id}.r1" != refused
    assert summary.groups_sent == 1 and billing.totals() == {("cus_A", "m"): 5}
    assert store.counters[("cus_A", "2026-11-01T00:00:00Z", "m")] == [5, 5]
    assert store.get_batch(batch_id).state == BatchState.REPORTED


def test_each_replay_gets_its_own_identifier():
    store, billing, batch_id = quarantined_store()
    replay(store, batch_id, now=T)
    billing.script = [PermanentBillingError("still no customer", code="resource_missing")]
    Flusher(store, billing, time_left=lambda: 300, clock=lambda: T).run()
    assert replay(store, batch_id, now=T).identifier == f"{batch_id}.r2"


def test_a_batch_too_old_for_stripe_needs_restamp():
    store, _, batch_id = quarantined_store(now=T + 34 * DAY)
    with pytest.raises(ReplayRefused):
        replay(store, batch_id, now=T + 40 * DAY)
    assert replay(store, batch_id, now=T + 40 * DAY, restamp=True).timestamp == T + 40 * DAY


def test_only_quarantined_batches_can_be_replayed():
    store, _, batch_id = quarantined_store()
    replay(store, batch_id, now=T)
    with pytest.raises(ReplayRefused):
        replay(store, batch_id, now=T)
    with pytest.raises(NotFound):
        replay(store, "umb_missing", now=T)
