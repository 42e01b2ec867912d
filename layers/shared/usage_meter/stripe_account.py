"""The Stripe account's setup through the SDK: meters, metered prices, webhook endpoints and event
destinations, for `stripe setup` and `stripe check` (usage_meter.logic.stripe_setup decides).

Only the operators' command imports it, when it runs those (it imports `stripe`).
"""

from collections.abc import Sequence
from typing import Any

import stripe

from usage_meter.billing.stripe_client import stripe_client
from usage_meter.logic.stripe_setup import (
    CUSTOMER_KEY,
    CUSTOMER_MAPPING_TYPE,
    FORMULA,
    PRICE_INTERVAL,
    VALUE_KEY,
    WEBHOOK_DESCRIPTION,
    EventDestination,
    Meter,
    Price,
    PriceSpec,
    WebhookEndpoint,
)

_PAGE = 100
AccountError = stripe.StripeError  # what a call to the account raises


class StripeAccount:
    """usage_meter.logic.stripe_setup.Account on the account of `api_key`."""

    def __init__(
        self, api_key: str, *, api_base: str | None = None, timeout_seconds: float = 20.0
    ) -> None:
        self._client = stripe_client(api_key, api_base=api_base, timeout_seconds=timeout_seconds)

    def meters(self) -> list[Meter]:
        pages = self._client.v1.billing.meters.list(params={"limit": _PAGE})
        return [_meter(meter) for meter in pages.auto_paging_iter()]

    def create_meter(self, event_name: str) -> Meter:
        created = self._client.v1.billing.meters.create(
            params={
                "display_name": event_name,
                "event_name": event_name,
                "default_aggregation": {"formula": FORMULA},
                "customer_mapping": {
                    "event_payload_key": CUSTOMER_KEY,
                    "type": CUSTOMER_MAPPING_TYPE,
                },
                "value_settings": {"event_payload_key": VALUE_KEY},
            }
        )
        return _meter(created)

    def active_prices(self, meter_id: str) -> list[Price]:
        pages = self._client.v1.prices.list(
            params={
                "active": True,
                "type": "recurring",
                "recurring": {"meter": meter_id, "usage_type": "metered"},
                "limit": _PAGE,
            }
        )
        return [_price(price) for price in pages.auto_paging_iter()]

    def price_with_lookup_key(self, lookup_key: str) -> Price | None:
        # Every metered price, archived ones too (they keep their lookup keys), read page by
        # page; the `lookup_keys` filter would do in Stripe, the local stand-in lacks it.
        pages = self._client.v1.prices.list(
            params={"type": "recurring", "recurring": {"usage_type": "metered"}, "limit": _PAGE}
        )
        for price in pages.auto_paging_iter():
            if price.lookup_key == lookup_key:
                return _price(price)
        return None

    def create_price(
        self, meter: Meter, spec: PriceSpec, *, lookup_key: str, transfer_lookup_key: bool
    ) -> Price:
        params: dict[str, Any] = {
            "currency": spec.currency,
            "unit_amount": spec.unit_amount,
            "product_data": {"name": meter.event_name},
            "recurring": {"interval": PRICE_INTERVAL, "usage_type": "metered", "meter": meter.id},
            "lookup_key": lookup_key,
            "metadata": {"usage_meter_event_name": meter.event_name},
        }
        if transfer_lookup_key:  # sent only when needed: the local stand-in does not know it
            params["transfer_lookup_key"] = True
        return _price(self._client.v1.prices.create(params=params))  # type: ignore[arg-type]

    def webhook_endpoints(self) -> list[WebhookEndpoint]:
        pages = self._client.v1.webhook_endpoints.list(params={"limit": _PAGE})
        return [_endpoint(endpoint) for endpoint in pages.auto_paging_iter()]

    def create_webhook_endpoint(
        self, url: str, events: Sequence[str]
    ) -> tuple[WebhookEndpoint, str]:
        params: dict[str, Any] = {
            "url": url,
            "enabled_events": list(events),
            "description": WEBHOOK_DESCRIPTION,
        }
        created = self._client.v1.webhook_endpoints.create(params=params)  # type: ignore[arg-type]
        return _endpoint(created), str(created.secret)

    def create_event_destination(
        self, url: str, events: Sequence[str]
    ) -> tuple[EventDestination, str]:
        params: dict[str, Any] = {
            "name": "usage-meter",
            "description": WEBHOOK_DESCRIPTION,
            "type": "webhook_endpoint",
            "event_payload": "thin",
            "enabled_events": list(events),
            "webhook_endpoint": {"url": url},
            "include": ["webhook_endpoint.signing_secret", "webhook_endpoint.url"],
        }
        created = self._client.v2.core.event_destinations.create(params=params)  # type: ignore[arg-type]
        return _destination(created), str(_get(created, "webhook_endpoint", "signing_secret"))

    def event_destinations(self) -> list[EventDestination] | None:
        try:
            pages = self._client.v2.core.event_destinations.list(
                params={"include": ["webhook_endpoint.url"]}
            )
            return [_destination(destination) for destination in pages.auto_paging_iter()]
        except stripe.StripeError as error:
            if error.http_status == 404:  # this API does not serve the v2 route
                return None
            raise


def _destination(destination: Any) -> EventDestination:
    return EventDestination(
        id=destination.id,
        status=destination.status,
        enabled_events=tuple(destination.enabled_events or ()),
        url=_get(destination, "webhook_endpoint", "url"),
    )


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        obj = getattr(obj, name, None) if obj is not None else None
    return obj


def _meter(meter: Any) -> Meter:
    return Meter(
        id=meter.id,
        event_name=meter.event_name,
        status=meter.status,
        formula=_get(meter, "default_aggregation", "formula"),
        customer_key=_get(meter, "customer_mapping", "event_payload_key"),
        customer_type=_get(meter, "customer_mapping", "type"),
        value_key=_get(meter, "value_settings", "event_payload_key"),
    )


def _price(price: Any) -> Price:
    return Price(
        id=price.id,
        active=bool(price.active),
        meter=_get(price, "recurring", "meter"),
        usage_type=_get(price, "recurring", "usage_type"),
        interval=_get(price, "recurring", "interval"),
        interval_count=_get(price, "recurring", "interval_count"),
        currency=price.currency,
        unit_amount=price.unit_amount,
        lookup_key=getattr(price, "lookup_key", None),
    )


def _endpoint(endpoint: Any) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=endpoint.id,
        url=endpoint.url,
        status=endpoint.status,
        enabled_events=tuple(endpoint.enabled_events or ()),
    )
