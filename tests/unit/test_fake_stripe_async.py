"""The fake's asynchronous side through the real SDK: meter events that answer 200 and fail
later, the error reports as thin event notifications to event destinations, the v2 events
behind them, and meter event summaries."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe
from stripe.events import (
    V1BillingMeterErrorReportTriggeredEventNotification,
    V1BillingMeterNoMeterFoundEventNotification,
)

from devtools.fake_stripe import (
    ERROR_REPORT_EVENT,
    NO_METER_EVENT,
    FakeStripe,
    RejectedMeterEvent,
)
from tests.receiver import Receiver as LoopbackReceiver

REPO_ROOT = Path(__file__).resolve().parents[2]
HOUR = 3600
# The fake's clock: 2026-03-10T12:00:00Z, on an hour (and so a minute) boundary.
T0 = int(datetime.datetime(2026, 3, 10, 12, tzinfo=datetime.UTC).timestamp())
KNOWN = "cus_Known0001"
UNKNOWN = "cus_Unknown001"


class Clock:
    """Stripe's wall clock for the fake, moved by hand."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Receiver(LoopbackReceiver):
    """A loopback event destination."""

    def __init__(self) -> None:
        super().__init__("/stripe/event-notifications")

    def notifications(self, client: stripe.StripeClient, secret: str) -> list[Any]:
        """Every request received, verified and parsed as an event-destination handler would."""
        return [
            client.parse_event_notification(body, headers["Stripe-Signature"], secret)
            for body, headers in self.received()
        ]


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeStripe]:
    # Reports wait a minute, so a test batches its failures and flushes them itself.
    with FakeStripe(
        clock=clock,
        async_validation=True,
        error_report_delay=60,
        webhook_retry_seconds=0.02,
        webhook_max_attempts=3,
    ) as server:
        yield server


def make_client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_fake",
        base_addresses={"api": fake.url, "meter_events": fake.url},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=5),
    )


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return make_client(fake)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def send(
    client: stripe.StripeClient,
    identifier: str,
    customer: str,
    value: int = 1,
    *,
    event_name: str = "ai_messages",
    timestamp: int = T0 - 60,
) -> Any:
    return client.v1.billing.meter_events.create(
        params={
            "event_name": event_name,
            "identifier": identifier,
            "timestamp": timestamp,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
        }
    )


def summaries(
    client: stripe.StripeClient, meter_id: str, customer: str, start: int, end: int, **extra: Any
) -> Any:
    params: Any = {"customer": customer, "start_time": start, "end_time": end, **extra}
    return client.v1.billing.meters.event_summaries.list(meter_id, params=params)


def error_of(caught: pytest.ExceptionInfo[stripe.StripeError]) -> dict[str, Any]:
    assert isinstance(caught.value.json_body, dict)
    body: dict[str, Any] = caught.value.json_body["error"]
    return body


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def destination_params(url: str, **extra: Any) -> Any:
    return {
        "name": "usage-meter",
        "type": "webhook_endpoint",
        "event_payload": "thin",
        "enabled_events": [ERROR_REPORT_EVENT, NO_METER_EVENT],
        "webhook_endpoint": {"url": url},
        **extra,
    }


# -- asynchronous validation and thin notifications -----------------------------------------


def test_unknown_customer_is_accepted_then_reported_through_a_signed_thin_notification(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given a meter, a customer, and an event destination registered through the SDK
    meter = fake.add_meter("ai_messages")
    fake.add_customer(KNOWN)
    destination: Any = client.v2.core.event_destinations.create(
        params=destination_params(receiver.url, include=["webhook_endpoint.signing_secret"])
    )
    secret = destination.webhook_endpoint.signing_secret
    assert secret is not None and secret.startswith("whsec_")

    # When usage for a customer Stripe does not know is sent with usage for one it does
    answer = send(client, "usage-unknown-1", UNKNOWN, 5)
    send(client, "usage-known-1", KNOWN, 3)

    # Then both answer 200, but only the known customer's usage counts
    assert answer.identifier == "usage-unknown-1" and answer.payload["value"] == "5"
    assert fake.totals() == {(KNOWN, "ai_messages"): 3}
    assert [event.identifier for event in fake.accepted()] == ["usage-known-1"]
    assert fake.rejected_async() == [
        RejectedMeterEvent(
            identifier="usage-unknown-1",
            code="meter_event_customer_not_found",
            message=f"No customer found with ID {UNKNOWN}.",
            customer=UNKNOWN,
            event_name="ai_messages",
            value=5,
            timestamp=T0 - 60,
            created=T0,
        )
    ]
    assert fake.error_reports == []  # not yet: reports come error_report_delay later

    # When the error report is due
    [report] = fake.flush_error_reports()

    # Then the destination gets one thin notification, signed like a webhook
    assert receiver.wait_for(1)
    body, headers = receiver.requests[0]
    thin = json.loads(body)
    assert set(thin) == {"id", "object", "type", "livemode", "created", "related_object"}
    assert thin["related_object"] == {
        "id": meter["id"],
        "type": "billing.meter",
        "url": f"/v1/billing/meters/{meter['id']}",
    }
    [notification] = receiver.notifications(client, secret)
    assert isinstance(notification, V1BillingMeterErrorReportTriggeredEventNotification)
    assert notification.id == report["id"] and notification.type == ERROR_REPORT_EVENT
    assert notification.related_object.id == meter["id"]
    with pytest.raises(stripe.SignatureVerificationError):
        client.parse_event_notification(body, headers["Stripe-Signature"], "whsec_wrong")

    # And fetching the event names the failed identifier with Stripe's reason code
    event = notification.fetch_event()
    assert event.id == notification.id and event.object == "v2.core.event"
    assert event.reason is None and event.livemode is False
    datetime.datetime.fromisoformat(event.created)  # RFC 3339
    reason = event.data.reason
    assert reason.error_count == 1
    [error_type] = reason.error_types
    assert error_type.code == "meter_event_customer_not_found" and error_type.error_count == 1
    [sample] = error_type.sample_errors
    assert sample.request.identifier == "usage-unknown-1"
    assert UNKNOWN in sample.error_message
    assert event.data.developer_message_summary == "There is 1 invalid event"
    assert event.data.validation_start <= event.data.validation_end
    assert notification.fetch_related_object().id == meter["id"]
    # (the receiver sees the request before the fake records the attempt's answer)
    assert fake.wait_for_deliveries()
    [delivery] = fake.deliveries
    assert delivery["target"] == "event_destination" and delivery["status"] == 200
    assert delivery["endpoint_id"] == destination.id and delivery["type"] == ERROR_REPORT_EVENT

    # And once the customer exists, the identifier stays taken but a replay under a new one
    # counts exactly once
    fake.add_customer(UNKNOWN)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(client, "usage-unknown-1", UNKNOWN, 5)
    assert caught.value.param == "identifier"
    send(client, "usage-unknown-1-replay", UNKNOWN, 5)
    assert fake.totals()[(UNKNOWN, "ai_messages")] == 5
    window = summaries(client, meter["id"], UNKNOWN, T0 - HOUR, T0)
    assert [s.aggregated_value for s in window.data] == [5]


def test_samples_are_capped_while_the_counts_cover_every_failure(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given five events for an unknown customer in one reporting window
    meter = fake.add_meter("ai_messages")
    for index in range(5):
        send(client, f"usage-{index}", UNKNOWN, 1)

    # When the report goes out
    [report] = fake.flush_error_reports()

    # Then it counts all five but samples only max_error_samples (3) of them
    reason = report["data"]["reason"]
    assert reason["error_count"] == 5
    [error_type] = reason["error_types"]
    assert error_type["error_count"] == 5
    sampled = [sample["request"]["identifier"] for sample in error_type["sample_errors"]]
    assert sampled == ["usage-0", "usage-1", "usage-2"]
    # So the report alone cannot name usage-3 and usage-4; rejected_async() (or reconciling
    # against the summaries) can
    assert {event.identifier for event in fake.rejected_async()} == {
        f"usage-{index}" for index in range(5)
    }
    assert report["related_object"]["id"] == meter["id"]
    assert report["data"]["developer_message_summary"] == "There are 5 invalid events"
    assert fake.flush_error_reports() == []  # nothing pending any more


def test_max_error_samples_is_configurable(clock: Clock) -> None:
    with FakeStripe(
        clock=clock, async_validation=True, error_report_delay=60, max_error_samples=1
    ) as fake:
        client = make_client(fake)
        fake.add_meter("ai_messages")
        send(client, "a", UNKNOWN)
        send(client, "b", UNKNOWN)
        fake.flush_error_reports()
        [error_type] = fake.error_reports[0]["data"]["reason"]["error_types"]
        assert error_type["error_count"] == 2 and len(error_type["sample_errors"]) == 1


def test_archived_meter_no_meter_and_missing_payload_key_codes(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given a deactivated meter, a meter mapping customers by another key, and no meter at all
    # for a third event name
    fake.add_customer(KNOWN)
    archived = fake.add_meter("old_messages")
    client.v1.billing.meters.deactivate(archived["id"])
    other_key = fake.add_meter("tokens", customer_key="customer_ref")
    destination = fake.add_event_destination(receiver.url)

    # When usage goes to each
    send(client, "to-archived", KNOWN, event_name="old_messages")
    send(client, "to-nothing", KNOWN, event_name="typo_messages")
    send(client, "to-other-key", KNOWN, event_name="tokens")
    reports = fake.flush_error_reports()

    # Then none of it counts, and each is reported with its code under its meter
    assert fake.totals() == {}
    by_type = {(r["type"], (r.get("related_object") or {}).get("id")): r for r in reports}
    codes = {
        key: [
            (t["code"], [s["request"]["identifier"] for s in t["sample_errors"]])
            for t in r["data"]["reason"]["error_types"]
        ]
        for key, r in by_type.items()
    }
    assert codes == {
        (ERROR_REPORT_EVENT, archived["id"]): [("archived_meter", ["to-archived"])],
        (NO_METER_EVENT, None): [("no_meter", ["to-nothing"])],
        (ERROR_REPORT_EVENT, other_key["id"]): [
            ("meter_event_no_customer_defined", ["to-other-key"])
        ],
    }
    # And the no_meter_found notification parses as the SDK's typed notification
    assert receiver.wait_for(3)
    notifications = receiver.notifications(client, destination["secret"])
    [no_meter] = [n for n in notifications if n.type == NO_METER_EVENT]
    assert isinstance(no_meter, V1BillingMeterNoMeterFoundEventNotification)
    assert "related_object" not in json.loads(
        next(body for body, _ in receiver.requests if NO_METER_EVENT.encode() in body)
    )
    fetched = no_meter.fetch_event()
    assert fetched.data.reason.error_types[0].code == "no_meter"
    assert fake.wait_for_deliveries()
    assert {d["target"] for d in fake.deliveries} == {"event_destination"}


def test_reports_go_out_from_the_delivery_thread_after_the_delay(
    clock: Clock, receiver: Receiver
) -> None:
    with FakeStripe(clock=clock, async_validation=True, error_report_delay=0.3) as fake:
        client = make_client(fake)
        fake.add_meter("ai_messages")
        destination = fake.add_event_destination(receiver.url, secret="whsec_destination")
        assert destination["webhook_endpoint"]["url"] == receiver.url
        assert destination["webhook_endpoint"]["signing_secret"] == "whsec_destination"

        # Two failures within the delay end up in one report
        started = time.monotonic()
        send(client, "a", UNKNOWN)
        send(client, "b", UNKNOWN)
        assert fake.error_reports == []
        assert fake.wait_for_deliveries(timeout=5)
        assert time.monotonic() - started >= 0.25
        [report] = fake.error_reports
        assert report["data"]["reason"]["error_count"] == 2
        assert receiver.wait_for(1)
        [notification] = receiver.notifications(client, "whsec_destination")
        assert notification.id == report["id"]


def test_failed_notification_is_retried_and_recorded(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    fake.add_meter("ai_messages")
    destination = fake.add_event_destination(receiver.url)
    receiver.statuses.append(500)
    send(client, "a", UNKNOWN)
    fake.flush_error_reports()
    assert receiver.wait_for(2) and fake.wait_for_deliveries()
    assert [(d["attempt"], d["status"], d["target"]) for d in fake.deliveries] == [
        (1, 500, "event_destination"),
        (2, 200, "event_destination"),
    ]
    assert {d["endpoint_id"] for d in fake.deliveries} == {destination["id"]}
    # And redeliver() sends the notification again, a duplicate the receiver must tolerate
    fake.redeliver(fake.error_reports[0]["id"])
    assert receiver.wait_for(3)
    first, _, third = receiver.notifications(client, destination["secret"])
    assert first.id == third.id


def test_async_validation_is_off_by_default(clock: Clock) -> None:
    with FakeStripe(clock=clock) as fake:
        client = make_client(fake)
        send(client, "a", UNKNOWN, 4)
        assert fake.totals() == {(UNKNOWN, "ai_messages"): 4}
        assert fake.rejected_async() == [] and fake.flush_error_reports() == []
        # It can be switched on while running
        fake.async_validation = True
        send(client, "b", UNKNOWN, 4)
        assert [event.code for event in fake.rejected_async()] == ["no_meter"]


def test_admin_routes_show_rejections_and_flush_reports(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    fake.add_meter("ai_messages")
    send(client, "a", UNKNOWN, 2)
    listing = requests.get(f"{fake.url}/_fake/meter_events", timeout=5).json()
    assert listing["data"] == [] and listing["rejected_async"][0]["identifier"] == "a"
    flushed = requests.post(f"{fake.url}/_fake/error_reports/flush", timeout=5).json()
    assert [report["type"] for report in flushed["data"]] == [ERROR_REPORT_EVENT]
    reports = requests.get(f"{fake.url}/_fake/error_reports", timeout=5).json()
    assert reports["data"] == flushed["data"]


# -- v2 events ------------------------------------------------------------------------------


def test_v2_events_are_listed_filtered_and_retrieved(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    meter = fake.add_meter("ai_messages")
    send(client, "a", UNKNOWN)
    fake.flush_error_reports()
    clock.now += 60
    send(client, "b", UNKNOWN, event_name="nothing_here")
    fake.flush_error_reports()

    listed = client.v2.core.events.list()
    assert [event.type for event in listed.data] == [NO_METER_EVENT, ERROR_REPORT_EVENT]
    assert listed.next_page_url is None
    by_meter = client.v2.core.events.list(params={"object_id": meter["id"]})
    assert [event.type for event in by_meter.data] == [ERROR_REPORT_EVENT]
    by_type = client.v2.core.events.list(params={"types": [NO_METER_EVENT]})
    assert [event.type for event in by_type.data] == [NO_METER_EVENT]
    after = client.v2.core.events.list(params={"created": {"gt": listed.data[1].created}})
    assert [event.type for event in after.data] == [NO_METER_EVENT]
    paged = client.v2.core.events.list(params={"limit": 1})
    assert paged.next_page_url is not None
    assert [event.id for event in paged.auto_paging_iter()] == [e.id for e in listed.data]

    retrieved: Any = client.v2.core.events.retrieve(listed.data[1].id)
    assert retrieved.related_object.url == f"/v1/billing/meters/{meter['id']}"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v2.core.events.retrieve("evt_test_nope")
    assert caught.value.http_status == 404


# -- event destinations ---------------------------------------------------------------------


def test_event_destinations_are_created_listed_and_redacted(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    # Given one destination made through the API (without asking for its secret) and one
    # through the helper
    made: Any = client.v2.core.event_destinations.create(
        params=destination_params(receiver.url, description="meter errors")
    )
    helper = fake.add_event_destination(receiver.url, enabled_events=[NO_METER_EVENT])

    # Then the API shows the shape Stripe does, secret and URL redacted unless included
    assert made.object == "v2.core.event_destination" and made.id.startswith("ed_")
    assert made.type == "webhook_endpoint" and made.event_payload == "thin"
    assert made.status == "enabled" and made.description == "meter errors"
    assert made.webhook_endpoint.signing_secret is None and made.webhook_endpoint.url is None
    listed: Any = client.v2.core.event_destinations.list()
    assert [d.id for d in listed.data] == [helper["id"], made.id]
    assert all(d.webhook_endpoint.url is None for d in listed.data)
    with_urls: Any = client.v2.core.event_destinations.list(
        params={"include": ["webhook_endpoint.url"]}
    )
    assert {d.webhook_endpoint.url for d in with_urls.data} == {receiver.url}
    assert [d.enabled_events for d in with_urls.data] == [
        [NO_METER_EVENT],
        [ERROR_REPORT_EVENT, NO_METER_EVENT],
    ]
    assert all(d.webhook_endpoint.signing_secret is None for d in with_urls.data)
    page = client.v2.core.event_destinations.list(params={"limit": 1})
    assert [d.id for d in page.data] == [helper["id"]] and page.next_page_url
    assert [d.id for d in page.auto_paging_iter()] == [helper["id"], made.id]
    assert client.v2.core.event_destinations.retrieve(made.id).name == "usage-meter"

    # And a disabled destination gets nothing while a deleted one is gone
    disabled = client.v2.core.event_destinations.disable(made.id)
    assert disabled.status == "disabled"
    fake.add_meter("ai_messages")
    send(client, "a", UNKNOWN)
    fake.flush_error_reports()
    assert fake.wait_for_deliveries()
    assert fake.deliveries == []  # the helper's destination wants no_meter_found only
    assert client.v2.core.event_destinations.enable(made.id).status == "enabled"
    client.v2.core.event_destinations.delete(helper["id"])
    assert [d.id for d in client.v2.core.event_destinations.list().data] == [made.id]
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v2.core.event_destinations.retrieve(helper["id"])
    assert caught.value.http_status == 404


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"type": "webhook"}, "type"),
        ({"event_payload": "snapshot"}, "event_payload"),
        ({"enabled_events": ["customer.subscription.created"]}, "enabled_events[0]"),
        ({"enabled_events": []}, "enabled_events"),
        ({"webhook_endpoint": {"url": "not a url"}}, "webhook_endpoint.url"),
        ({"include": ["webhook_endpoint.password"]}, "include[0]"),
        ({"colour": "blue"}, "colour"),
        ({"name": None}, "name"),
    ],
)
def test_invalid_event_destinations_are_refused(
    client: stripe.StripeClient, change: dict[str, Any], param: str
) -> None:
    params = {**destination_params("http://127.0.0.1:9/x"), **change}
    params = {key: value for key, value in params.items() if value is not None}
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v2.core.event_destinations.create(params=params)  # type: ignore[arg-type]
    assert error_of(caught).get("param") == param


# -- meter event summaries ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "extra", "param"),
    [
        (T0 - HOUR + 1, T0, {}, "start_time"),
        (T0 - HOUR, T0 - 30, {}, "end_time"),
        (T0, T0, {}, "start_time"),
        (T0 - HOUR + 60, T0, {"value_grouping_window": "hour"}, "start_time"),
        (T0 - HOUR, T0 - 60, {"value_grouping_window": "hour"}, "end_time"),
        (T0 - 24 * HOUR, T0, {"value_grouping_window": "day"}, "start_time"),
        (T0 - HOUR, T0, {"value_grouping_window": "week"}, "value_grouping_window"),
    ],
)
def test_summary_windows_must_be_aligned(
    fake: FakeStripe,
    client: stripe.StripeClient,
    start: int,
    end: int,
    extra: dict[str, Any],
    param: str,
) -> None:
    meter = fake.add_meter("ai_messages")
    fake.add_customer(KNOWN)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        summaries(client, meter["id"], KNOWN, start, end, **extra)
    assert caught.value.http_status == 400 and caught.value.param == param


def test_summaries_need_their_params_an_existing_meter_and_customer(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    meter = fake.add_meter("ai_messages")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meters.event_summaries.list(
            meter["id"],
            params={"customer": KNOWN, "start_time": T0 - HOUR},  # type: ignore[typeddict-item]
        )
    assert caught.value.code == "parameter_missing" and caught.value.param == "end_time"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        summaries(client, meter["id"], UNKNOWN, T0 - HOUR, T0)
    assert caught.value.code == "resource_missing" and caught.value.param == "customer"
    fake.add_customer(KNOWN)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        summaries(client, "mtr_test_nope", KNOWN, T0 - HOUR, T0)
    assert caught.value.http_status == 404


def test_summaries_sum_a_customers_accepted_events_per_window_and_paginate(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    # Given usage over three hours, other customers' and other meters' usage, and a rejection
    meter = fake.add_meter("ai_messages")
    fake.add_meter("api_calls")
    fake.add_customer(KNOWN)
    fake.add_customer("cus_Other0001")
    send(client, "h1-a", KNOWN, 2, timestamp=T0 - 3 * HOUR)  # first second of the window
    send(client, "h1-b", KNOWN, 3, timestamp=T0 - 2 * HOUR - 1)
    send(client, "h2", KNOWN, 10, timestamp=T0 - 2 * HOUR + 30)
    send(client, "h3", KNOWN, 100, timestamp=T0 - 1)
    send(client, "at-end", KNOWN, 1000, timestamp=T0 + 60)  # past the window's end
    send(client, "other-customer", "cus_Other0001", 7, timestamp=T0 - HOUR)
    send(client, "other-meter", KNOWN, 7, event_name="api_calls", timestamp=T0 - HOUR)
    send(client, "rejected", UNKNOWN, 7, timestamp=T0 - HOUR)

    # When the summaries are asked for
    whole = summaries(client, meter["id"], KNOWN, T0 - 3 * HOUR, T0)
    hourly = summaries(client, meter["id"], KNOWN, T0 - 3 * HOUR, T0, value_grouping_window="hour")

    # Then one summary sums the window, and hourly ones split it, newest first
    [summary] = whole.data
    assert summary.object == "billing.meter_event_summary"
    assert summary.meter == meter["id"] and summary.livemode is False
    assert (summary.start_time, summary.end_time, summary.aggregated_value) == (
        T0 - 3 * HOUR,
        T0,
        115,
    )
    assert summary.id.startswith("mtrusg_")
    assert [(s.start_time, s.end_time, s.aggregated_value) for s in hourly.data] == [
        (T0 - HOUR, T0, 100),
        (T0 - 2 * HOUR, T0 - HOUR, 10),
        (T0 - 3 * HOUR, T0 - 2 * HOUR, 5),
    ]
    # And they page like any Stripe list
    first = summaries(
        client, meter["id"], KNOWN, T0 - 3 * HOUR, T0, value_grouping_window="hour", limit=2
    )
    assert first.has_more and [s.aggregated_value for s in first.data] == [100, 10]
    rest = summaries(
        client,
        meter["id"],
        KNOWN,
        T0 - 3 * HOUR,
        T0,
        value_grouping_window="hour",
        limit=2,
        starting_after=first.data[-1].id,
    )
    assert not rest.has_more and [s.aggregated_value for s in rest.data] == [5]
    assert [s.aggregated_value for s in first.auto_paging_iter()] == [100, 10, 5]
    # An empty window still has its one summary, of 0
    empty = summaries(client, meter["id"], KNOWN, T0 - 10 * HOUR, T0 - 9 * HOUR)
    assert [s.aggregated_value for s in empty.data] == [0]


def test_summaries_are_eventually_consistent(clock: Clock) -> None:
    with FakeStripe(clock=clock, async_validation=True, summary_delay=30) as fake:
        client = make_client(fake)
        meter = fake.add_meter("ai_messages")
        fake.add_customer(KNOWN)
        send(client, "a", KNOWN, 4)
        assert fake.totals() == {(KNOWN, "ai_messages"): 4}  # Stripe has it...
        window = (meter["id"], KNOWN, T0 - HOUR, T0)
        assert summaries(client, *window).data[0].aggregated_value == 0  # ...not summed yet
        clock.now += 29
        assert summaries(client, *window).data[0].aggregated_value == 0
        clock.now += 1
        assert summaries(client, *window).data[0].aggregated_value == 4


def test_injected_offset_makes_summaries_disagree(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    meter = fake.add_meter("ai_messages")
    fake.add_customer(KNOWN)
    send(client, "a", KNOWN, 10, timestamp=T0 - 2 * HOUR)
    fake.inject_summary_offset(KNOWN, "ai_messages", -3, timestamp=T0 - 2 * HOUR)
    fake.inject_summary_offset(KNOWN, "ai_messages", 50, timestamp=T0 - 10 * HOUR)  # elsewhere
    fake.inject_summary_offset("cus_Other0001", "ai_messages", 50)  # someone else
    assert summaries(client, meter["id"], KNOWN, T0 - 3 * HOUR, T0).data[0].aggregated_value == 7
    assert fake.totals() == {(KNOWN, "ai_messages"): 10}  # the events themselves are intact

    # The admin route does the same; without a timestamp the offset lands at the fake's now
    response = requests.post(
        f"{fake.url}/_fake/summary_offsets",
        json={"customer": KNOWN, "event_name": "ai_messages", "delta": 1},
        timeout=5,
    )
    assert response.status_code == 200
    after = summaries(client, meter["id"], KNOWN, T0 - 3 * HOUR, T0 + 60)
    assert after.data[0].aggregated_value == 8
    refused = requests.post(
        f"{fake.url}/_fake/summary_offsets", json={"customer": KNOWN, "delta": "x"}, timeout=5
    )
    assert refused.status_code == 400


def test_summaries_follow_the_meters_aggregation(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    counted = fake.add_meter("api_calls", formula="count")
    last = fake.add_meter("seats", formula="last")
    fake.add_customer(KNOWN)
    for index, (name, value, at) in enumerate(
        [
            ("api_calls", 5, T0 - 120),
            ("api_calls", 5, T0 - 60),
            ("seats", 9, T0 - 60),
            ("seats", 4, T0 - 120),
        ]
    ):
        send(client, f"e{index}", KNOWN, value, event_name=name, timestamp=at)
    assert summaries(client, counted["id"], KNOWN, T0 - HOUR, T0).data[0].aggregated_value == 2
    assert summaries(client, last["id"], KNOWN, T0 - HOUR, T0).data[0].aggregated_value == 9


# -- meters ---------------------------------------------------------------------------------


def test_meters_filter_by_status_and_an_active_event_name_is_taken(
    client: stripe.StripeClient,
) -> None:
    params: Any = {
        "display_name": "AI messages",
        "event_name": "ai_messages",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "value_settings": {"event_payload_key": "value"},
    }
    first = client.v1.billing.meters.create(params=params)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meters.create(params=params)
    assert caught.value.param == "event_name" and first.id in str(caught.value.user_message)
    client.v1.billing.meters.deactivate(first.id)
    second = client.v1.billing.meters.create(params=params)
    active = client.v1.billing.meters.list(params={"status": "active"})
    inactive = client.v1.billing.meters.list(params={"status": "inactive"})
    assert [m.id for m in active.data] == [second.id]
    assert [m.id for m in inactive.data] == [first.id]


# -- the command line -----------------------------------------------------------------------


@pytest.mark.usefixtures("real_clock")
def test_cli_validates_asynchronously_and_notifies_its_destination(receiver: Receiver) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools.fake_stripe",
            "--port",
            "0",
            "--async-validation",
            "--event-destination-url",
            receiver.url,
            "--event-destination-secret",
            "whsec_cli",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split(" on ")[1].split()[0]
        assert receiver.url in process.stdout.readline()
        cli_client = stripe.StripeClient(
            "sk_test_fake",
            base_addresses={"api": url, "meter_events": url},
            http_client=stripe.RequestsClient(timeout=5),
        )
        cli_client.v1.billing.meter_events.create(
            params={
                "event_name": "ai_messages",
                "payload": {"stripe_customer_id": UNKNOWN, "value": "1"},
            }
        )
        assert receiver.wait_for(1)
        [notification] = receiver.notifications(cli_client, "whsec_cli")
        assert notification.type == NO_METER_EVENT
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    assert process.returncode == 0
