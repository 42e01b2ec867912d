"""Reconciliation on DynamoDB Local against the Stripe stand-in through the real SDK: periods
that ended agree with Stripe's meter event summaries to the unit, per (customer, meter, Stripe
period), and an injected difference is reported as a mismatch with a non-zero exit."""

import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from devtools.fake_stripe import FakeStripe
from usage_meter import admin
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.billing.stripe_summaries import StripeSummaries
from usage_meter.logic.flush import Flusher, FlushPolicy
from usage_meter.logic.reconcile import reconcile
from usage_meter.logic.record import LateUsage, record_events
from usage_meter.logic.subscriptions import sync
from usage_meter.models.domain import ItemPeriods, SubscriptionRead
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore

GRACE = 72 * 3600


@dataclass(frozen=True)
class Times:
    now: int

    @property
    def renewal(self) -> int:  # the last period ended an hour ago, at an arbitrary second
        return self.now - 3600 - 47

    @property
    def previous(self) -> int:
        return self.renewal - 30 * 86_400


@pytest.fixture
def times() -> Times:
    # Read when the test runs, not when the module is imported, minutes earlier.
    return Times(int(time.time()))


@pytest.fixture
def fake():
    with FakeStripe() as running:
        running.add_meter("ai_messages")
        running.add_meter("api_calls")
        running.add_customer("cus_Recon1")
        running.add_customer("cus_Recon2")
        yield running


@pytest.fixture
def store(local_table):
    return DynamoStore(local_table.name, client=local_table.client, rng=random.Random(5))


def billed(store: DynamoStore, fake: FakeStripe, times: Times) -> None:
    """Two customers: one on a subscription that renewed an hour ago, one on calendar months;
    usage on both sides of the renewal, flushed to the stand-in."""
    now, renewal = times.now, times.renewal
    item = ItemPeriods(
        item="si_R",
        meter="",
        anchor=times.previous,
        interval="month",
        periods=((renewal, now + 86_400),),
    )
    read = SubscriptionRead(
        id="sub_R",
        customer="cus_Recon1",
        status="active",
        read_at=time.time(),
        start_date=times.previous - 86_400,
        items=(item,),
    )
    sync(read, store, now)
    events = [
        ("cus_Recon1", "ai_messages", renewal - 600, 5),
        ("cus_Recon1", "ai_messages", renewal - 7, 11),  # in the renewal's partial minute
        ("cus_Recon1", "api_calls", renewal - 100, 3),
        ("cus_Recon1", "ai_messages", renewal + 30, 17),  # the current period: not checked
        ("cus_Recon2", "ai_messages", now - 60, 2),
    ]
    requests = [
        EventIn(stripe_customer_id=c, meter=m, quantity=q, timestamp=t) for c, m, t, q in events
    ]
    record_events(
        requests,
        meters={"ai_messages", "api_calls"},
        store=store,
        now=datetime.fromtimestamp(now, UTC),
        batch=True,
        late=LateUsage(grace_seconds=GRACE),
    )
    billing = StripeMeterBilling("sk_test_recon", api_base=fake.url, max_requests_per_second=1000)
    policy = FlushPolicy(invoice_grace_seconds=GRACE)
    summary = Flusher(store, billing, time_left=lambda: 900, policy=policy).run()
    assert summary.errors == [] and summary.sent == 4


def test_periods_that_ended_agree_with_stripes_summaries(store, fake, times):
    billed(store, fake, times)
    checks = list(
        reconcile(
            store,
            StripeSummaries("sk_test_recon", api_base=fake.url),
            since=times.now - 40 * 86_400,
            until=times.now - 600,
        )
    )
    # The subscription's ended period, per meter; the current one and the calendar month
    # (still open) are not checked yet
    assert [(c.customer, c.meter, c.service, c.stripe, c.status) for c in checks] == [
        ("cus_Recon1", "ai_messages", 16, 16, "ok"),
        ("cus_Recon1", "api_calls", 3, 3, "ok"),
    ]
    assert checks[0].period_end == datetime.fromtimestamp(times.renewal, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def test_a_difference_is_one_json_line_and_a_failing_exit(store, fake, times, monkeypatch, capsys):
    billed(store, fake, times)
    # Stripe holds 4 units more in the ended period than the service confirmed
    fake.inject_summary_offset("cus_Recon1", "ai_messages", 4, timestamp=times.renewal - 120)
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_recon")
    monkeypatch.setenv("STRIPE_API_BASE", fake.url)
    since = datetime.fromtimestamp(times.now - 40 * 86_400, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    code = admin.main(["--table", store._table, "reconcile", "--since", since])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert lines[0] | {"period_start": None, "period_end": None} == {
        "customer": "cus_Recon1",
        "meter": "ai_messages",
        "period_start": None,
        "period_end": None,
        "service": 16,
        "stripe": 20,
        "status": "mismatch",
    }
    assert lines[-1]["periods"] == 2 and lines[-1]["mismatches"] == 1
    # Without the difference, the command agrees and exits 0
    fake.inject_summary_offset("cus_Recon1", "ai_messages", -4, timestamp=times.renewal - 120)
    assert admin.main(["--table", store._table, "reconcile", "--since", since]) == 0
