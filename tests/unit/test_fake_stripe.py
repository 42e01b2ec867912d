"""The loopback Stripe fake, driven through the real stripe SDK (StripeClient + RequestsClient)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from devtools.fake_stripe import FakeStripe, MeterEvent

NOW = 1_764_144_000  # 2025-11-26T08:00:00Z; the fake's clock is pinned to it
DAY = 24 * 3600
REPO_ROOT = Path(__file__).resolve().parents[2]

MakeClient = Callable[..., stripe.StripeClient]


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(now=lambda: NOW) as server:
        yield server


@pytest.fixture
def make_client(fake: FakeStripe, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeClient]:
    # The SDK sleeps 0.5 s+ between its own retries; shrink that so retry tests stay fast.
    monkeypatch.setattr(stripe.HTTPClient, "INITIAL_DELAY", 0.01)
    monkeypatch.setattr(stripe.HTTPClient, "MAX_DELAY", 0.02)
    http_clients: list[stripe.RequestsClient] = []

    def build(
        api_key: str = "sk_test_fake", *, retries: int = 0, timeout: float = 5
    ) -> stripe.StripeClient:
        http_client = stripe.RequestsClient(timeout=timeout)
        http_clients.append(http_client)
        return stripe.StripeClient(
            api_key,
            base_addresses={"api": fake.url, "meter_events": fake.url},
            max_network_retries=retries,
            http_client=http_client,
        )

    yield build
    for http_client in http_clients:
        http_client.close()


@pytest.fixture
def client(make_client: MakeClient) -> stripe.StripeClient:
    return make_client()


def send(
    client: stripe.StripeClient,
    *,
    identifier: str | None = "umb_abc",
    customer: str = "cus_A1",
    event_name: str = "ai_messages",
    value: str = "12",
    timestamp: int | None = NOW,
    idempotency_key: str | None = None,
) -> Any:
    params: dict[str, Any] = {
        "event_name": event_name,
        "payload": {"stripe_customer_id": customer, "value": value},
    }
    if identifier is not None:
        params["identifier"] = identifier
    if timestamp is not None:
        params["timestamp"] = timestamp
    options: dict[str, Any] = {}
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    return client.v1.billing.meter_events.create(params=params, options=options)  # type: ignore[arg-type]


def send_in_threads(fake: FakeStripe, kwargs_per_thread: list[dict[str, Any]]) -> list[Any]:
    """Send one event per thread, all released at once; returns each result or exception."""
    barrier = threading.Barrier(len(kwargs_per_thread))
    results: list[Any] = [None] * len(kwargs_per_thread)

    def worker(index: int, kwargs: dict[str, Any]) -> None:
        # The SDK keeps one requests.Session per thread: give each thread its own and close it.
        http_client = stripe.RequestsClient(timeout=5)
        own_client = stripe.StripeClient(
            "sk_test_fake",
            base_addresses={"api": fake.url, "meter_events": fake.url},
            max_network_retries=0,
            http_client=http_client,
        )
        barrier.wait()
        try:
            results[index] = send(own_client, **kwargs)
        except stripe.StripeError as error:
            results[index] = error
        finally:
            http_client.close()

    threads = [
        threading.Thread(target=worker, args=(index, kwargs))
        for index, kwargs in enumerate(kwargs_per_thread)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return results


def error_body(error: stripe.StripeError) -> dict[str, Any]:
    """The `error` object of the JSON body the SDK received."""
    assert isinstance(error.json_body, dict)
    body: dict[str, Any] = error.json_body["error"]
    return body


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# -- accepting events ----------------------------------------------------------------------


def test_accepted_event_is_recorded_with_parsed_fields(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a running fake
    # When the SDK creates a meter event
    event = send(client, identifier="umb_abc", value="12", idempotency_key="umb_abc")

    # Then the SDK gets Stripe's meter-event object back
    assert event.object == "billing.meter_event"
    assert event.identifier == "umb_abc"
    assert event.payload.to_dict() == {"stripe_customer_id": "cus_A1", "value": "12"}
    assert event.timestamp == NOW
    assert event.livemode is False
    assert event.last_response.headers["Request-Id"].startswith("req_")
    # And the fake recorded it with the value parsed to an int
    assert fake.accepted() == [
        MeterEvent(
            identifier="umb_abc",
            event_name="ai_messages",
            customer="cus_A1",
            value=12,
            timestamp=NOW,
            created=NOW,
        )
    ]


def test_totals_sum_values_per_customer_and_event_name(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given events for two customers and two meters
    send(client, identifier="e1", customer="cus_A1", value="12")
    send(client, identifier="e2", customer="cus_A1", value="-2")
    send(client, identifier="e3", customer="cus_B2", value="5")
    send(client, identifier="e4", customer="cus_A1", event_name="api_calls", value="7")

    # When totals are read
    totals = fake.totals()

    # Then each (customer, event_name) pair sums its values
    assert totals == {
        ("cus_A1", "ai_messages"): 10,
        ("cus_B2", "ai_messages"): 5,
        ("cus_A1", "api_calls"): 7,
    }


def test_missing_identifier_gets_a_generated_one(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a request without an identifier
    # When it is sent
    event = send(client, identifier=None)

    # Then Stripe-like, the fake generates one and records the event under it
    assert event.identifier
    assert [e.identifier for e in fake.accepted()] == [event.identifier]


def test_missing_timestamp_defaults_to_now(fake: FakeStripe, client: stripe.StripeClient) -> None:
    # Given a request without a timestamp
    # When it is sent
    send(client, timestamp=None)

    # Then the event is stamped with the fake's clock
    assert fake.accepted()[0].timestamp == NOW


def test_calls_counts_every_meter_event_request(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given one accepted event and one duplicate
    send(client, identifier="umb_abc")
    with pytest.raises(stripe.InvalidRequestError):
        send(client, identifier="umb_abc")

    # Then both requests were counted, but only one event kept
    assert fake.calls == 2
    assert len(fake.accepted()) == 1


# -- identifier dedupe and idempotency ------------------------------------------------------


def test_repeat_identifier_is_rejected_as_duplicate_with_should_retry_false(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an accepted event
    send(client, identifier="umb_abc")

    # When another call (new Idempotency-Key) reuses the identifier
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(client, identifier="umb_abc", value="99")

    # Then Stripe's duplicate answer comes back and nothing more is counted
    error = caught.value
    assert error.http_status == 400
    assert str(error.user_message).startswith("An event already exists with identifier")
    assert error.json_body == {
        "error": {
            "type": "invalid_request_error",
            "message": "An event already exists with identifier umb_abc.",
            "param": "identifier",
        }
    }
    assert error.headers is not None
    assert error.headers["Stripe-Should-Retry"] == "false"
    assert fake.totals() == {("cus_A1", "ai_messages"): 12}


def test_same_idempotency_key_and_params_replays_original_response(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an event created with an Idempotency-Key
    first = send(client, identifier="umb_abc", idempotency_key="key-1")

    # When the identical request is sent again with the same key
    second = send(client, identifier="umb_abc", idempotency_key="key-1")

    # Then the original response is replayed, not a duplicate error, and one event exists
    assert second.to_dict() == first.to_dict()
    assert second.last_response.headers["Idempotent-Replayed"] == "true"
    assert second.last_response.headers["Original-Request"] == first.last_response.request_id
    assert len(fake.accepted()) == 1


def test_same_idempotency_key_with_different_params_raises_idempotency_error(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an event created with an Idempotency-Key
    send(client, identifier="umb_abc", value="12", idempotency_key="key-1")

    # When the key is reused for different parameters
    with pytest.raises(stripe.IdempotencyError) as caught:
        send(client, identifier="umb_abc", value="13", idempotency_key="key-1")

    # Then Stripe's idempotency_error is raised and nothing changes
    assert caught.value.http_status == 400
    assert str(caught.value.user_message).startswith(
        "Keys for idempotent requests can only be used with the same parameters"
    )
    assert fake.totals() == {("cus_A1", "ai_messages"): 12}


def test_idempotency_key_in_flight_answers_409(fake: FakeStripe, make_client: MakeClient) -> None:
    # Given a slow request holding Idempotency-Key key-1
    fake.inject("delay", seconds=0.5)
    slow = threading.Thread(target=send_in_threads, args=(fake, [{"idempotency_key": "key-1"}]))
    slow.start()
    assert wait_for(lambda: fake.calls == 1)

    # When a second request with the same key arrives meanwhile
    with pytest.raises(stripe.APIError) as caught:
        send(make_client(), idempotency_key="key-1")
    slow.join()

    # Then it gets Stripe's 409 idempotency conflict and only the slow one is recorded
    assert caught.value.http_status == 409
    assert error_body(caught.value)["type"] == "idempotency_error"
    assert len(fake.accepted()) == 1


# -- injected faults -----------------------------------------------------------------------


def test_server_error_fault_raises_api_error_without_recording(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an injected server error
    fake.inject("server_error")

    # When an event is sent
    with pytest.raises(stripe.APIError) as caught:
        send(client)

    # Then the SDK sees a 500 api_error and no event was recorded
    assert caught.value.http_status == 500
    assert fake.accepted() == []


def test_server_error_response_is_not_stored_for_idempotency(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a request that failed with a 500
    fake.inject("server_error")
    with pytest.raises(stripe.APIError):
        send(client, idempotency_key="key-1")

    # When it is retried by hand with the same key
    event = send(client, idempotency_key="key-1")

    # Then it executes for real rather than replaying the 500
    assert "Idempotent-Replayed" not in event.last_response.headers
    assert len(fake.accepted()) == 1


def test_rate_limit_fault_raises_rate_limit_error_with_retry_after(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an injected 429 with a Retry-After hint
    fake.inject("rate_limit", retry_after=2)

    # When an event is sent
    with pytest.raises(stripe.RateLimitError) as caught:
        send(client)

    # Then the SDK raises RateLimitError carrying Stripe's rate_limit code and the header
    assert caught.value.http_status == 429
    assert error_body(caught.value)["code"] == "rate_limit"
    assert caught.value.headers is not None
    assert caught.value.headers["Retry-After"] == "2"
    assert fake.accepted() == []


def test_delay_fault_makes_the_client_time_out_but_the_event_is_still_processed(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    # Given a delay longer than the client's timeout
    fake.inject("delay", seconds=0.4)
    impatient = make_client(timeout=0.1)

    # When an event is sent
    with pytest.raises(stripe.APIConnectionError):
        send(impatient)

    # Then the fake still processes it after the delay, like Stripe would
    assert wait_for(lambda: len(fake.accepted()) == 1)


def test_lost_response_raises_connection_error_but_event_is_recorded(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a response that will be lost on the way back
    fake.inject("lost_response")

    # When an event is sent
    with pytest.raises(stripe.APIConnectionError):
        send(client, identifier="umb_abc")

    # Then the client saw a network failure, yet Stripe accepted the event
    assert [event.identifier for event in fake.accepted()] == ["umb_abc"]


def test_resend_after_lost_response_gets_the_duplicate_answer(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an event whose response was lost
    fake.inject("lost_response")
    with pytest.raises(stripe.APIConnectionError):
        send(client, identifier="umb_abc")

    # When a new call resends the same identifier
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(client, identifier="umb_abc")

    # Then it is told the event already exists, and it counts once
    assert str(caught.value.user_message).startswith("An event already exists with identifier")
    assert fake.totals() == {("cus_A1", "ai_messages"): 12}


def test_reject_fault_raises_permanent_invalid_request_error(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an injected permanent rejection
    fake.inject("reject", message="Meter is archived", code="archived_meter")

    # When an event is sent
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(client)

    # Then the SDK raises a 400 with that message and code, and nothing is recorded
    assert caught.value.http_status == 400
    assert caught.value.code == "archived_meter"
    assert caught.value.user_message == "Meter is archived"
    assert fake.accepted() == []


def test_rejected_customer_gets_a_400_for_every_event(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a customer Stripe does not know
    fake.reject_customer("cus_GONE", message="No such customer: 'cus_GONE'")

    # When two events are sent for it and one for another customer
    for identifier in ("g1", "g2"):
        with pytest.raises(stripe.InvalidRequestError) as caught:
            send(client, identifier=identifier, customer="cus_GONE")
        assert caught.value.http_status == 400
        assert caught.value.param == "payload[stripe_customer_id]"
    send(client, identifier="ok", customer="cus_A1")

    # Then only the other customer's event is recorded
    assert [event.identifier for event in fake.accepted()] == ["ok"]


def test_faults_apply_in_fifo_order_then_requests_succeed(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given two queued faults
    fake.inject("server_error")
    fake.inject("rate_limit", count=2)

    # When four events are sent
    # Then the faults hit the first three requests in order and the fourth succeeds
    with pytest.raises(stripe.APIError):
        send(client, identifier="e1")
    for identifier in ("e2", "e3"):
        with pytest.raises(stripe.RateLimitError):
            send(client, identifier=identifier)
    send(client, identifier="e4")
    assert [event.identifier for event in fake.accepted()] == ["e4"]


def test_fault_targeted_at_a_customer_skips_other_customers(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given a server error aimed at cus_B2 only
    fake.inject("server_error", customer="cus_B2")

    # When cus_A1 then cus_B2 send events
    send(client, identifier="a", customer="cus_A1")
    with pytest.raises(stripe.APIError):
        send(client, identifier="b", customer="cus_B2")

    # Then only cus_B2's request failed
    assert [event.identifier for event in fake.accepted()] == ["a"]


def test_inject_refuses_unknown_faults_and_options(fake: FakeStripe) -> None:
    # Given / When / Then typos fail loudly instead of silently injecting nothing
    with pytest.raises(ValueError, match="unknown fault"):
        fake.inject("timeout")
    with pytest.raises(ValueError, match="does not take"):
        fake.inject("rate_limit", retry_afer=1)
    with pytest.raises(ValueError, match="seconds"):
        fake.inject("delay")


# -- how the SDK's own retries meet the fake -----------------------------------------------


def test_sdk_retries_a_server_error_and_records_the_event_once(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    # Given a client that retries and one injected 500
    fake.inject("server_error")

    # When an event is sent
    send(make_client(retries=2))

    # Then the SDK retried by itself and the event exists once
    assert fake.calls == 2
    assert len(fake.accepted()) == 1


def test_sdk_retry_after_lost_response_replays_with_the_same_idempotency_key(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    # Given a client that retries and a response lost after Stripe accepted the event
    fake.inject("lost_response")

    # When an event is sent
    event = send(make_client(retries=2))

    # Then the retry reused the SDK's Idempotency-Key, so Stripe replayed the success
    assert event.last_response.headers["Idempotent-Replayed"] == "true"
    assert fake.calls == 2
    assert len(fake.accepted()) == 1


def test_sdk_does_not_retry_rate_limits(fake: FakeStripe, make_client: MakeClient) -> None:
    # Given a client that retries and one injected 429
    fake.inject("rate_limit")

    # When an event is sent
    with pytest.raises(stripe.RateLimitError):
        send(make_client(retries=2))

    # Then the SDK gave up after the single 429: backing off is the caller's job
    assert fake.calls == 1


# -- one concurrent call per (customer, meter) ----------------------------------------------


def test_overlapping_calls_for_one_pair_get_rate_limited() -> None:
    # Given a fake that holds each request in flight for a while
    with FakeStripe(now=lambda: NOW, sleep_while_serving=0.3) as fake:
        # When two events for the same customer and meter are sent at the same moment
        results = send_in_threads(fake, [{"identifier": "e1"}, {"identifier": "e2"}])

        # Then one is accepted and the other gets a RateLimitError
        errors = [result for result in results if isinstance(result, Exception)]
        assert len(errors) == 1
        assert isinstance(errors[0], stripe.RateLimitError)
        assert errors[0].http_status == 429
        assert len(fake.accepted()) == 1
        assert fake.max_concurrent_per_pair >= 2


def test_parallel_calls_for_different_pairs_both_succeed() -> None:
    # Given a fake that holds each request in flight for a while
    with FakeStripe(now=lambda: NOW, sleep_while_serving=0.3) as fake:
        # When two events for different customers are sent at the same moment
        results = send_in_threads(
            fake,
            [
                {"identifier": "e1", "customer": "cus_A1"},
                {"identifier": "e2", "customer": "cus_B2"},
            ],
        )

        # Then both are accepted and no pair ever overlapped
        assert not [result for result in results if isinstance(result, Exception)]
        assert len(fake.accepted()) == 2
        assert fake.max_concurrent_per_pair == 1


# -- validation and authentication ---------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "param", "code"),
    [
        ({"value": "1.5"}, "payload[value]", "meter_event_invalid_value"),
        ({"value": "1234567890123456"}, "payload[value]", "meter_event_invalid_value"),
        ({"value": "abc"}, "payload[value]", "meter_event_invalid_value"),
        ({"timestamp": NOW - 36 * DAY}, "timestamp", "timestamp_too_far_in_past"),
        ({"timestamp": NOW + 600}, "timestamp", "timestamp_in_future"),
        ({"identifier": "x" * 101}, "identifier", "parameter_invalid_string_length"),
        ({"event_name": ""}, "event_name", "parameter_missing"),
        ({"customer": ""}, "payload[stripe_customer_id]", "parameter_missing"),
    ],
    ids=[
        "decimal-value",
        "16-digit-value",
        "non-numeric-value",
        "timestamp-36-days-old",
        "timestamp-10-minutes-ahead",
        "identifier-101-chars",
        "missing-event-name",
        "missing-customer",
    ],
)
def test_invalid_event_is_rejected_with_the_offending_param(
    fake: FakeStripe,
    client: stripe.StripeClient,
    overrides: dict[str, Any],
    param: str,
    code: str,
) -> None:
    # Given a request with one invalid field
    # When it is sent
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(client, **overrides)

    # Then the SDK raises a 400 naming the field, and nothing is recorded
    assert caught.value.http_status == 400
    assert caught.value.param == param
    assert caught.value.code == code
    assert fake.accepted() == []


@pytest.mark.parametrize(
    ("overrides", "expected_value"),
    [
        ({"value": "123456789012345"}, 123456789012345),
        ({"value": "-3"}, -3),
        ({"timestamp": NOW - 35 * DAY + 60}, 12),
        ({"timestamp": NOW + 299}, 12),
    ],
    ids=["15-digit-value", "negative-value", "timestamp-35-days-old", "timestamp-5-minutes-ahead"],
)
def test_values_and_timestamps_at_the_limits_are_accepted(
    fake: FakeStripe,
    client: stripe.StripeClient,
    overrides: dict[str, Any],
    expected_value: int,
) -> None:
    # Given a request right at a validation limit
    # When it is sent
    send(client, **overrides)

    # Then it is accepted
    assert [event.value for event in fake.accepted()] == [expected_value]


@pytest.mark.parametrize("api_key", ["sk_fake", "pk_test_123", "sk_test_"])
def test_bad_api_key_raises_authentication_error(
    fake: FakeStripe, make_client: MakeClient, api_key: str
) -> None:
    # Given a client with a key that is not a secret key
    # When it sends an event
    with pytest.raises(stripe.AuthenticationError) as caught:
        send(make_client(api_key))

    # Then Stripe's 401 comes back and nothing is recorded
    assert caught.value.http_status == 401
    assert str(caught.value.user_message).startswith("Invalid API Key provided")
    assert fake.accepted() == []


def test_live_key_is_accepted_and_marks_livemode(fake: FakeStripe, make_client: MakeClient) -> None:
    # Given a live-mode key
    # When it sends an event
    event = send(make_client("sk_live_fake"))

    # Then the event is accepted with livemode true
    assert event.livemode is True


# -- admin endpoints, lifecycle, CLI -------------------------------------------------------


def test_admin_endpoint_lists_events_and_totals(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given two accepted events
    send(client, identifier="e1", value="12")
    send(client, identifier="e2", value="3")

    # When a human asks the admin endpoint
    listing = requests.get(f"{fake.url}/_fake/meter_events", timeout=5).json()

    # Then it lists the events and their totals
    assert [event["identifier"] for event in listing["data"]] == ["e1", "e2"]
    assert listing["data"][0] == {
        "identifier": "e1",
        "event_name": "ai_messages",
        "customer": "cus_A1",
        "value": 12,
        "timestamp": NOW,
        "created": NOW,
    }
    assert listing["totals"] == [{"customer": "cus_A1", "event_name": "ai_messages", "value": 15}]


def test_admin_reset_forgets_events_faults_and_counters(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given an event, a pending fault and a counted call
    send(client, identifier="umb_abc", idempotency_key="key-1")
    fake.inject("server_error")

    # When the admin reset endpoint is called
    response = requests.post(f"{fake.url}/_fake/reset", timeout=5)

    # Then everything is forgotten: the same identifier and key are fresh again
    assert response.status_code == 200
    assert fake.accepted() == [] and fake.calls == 0
    event = send(client, identifier="umb_abc", idempotency_key="key-1")
    assert "Idempotent-Replayed" not in event.last_response.headers
    assert len(fake.accepted()) == 1


def test_unknown_path_answers_a_stripe_style_404(fake: FakeStripe) -> None:
    # Given a running fake
    # When an endpoint it does not serve is called
    response = requests.get(f"{fake.url}/v1/customers", timeout=5)

    # Then it answers like Stripe does for unrecognized URLs
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"].startswith("Unrecognized request URL")


def test_stop_frees_the_port_and_start_stop_are_safe_to_repeat() -> None:
    # Given a started fake
    fake = FakeStripe().start()
    url = fake.url

    # When it is stopped (twice)
    fake.stop()
    fake.stop()

    # Then nothing listens any more
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/_fake/meter_events", timeout=1)


def test_non_loopback_host_is_refused() -> None:
    # Given / When / Then the fake never listens beyond this machine
    with pytest.raises(ValueError, match="loopback"):
        FakeStripe(host="0.0.0.0")


def test_cli_serves_in_the_foreground_and_prints_one_line_per_event() -> None:
    # Given the fake running as `python -m devtools.fake_stripe`
    process = subprocess.Popen(
        [sys.executable, "-m", "devtools.fake_stripe", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A runner in a backgrounded shell ignores SIGINT, and children inherit that: give the
        # fake the default, so Ctrl-C reaches it as it does from a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        startup = process.stdout.readline()
        url = startup.split(" on ")[1].split()[0]

        # When the SDK sends an event to it
        http_client = stripe.RequestsClient(timeout=5)
        cli_client = stripe.StripeClient(
            "sk_test_fake",
            base_addresses={"api": url, "meter_events": url},
            max_network_retries=0,
            http_client=http_client,
        )
        send(cli_client, timestamp=None)
        http_client.close()
        event_line = process.stdout.readline()

        # Then it printed the URL and the event, and Ctrl-C stops it cleanly
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=5)
        assert startup.startswith("fake Stripe listening on http://127.0.0.1:")
        assert "ai_messages" in event_line and "umb_abc" in event_line
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# -- restricted keys ---------------------------------------------------------------------------

RESTRICTED = "rk_test_51FakeRestricted0123456789"


def test_a_restricted_key_is_refused_what_its_permissions_do_not_cover(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    # Given a restricted key that may read meters and write subscriptions
    fake.restrict_api_key(RESTRICTED, {"billing_meter_read", "subscription_write"})
    client = make_client(RESTRICTED, retries=2)
    # When it sends a meter event / Then Stripe's 403, once (the SDK retries no 403), and no
    # event
    with pytest.raises(stripe.PermissionError) as refused:
        send(client)
    assert refused.value.http_status == 403
    assert "'rak_billing_meter_event_write' permission" in error_body(refused.value)["message"]
    assert fake.calls == 1
    assert fake.accepted() == []
    # And what it holds is let through: meters read, subscriptions read (write implies read)
    assert client.v1.billing.meters.list().data == []
    with pytest.raises(stripe.InvalidRequestError, match="No such subscription"):
        client.v1.subscriptions.retrieve("sub_missing")
    # but not another resource
    with pytest.raises(stripe.PermissionError, match="'rak_customer_write'"):
        client.v1.customers.create({"email": "a@example.com"})


def test_a_restricted_key_with_the_permission_sends_meter_events(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    fake.restrict_api_key(RESTRICTED, {"billing_meter_event_write"})
    send(make_client(RESTRICTED))
    assert [e.identifier for e in fake.accepted()] == ["umb_abc"]


def test_a_secret_key_is_never_restricted_and_reset_forgets_restrictions(
    fake: FakeStripe, make_client: MakeClient
) -> None:
    with pytest.raises(ValueError, match="rk_"):
        fake.restrict_api_key("sk_test_fake", {"billing_meter_read"})
    fake.restrict_api_key(RESTRICTED, set())
    fake.reset()
    send(make_client(RESTRICTED))
    assert len(fake.accepted()) == 1
