"""What the Stripe account needs for this service, and what `stripe setup` and `stripe check`
make of what it has.

The account is read and written through `Account` (usage_meter.stripe_account implements it with
the SDK); everything here is plain data and decisions, testable without Stripe:
- each configured meter is a Stripe Meter with that `event_name`, sum aggregation, the customer
  in the `stripe_customer_id` payload key (by id) and the quantity in `value`. A Meter set up
  otherwise does not fail: Stripe accepts the events and the invoice is wrong;
- optionally a monthly metered price per meter, found again on a re-run by meter, amount and
  currency (its lookup key `usage-meter:<event_name>:<currency>:<amount>` names it for apps);
- a webhook endpoint for the five `customer.subscription.*` events (billing periods);
- an event destination for Stripe's asynchronous meter-event rejections.
Setup creates what is missing and changes nothing that exists; check only reads.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Protocol

from pydantic import Field, TypeAdapter, ValidationError

from usage_meter.config import MeterName, MeterSettings

# The template's default `Meters` parameter.
DEFAULT_METERS = '{"ai_messages": {"included": 1000}, "api_calls": {"included": 0}}'
FORMULA: Final = "sum"
CUSTOMER_KEY: Final = "stripe_customer_id"
CUSTOMER_MAPPING_TYPE: Final = "by_id"
VALUE_KEY: Final = "value"
PRICE_INTERVAL: Final = "month"
SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
)
METER_ERROR_EVENTS = (
    "v1.billing.meter.error_report_triggered",
    "v1.billing.meter.no_meter_found",
)
WEBHOOK_DESCRIPTION = "usage-meter: subscription billing periods"

_METERS: TypeAdapter[dict[str, MeterSettings]] = TypeAdapter(
    Annotated[dict[MeterName, MeterSettings], Field(min_length=1)]
)

Line = dict[str, object]


@dataclass(frozen=True)
class Meter:
    id: str
    event_name: str
    status: str
    formula: str | None
    customer_key: str | None
    customer_type: str | None
    value_key: str | None

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class Price:
    id: str
    active: bool
    meter: str | None
    usage_type: str | None
    interval: str | None
    interval_count: int | None
    currency: str
    unit_amount: int | None
    lookup_key: str | None


@dataclass(frozen=True)
class WebhookEndpoint:
    id: str
    url: str
    status: str
    enabled_events: tuple[str, ...]

    def receives(self, event_type: str) -> bool:
        return "*" in self.enabled_events or event_type in self.enabled_events


@dataclass(frozen=True)
class EventDestination:
    id: str
    status: str
    enabled_events: tuple[str, ...]
    url: str | None = None  # a webhook destination's URL


@dataclass(frozen=True)
class PriceSpec:
    """A price per unit, in the currency's smallest unit (cents)."""

    unit_amount: int
    currency: str

    def lookup_key(self, event_name: str) -> str:
        return f"usage-meter:{event_name}:{self.currency}:{self.unit_amount}"

    def matches(self, price: Price, meter_id: str) -> bool:
        return (
            price.active
            and price.meter == meter_id
            and price.usage_type == "metered"
            and price.interval == PRICE_INTERVAL
            and (price.interval_count or 1) == 1
            and price.currency == self.currency
            and price.unit_amount == self.unit_amount
        )


class Account(Protocol):
    """The Stripe account, as far as setup and check read and write it."""

    def meters(self) -> list[Meter]: ...

    def create_meter(self, event_name: str) -> Meter: ...

    def active_prices(self, meter_id: str) -> list[Price]: ...

    def price_with_lookup_key(self, lookup_key: str) -> Price | None: ...

    def create_price(
        self, meter: Meter, spec: PriceSpec, *, lookup_key: str, transfer_lookup_key: bool
    ) -> Price: ...

    def webhook_endpoints(self) -> list[WebhookEndpoint]: ...

    def create_webhook_endpoint(
        self, url: str, events: Sequence[str]
    ) -> tuple[WebhookEndpoint, str]: ...

    def create_event_destination(
        self, url: str, events: Sequence[str]
    ) -> tuple[EventDestination, str]:
        """A webhook destination with thin payloads; the destination and its signing secret."""
        ...

    def event_destinations(self) -> list[EventDestination] | None:
        """None when the account's API does not serve event destinations (v2)."""
        ...


def configured_meters(raw: str | None) -> list[str]:
    """The meter names of a METERS value (JSON: name → {"included": n}); the template's
    default when unset. ValueError says what is wrong."""
    try:
        return list(_METERS.validate_python(json.loads(raw or DEFAULT_METERS)))
    except json.JSONDecodeError as error:
        raise ValueError(f"METERS is not valid JSON: {error.msg}") from None
    except ValidationError as error:
        raise ValueError(f"invalid METERS: {error}") from None


def mismatches(meter: Meter) -> list[tuple[str, str, str | None]]:
    """(setting, expected, actual) for every setting of `meter` the service's events disagree
    with."""
    settings = (
        ("default_aggregation.formula", FORMULA, meter.formula),
        ("customer_mapping.event_payload_key", CUSTOMER_KEY, meter.customer_key),
        ("customer_mapping.type", CUSTOMER_MAPPING_TYPE, meter.customer_type),
        ("value_settings.event_payload_key", VALUE_KEY, meter.value_key),
    )
    return [(name, want, have) for name, want, have in settings if have != want]


def _describe(name: str, want: str, have: str | None) -> str:
    return f"{name} is {have!r}, expected {want!r}"


def _by_event_name(meters: Sequence[Meter], event_name: str) -> tuple[Meter | None, list[Meter]]:
    """The active meter with that event_name (Stripe allows one at most), and inactive ones."""
    same = [m for m in meters if m.event_name == event_name]
    active = next((m for m in same if m.active), None)
    return active, [m for m in same if not m.active]


# -- setup --------------------------------------------------------------------------------------


def setup(
    account: Account,
    meter_names: Sequence[str],
    *,
    price: PriceSpec | None = None,
    webhook_url: str | None = None,
    event_destination_url: str | None = None,
) -> Iterator[Line]:
    """Create what is missing; one line per meter, one for the webhook endpoint and one for
    the event destination (each with a URL), then a total. Existing objects are never
    changed: a misconfigured one is reported."""
    existing = account.meters()
    meters = dict.fromkeys(("exists", "created", "misconfigured"), 0)
    prices = dict.fromkeys(("created", "exists", "skipped"), 0)
    for name in meter_names:
        line = _setup_meter(account, existing, name, price)
        meters[str(line["status"])] += 1
        if "price" in line:
            prices[str(line["price"])] += 1
        yield line
    total: Line = {"meters": len(meter_names), **meters}
    if price is not None:
        total |= {"prices_created": prices["created"], "prices_existing": prices["exists"]}
    if webhook_url is not None:
        line = _setup_webhook(account, webhook_url)
        total["webhook_endpoint"] = line["webhook_endpoint"]
        yield line
    if event_destination_url is not None:
        line = _setup_destination(account, event_destination_url)
        total["event_destination"] = line["event_destination"]
        yield line
    yield total


def _setup_meter(
    account: Account, existing: Sequence[Meter], name: str, price: PriceSpec | None
) -> Line:
    meter, inactive = _by_event_name(existing, name)
    line: Line = {"meter": name}
    if meter is None:
        meter = account.create_meter(name)
        line |= {"status": "created", "meter_id": meter.id}
        if inactive:
            line["inactive_meter_ids"] = [m.id for m in inactive]
    elif wrong := mismatches(meter):
        line |= {
            "status": "misconfigured",
            "meter_id": meter.id,
            "problems": [_describe(*mismatch) for mismatch in wrong],
            "message": f"meter {meter.id} for {name!r} is left as it is: events sent to it "
            "would be billed wrongly; fix it in Stripe (a meter's aggregation and keys cannot "
            "change: deactivate it, then run setup again)",
        }
        if price is not None:
            line["price"] = "skipped"
        return line
    else:
        line |= {"status": "exists", "meter_id": meter.id}
    if price is not None:
        line |= _setup_price(account, meter, price)
    return line


def _setup_price(account: Account, meter: Meter, spec: PriceSpec) -> Line:
    lookup_key = spec.lookup_key(meter.event_name)
    for found in account.active_prices(meter.id):
        if spec.matches(found, meter.id):
            return {"price": "exists", "price_id": found.id, "lookup_key": found.lookup_key}
    # Lookup keys are unique in an account: one left on an older price (of a meter since
    # replaced, or archived) moves to the new price.
    holder = account.price_with_lookup_key(lookup_key)
    created = account.create_price(
        meter, spec, lookup_key=lookup_key, transfer_lookup_key=holder is not None
    )
    return {"price": "created", "price_id": created.id, "lookup_key": lookup_key}


def _setup_webhook(account: Account, url: str) -> Line:
    same = [e for e in account.webhook_endpoints() if e.url == url]
    if not same:
        endpoint, secret = account.create_webhook_endpoint(url, SUBSCRIPTION_EVENTS)
        return {
            "webhook_endpoint": "created",
            "id": endpoint.id,
            "url": url,
            "enabled_events": list(endpoint.enabled_events),
            "secret": secret,
        }
    good = next((e for e in same if not _endpoint_problems(e)), None)
    if good is not None:
        return {"webhook_endpoint": "exists", "id": good.id, "url": url}
    return {
        "webhook_endpoint": "misconfigured",
        "id": same[0].id,
        "url": url,
        "problems": [message for _, message in _endpoint_problems(same[0])],
    }


def _setup_destination(account: Account, url: str) -> Line:
    found = account.event_destinations()
    if found is None:
        return {
            "event_destination": "unavailable",
            "url": url,
            "message": "this API does not serve event destinations: create one in Workbench",
        }
    same = [d for d in found if d.url == url]
    if not same:
        destination, secret = account.create_event_destination(url, METER_ERROR_EVENTS)
        return {
            "event_destination": "created",
            "id": destination.id,
            "url": url,
            "enabled_events": list(destination.enabled_events),
            "secret": secret,
        }
    missing = [e for e in METER_ERROR_EVENTS if e not in same[0].enabled_events]
    if same[0].status == "enabled" and not missing:
        return {"event_destination": "exists", "id": same[0].id, "url": url}
    problems = [f"does not receive {event}" for event in missing]
    if same[0].status != "enabled":
        problems.append(f"is {same[0].status}")
    return {
        "event_destination": "misconfigured",
        "id": same[0].id,
        "url": url,
        "problems": problems,
    }


# -- check --------------------------------------------------------------------------------------


def check(
    account: Account, meter_names: Sequence[str], *, webhook_url: str | None = None
) -> Iterator[Line]:
    """One line per problem (`problem`, a message and what it names), a `warning` line for a
    check the account's API cannot answer, then a summary with `ok`."""
    problems = 0
    meters = account.meters()
    for name in meter_names:
        for line in _check_meter(meters, name):
            problems += 1
            yield line
    endpoint_lines, endpoint_id = _check_webhook(account.webhook_endpoints(), webhook_url)
    problems += len(endpoint_lines)
    yield from endpoint_lines
    destinations = account.event_destinations()
    if destinations is None:
        destinations_state = "unavailable"
        yield {
            "warning": "event_destinations_unavailable",
            "message": "this API does not serve event destinations (GET /v2/core/"
            "event_destinations): could not verify "
            + " and ".join(METER_ERROR_EVENTS)
            + " are registered",
        }
    else:
        destination_lines = list(_check_destinations(destinations))
        problems += len(destination_lines)
        destinations_state = "problems" if destination_lines else "ok"
        yield from destination_lines
    yield {
        "ok": problems == 0,
        "problems": problems,
        "meters": len(meter_names),
        "webhook_endpoint": endpoint_id,
        "event_destinations": destinations_state,
    }


def _check_meter(meters: Sequence[Meter], name: str) -> Iterator[Line]:
    meter, inactive = _by_event_name(meters, name)
    if meter is None and inactive:
        ids = ", ".join(m.id for m in inactive)
        yield {
            "problem": "meter_inactive",
            "meter": name,
            "meter_id": inactive[0].id,
            "message": f"meter {name!r} is inactive ({ids}): Stripe rejects its events; "
            "reactivate it, or run `stripe setup` to create a new one",
        }
        return
    if meter is None:
        yield {
            "problem": "meter_missing",
            "meter": name,
            "message": f"no Stripe meter has event_name {name!r}: Stripe rejects its events; "
            "run `stripe setup`",
        }
        return
    for setting, want, have in mismatches(meter):
        yield {
            "problem": "meter_misconfigured",
            "meter": name,
            "meter_id": meter.id,
            "setting": setting,
            "expected": want,
            "actual": have,
            "message": f"meter {name!r} ({meter.id}): {_describe(setting, want, have)}; "
            "Stripe accepts the events and bills them wrongly",
        }


def _endpoint_problems(endpoint: WebhookEndpoint) -> list[tuple[str, str]]:
    problems = []
    if endpoint.status != "enabled":
        problems.append(
            (
                "webhook_endpoint_disabled",
                f"webhook endpoint {endpoint.id} ({endpoint.url}) is {endpoint.status}: "
                "Stripe sends it nothing",
            )
        )
    missing = [e for e in SUBSCRIPTION_EVENTS if not endpoint.receives(e)]
    if missing:
        problems.append(
            (
                "webhook_endpoint_events",
                f"webhook endpoint {endpoint.id} ({endpoint.url}) does not receive "
                f"{', '.join(missing)}",
            )
        )
    return problems


def _check_webhook(
    endpoints: Sequence[WebhookEndpoint], url: str | None
) -> tuple[list[Line], str | None]:
    """Problem lines, and the id of the endpoint that passes."""
    candidates = [e for e in endpoints if url is None or e.url == url]
    good = next((e for e in candidates if not _endpoint_problems(e)), None)
    if good is not None:
        return [], good.id
    relevant = [e for e in candidates if any(e.receives(t) for t in SUBSCRIPTION_EVENTS)]
    if url is not None and candidates:
        relevant = relevant or candidates
    if not relevant:
        where = f"with URL {url}" if url is not None else "receives customer.subscription.*"
        return [
            {
                "problem": "webhook_endpoint_missing",
                **({"url": url} if url is not None else {}),
                "message": f"no webhook endpoint {where}: billing periods are never updated; "
                "run `stripe setup --webhook-url URL`",
            }
        ], None
    # The closest one: the most of the events, enabled first.
    closest = max(
        relevant,
        key=lambda e: (sum(e.receives(t) for t in SUBSCRIPTION_EVENTS), e.status == "enabled"),
    )
    return [
        {"problem": code, "webhook_endpoint": closest.id, "url": closest.url, "message": message}
        for code, message in _endpoint_problems(closest)
    ], None


def _check_destinations(destinations: Sequence[EventDestination]) -> Iterator[Line]:
    for event_type in METER_ERROR_EVENTS:
        receiving = [d for d in destinations if event_type in d.enabled_events]
        if any(d.status == "enabled" for d in receiving):
            continue
        if receiving:
            yield {
                "problem": "event_destination_disabled",
                "event_type": event_type,
                "event_destination": receiving[0].id,
                "message": f"every event destination for {event_type} is disabled: "
                "asynchronous rejections go unnoticed",
            }
        else:
            yield {
                "problem": "event_destination_missing",
                "event_type": event_type,
                "message": f"no event destination receives {event_type}: asynchronous "
                "rejections go unnoticed",
            }
