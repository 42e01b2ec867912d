import pytest
import stripe

from devtools.fake_stripe import FakeStripe
from tests.faults.world import StripeClock, World


@pytest.fixture(autouse=True)
def fast_sdk_retries(monkeypatch):
    # The SDK's own backoff (0.5 s doubling) would dominate; the behaviour is the same faster.
    monkeypatch.setattr(stripe._http_client.HTTPClient, "INITIAL_DELAY", 0.01)
    monkeypatch.setattr(stripe._http_client.HTTPClient, "MAX_DELAY", 0.02)


@pytest.fixture(scope="session")
def stripe_clock() -> StripeClock:
    return StripeClock()


@pytest.fixture(scope="session")
def fake_stripe(stripe_clock):
    # Stripe's clock follows each test's world clock (plus any skew the test sets).
    with FakeStripe(now=stripe_clock) as server:
        yield server


@pytest.fixture
def world(local_table, fake_stripe, stripe_clock) -> World:
    fake_stripe.reset()
    return World(local_table.name, local_table.endpoint_url, fake_stripe, stripe_clock)
