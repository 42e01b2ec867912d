"""StripeMeterBilling through the real stripe SDK against the loopback fake Stripe."""

import time

import pytest
import stripe as stripe_sdk

from devtools.fake_stripe import FakeStripe
from usage_meter.billing import (
    BillingAuthError,
    PermanentBillingError,
    RateLimited,
    SendOutcome,
    TransientBillingError,
)
from usage_meter.billing.stripe_meter import StripeMeterBilling
from usage_meter.models.domain import MeterEventRequest

REQUEST = MeterEventRequest(
    identifier="umb_test1",
    event_name="ai_messages",
    customer="cus_A1",
    value=12,
    timestamp=int(time.time()) - 60,
)


@pytest.fixture
def fake():
    with FakeStripe() as server:
        yield server


@pytest.fixture(autouse=True)
def fast_sdk_retries(monkeypatch):
    monkeypatch.setattr(stripe_sdk._http_client.HTTPClient, "INITIAL_DELAY", 0.01)
    monkeypatch.setattr(stripe_sdk._http_client.HTTPClient, "MAX_DELAY", 0.02)


def billing(fake, key="sk_test_adapter", retries=2, timeout=5.0) -> StripeMeterBilling:
    return StripeMeterBilling(
        key,
        api_base=fake.url,
        timeout_seconds=timeout,
        max_network_retries=retries,
        max_requests_per_second=1000,
    )


def test_an_event_is_delivered_form_encoded_with_its_own_timestamp(fake):
    assert billing(fake).send(REQUEST) == SendOutcome.DELIVERED
    [event] = fake.accepted()
    assert (event.identifier, event.customer, event.event_name, event.value, event.timestamp) == (
        "umb_test1",
        "cus_A1",
        "ai_messages",
        12,
        REQUEST.timestamp,
    )


def test_a_resend_after_a_crash_is_not_billed_twice(fake):
    # Given an event delivered, then the run crashed before it confirmed it
    assert billing(fake).send(REQUEST) == SendOutcome.DELIVERED
    # When the next run sends the same decision (a new call: a new idempotency key)
    # Then Stripe's duplicate-identifier answer says it has it, and holds it once
    assert billing(fake).send(REQUEST) == SendOutcome.ALREADY_DELIVERED
    assert fake.totals() == {("cus_A1", "ai_messages"): 12}


def test_stripes_duplicate_identifier_answer_counts_as_delivered(fake):
    # Given the identifier reached Stripe under another idempotency key (e.g. > 24 h of keys)
    client = stripe_sdk.StripeClient(
        "sk_test_x", base_addresses={"api": fake.url, "meter_events": fake.url}
    )
    client.v1.billing.meter_events.create(
        params={
            "event_name": "ai_messages",
            "identifier": "umb_test1",
            "payload": {"stripe_customer_id": "cus_A1", "value": "12"},
            "timestamp": REQUEST.timestamp,
        }
    )
    # When the flush sends it / Then it is treated as delivered, and Stripe holds it once
    assert billing(fake).send(REQUEST) == SendOutcome.ALREADY_DELIVERED
    assert fake.totals() == {("cus_A1", "ai_messages"): 12}


def test_a_lost_response_is_retried_by_the_sdk_and_billed_once(fake):
    # Given Stripe takes the event but its answer is lost
    fake.inject("lost_response")
    # When the SDK retries under the same idempotency key / Then Stripe replays its saved 200
    assert billing(fake).send(REQUEST) == SendOutcome.DELIVERED
    assert fake.calls == 2 and fake.totals() == {("cus_A1", "ai_messages"): 12}


def test_a_rate_limit_surfaces_with_retry_after(fake):
    fake.inject("rate_limit", retry_after=2)
    with pytest.raises(RateLimited) as raised:
        billing(fake).send(REQUEST)
    assert raised.value.retry_after == 2.0 and fake.accepted() == []


def test_server_errors_past_the_sdk_retries_are_transient(fake):
    fake.inject("server_error", count=3)
    with pytest.raises(TransientBillingError):
        billing(fake).send(REQUEST)
    assert fake.calls == 3 and fake.accepted() == []


def test_a_timeout_is_transient(fake):
    fake.inject("delay", count=2, seconds=1.0)
    with pytest.raises(TransientBillingError):
        billing(fake, retries=0, timeout=0.2).send(REQUEST)


def test_a_permanent_rejection_carries_stripes_reason(fake):
    fake.reject_customer("cus_A1", "No such customer: 'cus_A1'")
    with pytest.raises(PermanentBillingError) as raised:
        billing(fake).send(REQUEST)
    assert "No such customer" in str(raised.value)


def test_a_timestamp_stripe_finds_too_old_is_permanent(fake):
    old = REQUEST.model_copy(update={"timestamp": int(time.time()) - 36 * 86400})
    with pytest.raises(PermanentBillingError):
        billing(fake).send(old)


def test_a_bad_key_is_an_auth_error_not_a_batch_problem(fake):
    with pytest.raises(BillingAuthError):
        billing(fake, key="not-a-key").send(REQUEST)
