"""What `stripe setup` and `stripe check` print, line by line, for each state of the account
(issue 15, mutation testing: what a changed line of logic/stripe_setup.py would get wrong that
tests/unit/test_stripe_setup_logic.py and tests/integration/test_stripe_setup.py do not see).

Each command prints JSON lines that operators and scripts read (`ok`, `problems`, the ids and
secrets to store), so the tests compare whole lines.
"""

from collections.abc import Sequence
from dataclasses import replace

import pytest

from tests.unit.test_stripe_setup_logic import GOOD, Account
from usage_meter.logic import stripe_setup
from usage_meter.logic.stripe_setup import (
    METER_ERROR_EVENTS,
    SUBSCRIPTION_EVENTS,
    EventDestination,
    Price,
    PriceSpec,
    WebhookEndpoint,
)

HOOK = "https://example.com/v1/stripe/webhook"
EVENTS_URL = "https://example.com/v1/stripe/events"


class Destinations(Account):
    """The in-memory account, serving event destinations (Stripe's v2 API)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.destinations = []

    def create_event_destination(
        self, url: str, events: Sequence[str]
    ) -> tuple[EventDestination, str]:
        destination = EventDestination("ed_1", "enabled", tuple(events), url)
        self.destinations.append(destination)
        return destination, "whsec_events"


# -- setup ---------------------------------------------------------------------------------------


def test_setup_creates_a_meter_naming_the_inactive_ones_it_replaces_and_totals_it():
    account = Account([replace(GOOD, id="mtr_old", status="inactive")])
    assert list(stripe_setup.setup(account, ["ai_messages"])) == [
        {
            "meter": "ai_messages",
            "status": "created",
            "meter_id": "mtr_2",
            "inactive_meter_ids": ["mtr_old"],
        },
        {"meters": 1, "exists": 0, "created": 1, "misconfigured": 0},
    ]


def test_setup_leaves_a_misconfigured_meter_and_its_price_alone_saying_why():
    account = Account([replace(GOOD, formula="last")])
    lines = list(stripe_setup.setup(account, ["ai_messages"], price=PriceSpec(3, "usd")))
    assert lines == [
        {
            "meter": "ai_messages",
            "status": "misconfigured",
            "meter_id": "mtr_1",
            "problems": ["default_aggregation.formula is 'last', expected 'sum'"],
            "message": "meter mtr_1 for 'ai_messages' is left as it is: events sent to it would "
            "be billed wrongly; fix it in Stripe (a meter's aggregation and keys cannot change: "
            "deactivate it, then run setup again)",
            "price": "skipped",
        },
        {
            "meters": 1,
            "exists": 0,
            "created": 0,
            "misconfigured": 1,
            "prices_created": 0,
            "prices_existing": 0,
        },
    ]


def test_setup_finds_an_existing_price_by_meter_amount_and_currency():
    key = PriceSpec(3, "usd").lookup_key("ai_messages")
    price = Price("price_1", True, "mtr_1", "metered", "month", None, "usd", 3, key)
    account = Account([GOOD], [price])
    lines = list(stripe_setup.setup(account, ["ai_messages"], price=PriceSpec(3, "usd")))
    assert lines == [
        {
            "meter": "ai_messages",
            "status": "exists",
            "meter_id": "mtr_1",
            "price": "exists",
            "price_id": "price_1",
            "lookup_key": "usage-meter:ai_messages:usd:3",
        },
        {
            "meters": 1,
            "exists": 1,
            "created": 0,
            "misconfigured": 0,
            "prices_created": 0,
            "prices_existing": 1,
        },
    ]


def test_a_price_billed_every_two_months_is_not_the_monthly_price():
    two_months = Price("price_1", True, "mtr_1", "metered", "month", 2, "usd", 3, None)
    account = Account([GOOD], [two_months])
    [line, _] = stripe_setup.setup(account, ["ai_messages"], price=PriceSpec(3, "usd"))
    assert (line["price"], line["price_id"]) == ("created", "price_2")
    assert account.transfers == [False]


def test_setup_creates_the_webhook_endpoint_and_shows_its_secret_once():
    account = Account([GOOD])
    *_, webhook, total = stripe_setup.setup(account, ["ai_messages"], webhook_url=HOOK)
    assert webhook == {
        "webhook_endpoint": "created",
        "id": "we_1",
        "url": HOOK,
        "enabled_events": list(SUBSCRIPTION_EVENTS),
        "secret": "whsec_x",
    }
    assert total["webhook_endpoint"] == "created"
    *_, again, total = stripe_setup.setup(account, ["ai_messages"], webhook_url=HOOK)
    assert again == {"webhook_endpoint": "exists", "id": "we_1", "url": HOOK}


def test_setup_reports_a_disabled_endpoint_with_the_url_without_changing_it():
    account = Account([GOOD])
    account.endpoints = [WebhookEndpoint("we_9", HOOK, "disabled", SUBSCRIPTION_EVENTS)]
    *_, webhook, _ = stripe_setup.setup(account, ["ai_messages"], webhook_url=HOOK)
    assert webhook == {
        "webhook_endpoint": "misconfigured",
        "id": "we_9",
        "url": HOOK,
        "problems": [f"webhook endpoint we_9 ({HOOK}) is disabled: Stripe sends it nothing"],
    }


def test_setup_without_the_v2_api_says_to_create_the_destination_in_workbench():
    account = Account([GOOD])
    *_, destination, total = stripe_setup.setup(
        account, ["ai_messages"], event_destination_url=EVENTS_URL
    )
    assert destination == {
        "event_destination": "unavailable",
        "url": EVENTS_URL,
        "message": "this API does not serve event destinations: create one in Workbench",
    }
    assert total["event_destination"] == "unavailable"


def test_setup_creates_the_event_destination_then_finds_it():
    account = Destinations([GOOD])
    *_, created, total = stripe_setup.setup(
        account, ["ai_messages"], event_destination_url=EVENTS_URL
    )
    assert created == {
        "event_destination": "created",
        "id": "ed_1",
        "url": EVENTS_URL,
        "enabled_events": list(METER_ERROR_EVENTS),
        "secret": "whsec_events",
    }
    assert total["event_destination"] == "created"
    *_, again, _ = stripe_setup.setup(account, ["ai_messages"], event_destination_url=EVENTS_URL)
    assert again == {"event_destination": "exists", "id": "ed_1", "url": EVENTS_URL}


def test_setup_reports_a_destination_that_misses_events_or_is_disabled():
    account = Destinations([GOOD])
    account.destinations = [
        EventDestination("ed_7", "disabled", METER_ERROR_EVENTS[:1], EVENTS_URL)
    ]
    *_, line, _ = stripe_setup.setup(account, ["ai_messages"], event_destination_url=EVENTS_URL)
    assert line == {
        "event_destination": "misconfigured",
        "id": "ed_7",
        "url": EVENTS_URL,
        "problems": [f"does not receive {METER_ERROR_EVENTS[1]}", "is disabled"],
    }


# -- check ---------------------------------------------------------------------------------------


def ok_endpoint() -> WebhookEndpoint:
    return WebhookEndpoint("we_1", HOOK, "enabled", ("*",))


def test_check_passes_on_a_complete_account_and_says_what_it_checked():
    account = Destinations([GOOD])
    account.endpoints = [ok_endpoint()]
    account.destinations = [EventDestination("ed_1", "enabled", METER_ERROR_EVENTS, EVENTS_URL)]
    assert list(stripe_setup.check(account, ["ai_messages"], webhook_url=HOOK)) == [
        {
            "ok": True,
            "problems": 0,
            "meters": 1,
            "webhook_endpoint": "we_1",
            "event_destinations": "ok",
        }
    ]


def test_check_names_a_missing_an_inactive_and_a_misconfigured_meter():
    inactive = replace(GOOD, id="mtr_2", event_name="api_calls", status="inactive")
    older = replace(inactive, id="mtr_0")
    wrong = replace(GOOD, id="mtr_3", event_name="tokens", customer_type="by_email")
    account = Destinations([inactive, older, wrong])
    account.endpoints = [ok_endpoint()]
    lines = list(stripe_setup.check(account, ["ai_messages", "api_calls", "tokens"]))
    assert lines[:3] == [
        {
            "problem": "meter_missing",
            "meter": "ai_messages",
            "message": "no Stripe meter has event_name 'ai_messages': Stripe rejects its events; "
            "run `stripe setup`",
        },
        {
            "problem": "meter_inactive",
            "meter": "api_calls",
            "meter_id": "mtr_2",
            "message": "meter 'api_calls' is inactive (mtr_2, mtr_0): Stripe rejects its events; "
            "reactivate it, or run `stripe setup` to create a new one",
        },
        {
            "problem": "meter_misconfigured",
            "meter": "tokens",
            "meter_id": "mtr_3",
            "setting": "customer_mapping.type",
            "expected": "by_id",
            "actual": "by_email",
            "message": "meter 'tokens' (mtr_3): customer_mapping.type is 'by_email', expected "
            "'by_id'; Stripe accepts the events and bills them wrongly",
        },
    ]
    assert lines[-1]["problems"] == 3 + 2 and lines[-1]["ok"] is False


@pytest.mark.parametrize(
    ("url", "where"),
    [(HOOK, f"with URL {HOOK}"), (None, "receives customer.subscription.*")],
)
def test_check_says_no_endpoint_receives_the_subscription_events(url, where):
    account = Destinations([GOOD])
    account.endpoints = [WebhookEndpoint("we_2", "https://other", "enabled", ("charge.failed",))]
    [line, *_, summary] = stripe_setup.check(account, ["ai_messages"], webhook_url=url)
    assert line == {
        "problem": "webhook_endpoint_missing",
        **({"url": url} if url else {}),
        "message": f"no webhook endpoint {where}: billing periods are never updated; "
        "run `stripe setup --webhook-url URL`",
    }
    assert summary["webhook_endpoint"] is None


def test_check_reports_the_closest_endpoint_enabled_first():
    account = Destinations([GOOD])
    account.endpoints = [
        WebhookEndpoint("we_3", "https://c", "enabled", SUBSCRIPTION_EVENTS[:1]),
        WebhookEndpoint("we_1", "https://a", "disabled", SUBSCRIPTION_EVENTS[:2]),
        WebhookEndpoint("we_2", "https://b", "enabled", SUBSCRIPTION_EVENTS[:2]),
    ]
    [line, *_] = stripe_setup.check(account, ["ai_messages"])
    assert line == {
        "problem": "webhook_endpoint_events",
        "webhook_endpoint": "we_2",
        "url": "https://b",
        "message": "webhook endpoint we_2 (https://b) does not receive "
        + ", ".join(SUBSCRIPTION_EVENTS[2:]),
    }


def test_check_reports_the_endpoint_at_the_url_even_without_any_subscription_event():
    account = Destinations([GOOD])
    account.endpoints = [WebhookEndpoint("we_5", HOOK, "disabled", ("charge.failed",))]
    lines = list(stripe_setup.check(account, ["ai_messages"], webhook_url=HOOK))
    assert [line.get("problem") for line in lines[:2]] == [
        "webhook_endpoint_disabled",
        "webhook_endpoint_events",
    ]


def test_check_without_event_destinations_warns_which_events_it_could_not_verify():
    account = Account([GOOD])
    account.endpoints = [ok_endpoint()]
    warning, summary = stripe_setup.check(account, ["ai_messages"])
    assert warning == {
        "warning": "event_destinations_unavailable",
        "message": "this API does not serve event destinations (GET /v2/core/event_destinations)"
        f": could not verify {METER_ERROR_EVENTS[0]} and {METER_ERROR_EVENTS[1]} are registered",
    }
    assert (summary["ok"], summary["event_destinations"]) == (True, "unavailable")


def test_check_names_each_meter_error_event_no_enabled_destination_receives():
    account = Destinations([GOOD])
    account.endpoints = [ok_endpoint()]
    account.destinations = [
        EventDestination("ed_1", "disabled", METER_ERROR_EVENTS[:1]),
        EventDestination("ed_2", "enabled", ("v1.other",)),
    ]
    first, second, summary = stripe_setup.check(account, ["ai_messages"])
    assert first == {
        "problem": "event_destination_disabled",
        "event_type": METER_ERROR_EVENTS[0],
        "event_destination": "ed_1",
        "message": f"every event destination for {METER_ERROR_EVENTS[0]} is disabled: "
        "asynchronous rejections go unnoticed",
    }
    assert second == {
        "problem": "event_destination_missing",
        "event_type": METER_ERROR_EVENTS[1],
        "message": f"no event destination receives {METER_ERROR_EVENTS[1]}: asynchronous "
        "rejections go unnoticed",
    }
    assert (summary["problems"], summary["event_destinations"]) == (2, "problems")


def test_a_bad_meters_setting_says_what_is_wrong():
    with pytest.raises(ValueError, match=r"^METERS is not valid JSON: Expecting"):
        stripe_setup.configured_meters("{")
    with pytest.raises(ValueError, match=r"^invalid METERS: "):
        stripe_setup.configured_meters("{}")


@pytest.mark.parametrize(
    ("status", "events", "problems"),
    [
        ("disabled", METER_ERROR_EVENTS, ["is disabled"]),
        ("enabled", METER_ERROR_EVENTS[1:], [f"does not receive {METER_ERROR_EVENTS[0]}"]),
    ],
)
def test_setup_names_only_what_is_wrong_with_the_destination(status, events, problems):
    account = Destinations([GOOD])
    account.destinations = [EventDestination("ed_7", status, events, EVENTS_URL)]
    *_, line, _ = stripe_setup.setup(account, ["ai_messages"], event_destination_url=EVENTS_URL)
    assert (line["event_destination"], line["problems"]) == ("misconfigured", problems)


def test_check_looks_at_every_meter_error_event_after_one_that_is_received():
    account = Destinations([GOOD])
    account.endpoints = [ok_endpoint()]
    account.destinations = [EventDestination("ed_1", "enabled", METER_ERROR_EVENTS[:1])]
    problem, _ = stripe_setup.check(account, ["ai_messages"])
    assert (problem["problem"], problem["event_type"]) == (
        "event_destination_missing",
        METER_ERROR_EVENTS[1],
    )
