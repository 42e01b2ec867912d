"""The decisions of `stripe setup` and `stripe check`, on an in-memory account (no Stripe)."""

from collections.abc import Sequence
from dataclasses import replace

import pytest

from usage_meter.logic import stripe_setup
from usage_meter.logic.stripe_setup import (
    METER_ERROR_EVENTS,
    SUBSCRIPTION_EVENTS,
    EventDestination,
    Meter,
    Price,
    PriceSpec,
    WebhookEndpoint,
)

GOOD = Meter("mtr_1", "ai_messages", "active", "sum", "stripe_customer_id", "by_id", "value")


class Account:
    """stripe_setup.Account in memory; `destinations` None: the v2 API is not served."""

    def __init__(self, meters: Sequence[Meter] = (), prices: Sequence[Price] = ()) -> None:
        self.meters_ = list(meters)
        self.prices = list(prices)
        self.endpoints: list[WebhookEndpoint] = []
        self.destinations: list[EventDestination] | None = None
        self.transfers: list[bool] = []

    def meters(self) -> list[Meter]:
        return list(self.meters_)

    def create_meter(self, event_name: str) -> Meter:
        meter = replace(GOOD, id=f"mtr_{len(self.meters_) + 1}", event_name=event_name)
        self.meters_.append(meter)
        return meter

    def active_prices(self, meter_id: str) -> list[Price]:
        return [p for p in self.prices if p.active and p.meter == meter_id]

    def price_with_lookup_key(self, lookup_key: str) -> Price | None:
        return next((p for p in self.prices if p.lookup_key == lookup_key), None)

    def create_price(
        self, meter: Meter, spec: PriceSpec, *, lookup_key: str, transfer_lookup_key: bool
    ) -> Price:
        self.transfers.append(transfer_lookup_key)
        price = Price(
            f"price_{len(self.prices) + 1}",
            True,
            meter.id,
            "metered",
            "month",
            1,
            spec.currency,
            spec.unit_amount,
            lookup_key,
        )
        self.prices.append(price)
        return price

    def webhook_endpoints(self) -> list[WebhookEndpoint]:
        return list(self.endpoints)

    def create_webhook_endpoint(
        self, url: str, events: Sequence[str]
    ) -> tuple[WebhookEndpoint, str]:
        endpoint = WebhookEndpoint(f"we_{len(self.endpoints) + 1}", url, "enabled", tuple(events))
        self.endpoints.append(endpoint)
        return endpoint, "whsec_x"

    def event_destinations(self) -> list[EventDestination] | None:
        return self.destinations


def test_meters_default_to_the_templates_and_are_validated():
    assert stripe_setup.configured_meters(None) == ["ai_messages", "api_calls"]
    assert stripe_setup.configured_meters('{"tokens": {"included": 3}}') == ["tokens"]
    for bad in ("{", "{}", '{"bad name": {}}', '{"a": {"included": -1}}'):
        with pytest.raises(ValueError):
            stripe_setup.configured_meters(bad)


def test_mismatches_name_every_setting_the_events_disagree_with():
    assert stripe_setup.mismatches(GOOD) == []
    wrong = replace(GOOD, formula="last", value_key=None)
    assert stripe_setup.mismatches(wrong) == [
        ("default_aggregation.formula", "sum", "last"),
        ("value_settings.event_payload_key", "value", None),
    ]


def test_a_price_moves_a_lookup_key_an_older_price_holds():
    spec = PriceSpec(3, "usd")
    archived = Price(
        "price_old", False, "mtr_gone", "metered", "month", 1, "usd", 3, spec.lookup_key("a")
    )
    account = Account(prices=[archived])
    lines = list(stripe_setup.setup(account, ["a"], price=spec))
    assert lines[0]["price"] == "created"
    assert account.transfers == [True]
    again = list(stripe_setup.setup(account, ["a"], price=spec))
    assert again[0]["price"] == "exists"
    assert account.transfers == [True]


def test_an_endpoint_with_the_url_but_not_the_events_is_reported_not_changed():
    account = Account()
    account.endpoints = [
        WebhookEndpoint("we_1", "https://x/hook", "enabled", SUBSCRIPTION_EVENTS[:1])
    ]
    *_, webhook, total = stripe_setup.setup(account, ["a"], webhook_url="https://x/hook")
    assert webhook["webhook_endpoint"] == "misconfigured"
    assert "customer.subscription.updated" in str(webhook["problems"])
    assert total["webhook_endpoint"] == "misconfigured"
    assert len(account.endpoints) == 1


def test_check_without_the_v2_api_warns_and_still_passes():
    account = Account([GOOD])
    account.endpoints = [WebhookEndpoint("we_1", "https://x/hook", "enabled", ("*",))]
    lines = list(stripe_setup.check(account, ["ai_messages"]))
    assert [line.get("warning") for line in lines[:-1]] == ["event_destinations_unavailable"]
    assert lines[-1] == {
        "ok": True,
        "problems": 0,
        "meters": 1,
        "webhook_endpoint": "we_1",
        "event_destinations": "unavailable",
    }


def test_check_reports_disabled_endpoints_and_destinations():
    account = Account([GOOD])
    account.endpoints = [WebhookEndpoint("we_1", "https://x/hook", "disabled", SUBSCRIPTION_EVENTS)]
    account.destinations = [
        EventDestination("ed_1", "disabled", METER_ERROR_EVENTS),
        EventDestination("ed_2", "enabled", METER_ERROR_EVENTS[1:]),
    ]
    lines = list(stripe_setup.check(account, ["ai_messages"], webhook_url="https://x/hook"))
    assert [line.get("problem") for line in lines[:-1]] == [
        "webhook_endpoint_disabled",
        "event_destination_disabled",
    ]
    assert lines[1]["event_type"] == METER_ERROR_EVENTS[0]
    assert lines[-1]["ok"] is False and lines[-1]["event_destinations"] == "problems"
