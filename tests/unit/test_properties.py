"""Properties of the HTTP API under hostile input (issue 5), driven by hypothesis.

Whatever a client sends, the answer is a documented status with a JSON body of the documented
shape, never a 5xx, and a rejected request stores nothing. The requests go through the real
resolver (`record_api` / `read_api`), as API Gateway would hand them over after the authorizer
let them through, over the in-memory store; tests/integration/test_properties_dynamodb.py runs
every one of them again over the DynamoDB store on DynamoDB Local, on fewer examples. Every test
is derandomized, so CI sees the same examples on every run.
"""

import base64
import copy
import json
import re
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.invoke import http_event
from tests.fakes import InMemoryStore
from usage_meter.api import MAX_BODY_BYTES, read_api, record_api
from usage_meter.logic.periods import calendar_month, period_key
from usage_meter.logic.record import MAX_AGE, MAX_FUTURE
from usage_meter.models.domain import Counter
from usage_meter.models.input import MAX_BATCH_EVENTS, MAX_QUANTITY

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)
METERS: dict[str, object] = {"ai_messages": {"included": 1000}, "api_calls": {"included": 0}}
INCLUDED = {"ai_messages": 1000, "api_calls": 0}
CUSTOMER = "cus_Q1w2E3r4"
SEEDED_KEY = "seeded-key"
SEEDED_EVENT = {
    "stripe_customer_id": CUSTOMER,
    "meter": "ai_messages",
    "quantity": 5,
    "idempotency_key": SEEDED_KEY,
}
# What the Lambda authorizer hands on for a server key with every scope.
ADMIN_KEY = {"kind": "key", "id": "test", "scopes": "admin"}
CUSTOMER_ID = re.compile(r"cus_[A-Za-z0-9]+")
ERROR_CODES = {
    400: "invalid_json",
    409: "idempotency_conflict",
    413: "payload_too_large",
    422: "validation_error",
}
SINGLE, BATCH = "/v1/events", "/v1/events/batch"

PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        # `fresh` is a factory: each example takes a new, empty store from it
        HealthCheck.function_scoped_fixture,
    ],
)
# DynamoDB Local answers in milliseconds, not microseconds: its twins run this share of examples.
DYNAMODB_SHARE, DYNAMODB_MIN_EXAMPLES = 5, 10

Json = Any
Answer = tuple[int, Json]


def contract(examples: int, **strategies: Any) -> Callable[[Callable[..., None]], Any]:
    """A property of the HTTP contract, tried on `examples` examples over the in-memory store.
    Its twin `.on_dynamodb` is the same property on fewer examples, which
    tests/integration/test_properties_dynamodb.py runs over the DynamoDB store."""

    def decorate(test: Callable[..., None]) -> Any:
        on_memory = settings(PROPERTY, max_examples=examples)(given(**strategies)(test))
        fewer = max(examples // DYNAMODB_SHARE, DYNAMODB_MIN_EXAMPLES)
        on_memory.on_dynamodb = settings(PROPERTY, max_examples=fewer)(given(**strategies)(test))
        return on_memory

    return decorate


class StoreUnderTest(Protocol):
    """A store the API writes to, and what the properties read back from it."""

    store: Any  # handed to record_api / read_api

    def snapshot(self) -> object:
        """Everything stored, comparable: equal before and after a request that stored nothing."""
        ...

    def event_times(self) -> list[int]:
        """The event time of every stored event."""
        ...

    def units_recorded(self) -> int:
        """The units every counter holds."""
        ...

    def put_counter(
        self, customer: str, period: str, meter: str, quantity: int, reported: int
    ) -> None: ...


class MemoryStore:
    """The in-memory fake store (tests/fakes.py) under test."""

    def __init__(self) -> None:
        self.store = InMemoryStore()

    def snapshot(self) -> object:
        return (
            dict(self.store.events),
            copy.deepcopy(self.store.counters),
            set(self.store.in_backlog),
        )

    def event_times(self) -> list[int]:
        return [event.event_time for event in self.store.events.values()]

    def units_recorded(self) -> int:
        return sum(counter.quantity for counter in self.store.counters.values())

    def put_counter(
        self, customer: str, period: str, meter: str, quantity: int, reported: int
    ) -> None:
        self.store.counters[(customer, period, meter, 0)] = Counter(
            customer=customer,
            meter=meter,
            period_start=period,
            period_end=0,
            quantity=quantity,
            reported=reported,
        )


Fresh = Callable[[], StoreUnderTest]


@pytest.fixture
def fresh() -> Fresh:
    """A new, empty store for each example (here in memory)."""
    return MemoryStore


class Context:
    function_name = "properties"
    aws_request_id = "req-properties"


# --- requests --------------------------------------------------------------------------------


def authenticated(event: dict[str, Any]) -> dict[str, Any]:
    """The event as the authorizer passes it on; the API checks the principal again."""
    event["requestContext"]["authorizer"] = {"lambda": dict(ADMIN_KEY)}
    return event


def send(app: Any, event: dict[str, Any]) -> Answer:
    response = app.resolve(authenticated(event), Context())
    return response["statusCode"], json.loads(response["body"])


def post(
    target: StoreUnderTest,
    path: str,
    body: Json = None,
    *,
    raw_body: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    app = record_api(meters=METERS, store=target.store, now=lambda: NOW)
    return send(app, http_event("POST", path, body, headers=headers, raw_body=raw_body))


def post_json(target: StoreUnderTest, path: str, value: Json) -> Answer:
    """Any JSON value as the body, `null` included."""
    return post(target, path, raw_body=json.dumps(value))


def post_bytes(target: StoreUnderTest, path: str, raw: bytes) -> Answer:
    """Any bytes as the body, base64-encoded as API Gateway sends a body that is not text."""
    event = http_event("POST", path)
    event["body"], event["isBase64Encoded"] = base64.b64encode(raw).decode(), True
    app = record_api(meters=METERS, store=target.store, now=lambda: NOW)
    return send(app, event)


def get_usage(target: StoreUnderTest, customer_id: str) -> Answer:
    """The id percent-encoded, as a client puts it on the wire."""
    app = read_api(included=INCLUDED, store=target.store, now=lambda: NOW)
    return send(app, http_event("GET", f"/v1/customers/{quote(customer_id, safe='')}/usage"))


def seeded(target: StoreUnderTest) -> StoreUnderTest:
    """The store, once it holds one keyed event, so replays and conflicts can happen."""
    assert post(target, SINGLE, SEEDED_EVENT)[0] == 202
    return target


# --- the documented answers ------------------------------------------------------------------


def assert_is_error(status: int, body: Json) -> None:
    assert status in ERROR_CODES, status
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == ERROR_CODES[status]
    assert isinstance(error["message"], str) and isinstance(error["details"], list)
    assert all(isinstance(d, dict) and isinstance(d.get("field"), str) for d in error["details"])


def assert_is_record(body: Json) -> None:
    assert set(body) == {"id", "duplicate"}, body
    assert isinstance(body["id"], str) and body["id"].startswith("ev_")
    assert isinstance(body["duplicate"], bool)


def assert_documented(path: str, status: int, body: Json) -> None:
    if path == SINGLE and status in (200, 202):
        assert_is_record(body)
        assert body["duplicate"] is (status == 200)
    elif path == BATCH and status == 202:
        assert set(body) == {"results"} and body["results"], body
        for result in body["results"]:
            assert_is_record(result)
    else:
        assert_is_error(status, body)


def error_fields(body: Json) -> list[str]:
    return [detail["field"] for detail in body["error"]["details"]]


# --- strategies ------------------------------------------------------------------------------

any_text = st.text(st.characters(), max_size=20)  # lone surrogates included: JSON can carry them
wire_text = st.text(st.characters(codec="utf-8"), max_size=120)  # what an HTTP header can carry
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)
ALPHANUMERIC = st.sampled_from(string.ascii_letters + string.digits)
customers = st.just(CUSTOMER) | st.text(ALPHANUMERIC, min_size=1, max_size=24).map("cus_".__add__)
quantities = st.integers(min_value=1, max_value=MAX_QUANTITY)
in_window = st.integers(
    min_value=-int(MAX_AGE.total_seconds()), max_value=int(MAX_FUTURE.total_seconds())
)
keys = st.text(st.characters(codec="utf-8"), min_size=1, max_size=100)


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


unkeyed_events = st.fixed_dictionaries(
    {
        "stripe_customer_id": customers,
        "meter": st.sampled_from(sorted(METERS)),
        "quantity": quantities,
    },
    optional={"timestamp": in_window.map(lambda s: rfc3339(NOW + timedelta(seconds=s)))},
)
keyed_events = st.builds(
    lambda event, key: {**event, "idempotency_key": key},
    unkeyed_events,
    keys | st.just(SEEDED_KEY),
)
valid_events = unkeyed_events | keyed_events
EVENT_FIELDS = ("stripe_customer_id", "meter", "quantity", "timestamp", "idempotency_key")


@st.composite
def event_like(draw: st.DrawFn) -> dict[str, Json]:
    """A valid event with some fields dropped, replaced by any JSON value, or one added."""
    event = dict(draw(valid_events))
    for field in draw(st.sets(st.sampled_from(EVENT_FIELDS), max_size=2)):
        if draw(st.booleans()):
            event.pop(field, None)
        else:
            event[field] = draw(json_values)
    if draw(st.booleans()):
        event[draw(any_text)] = draw(json_values)
    return event


bodies = (
    json_values
    | valid_events
    | event_like()
    | st.builds(
        lambda events: {"events": events}, st.lists(valid_events | event_like(), max_size=4)
    )
)

# One way for one event to be invalid; each names a field of that event.
INVALIDATIONS: list[tuple[str, Json]] = [
    ("quantity", 0),
    ("quantity", -3),
    ("quantity", True),
    ("quantity", 2.5),
    ("quantity", "7"),
    ("quantity", MAX_QUANTITY + 1),
    ("meter", "unknown_meter"),
    ("meter", ""),
    ("stripe_customer_id", "acct_1"),
    ("stripe_customer_id", "cus_a-b"),
    ("timestamp", rfc3339(NOW + MAX_FUTURE + timedelta(seconds=1))),
    ("timestamp", rfc3339(NOW - MAX_AGE - timedelta(seconds=1))),
    ("timestamp", "yesterday"),
    ("idempotency_key", ""),
    ("idempotency_key", "k" * 101),
    ("colour", "red"),
]


# --- any body --------------------------------------------------------------------------------


@contract(300, path=st.sampled_from([SINGLE, BATCH]), body=bodies)
def test_any_json_body_gets_a_documented_answer_and_a_rejection_stores_nothing(
    fresh: Fresh, path: str, body: Json
) -> None:
    # Given a store holding one keyed event
    store = seeded(fresh())
    before = store.snapshot()
    # When any JSON value is posted to a record route
    status, answer = post_json(store, path, body)
    # Then the status is documented, the body has its shape, and a rejection changed nothing
    assert status in {200, 202, 400, 409, 413, 422}
    assert_documented(path, status, answer)
    if status >= 400:
        assert store.snapshot() == before


@contract(
    200,
    path=st.sampled_from([SINGLE, BATCH]),
    raw=st.binary(max_size=200) | valid_events.map(lambda e: json.dumps(e).encode()),
)
def test_any_bytes_as_the_body_get_a_documented_answer(fresh: Fresh, path: str, raw: bytes) -> None:
    # Given a store holding one keyed event
    store = seeded(fresh())
    before = store.snapshot()
    # When any bytes are posted, base64-encoded as API Gateway passes binary bodies
    status, answer = post_bytes(store, path, raw)
    # Then bytes that are not UTF-8 JSON are a 400, and nothing answers 5xx
    assert_documented(path, status, answer)
    if status >= 400:
        assert store.snapshot() == before


@contract(150, path=st.sampled_from([SINGLE, BATCH]), raw=st.text(st.characters(codec="utf-8")))
def test_any_text_as_the_body_gets_a_documented_answer(fresh: Fresh, path: str, raw: str) -> None:
    # Given an empty store
    store = fresh()
    # When any text is posted as the body
    status, answer = post(store, path, raw_body=raw)
    # Then it is an error of the documented shape (text that is not a valid event is never one)
    assert_is_error(status, answer)
    assert store.event_times() == []


@contract(
    60,
    size=st.integers(min_value=MAX_BODY_BYTES - 8, max_value=MAX_BODY_BYTES + 8),
    pad=st.sampled_from(["x", "é", "😀"]),
)
def test_a_body_over_64_kib_is_413_counted_in_bytes(fresh: Fresh, size: int, pad: str) -> None:
    # Given a valid event padded with an unknown field to about `size` bytes of UTF-8
    store = fresh()
    head = json.dumps({**SEEDED_EVENT, "pad": ""}, ensure_ascii=False)
    room = size - len(head.encode())
    raw = head[:-2] + pad * max(room // len(pad.encode()), 0) + head[-2:]
    # When it is posted
    status, answer = post(store, SINGLE, raw_body=raw)
    # Then it is 413 exactly when its UTF-8 is over the limit, and 422 (unknown field) otherwise
    assert status == (413 if len(raw.encode()) > MAX_BODY_BYTES else 422)
    assert_is_error(status, answer)
    assert store.event_times() == []


# --- quantities ------------------------------------------------------------------------------

not_quantities = (
    st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.none()
    | st.lists(st.integers(), max_size=2)
    | st.integers(min_value=-(10**30), max_value=0)
    | st.integers(min_value=MAX_QUANTITY + 1, max_value=10**30)
)


@contract(200, quantity=not_quantities, event=unkeyed_events)
def test_a_quantity_that_is_not_an_integer_from_1_to_a_trillion_is_422(
    fresh: Fresh, quantity: Json, event: dict[str, Json]
) -> None:
    # Given an empty store and an otherwise valid event
    store = fresh()
    # When its quantity is a boolean, float, string, null, list, or an int out of range
    status, answer = post(store, SINGLE, {**event, "quantity": quantity})
    # Then it is 422 naming the quantity alone, and nothing is stored
    assert (status, error_fields(answer)) == (422, ["quantity"])
    assert store.event_times() == [] and store.units_recorded() == 0


@contract(100, quantity=quantities | st.sampled_from([1, MAX_QUANTITY]), event=unkeyed_events)
def test_an_integer_quantity_from_1_to_a_trillion_is_recorded_as_sent(
    fresh: Fresh, quantity: int, event: dict[str, Json]
) -> None:
    # Given an empty store
    store = fresh()
    # When a valid event carries the quantity
    status, answer = post(store, SINGLE, {**event, "quantity": quantity})
    # Then it is accepted and counted exactly
    assert status == 202 and answer["duplicate"] is False
    assert store.units_recorded() == quantity


# --- idempotency -----------------------------------------------------------------------------


@contract(150, event=unkeyed_events, key=keys, key_in_header=st.booleans())
def test_a_replay_with_the_same_key_is_200_with_the_same_id_and_counts_once(
    fresh: Fresh, event: dict[str, Json], key: str, key_in_header: bool
) -> None:
    # Given an event recorded with an idempotency key
    store = fresh()
    first_status, first = post(store, SINGLE, {**event, "idempotency_key": key})
    # When it is sent again with the same key, in the header or the body
    if key_in_header:
        status, again = post(store, SINGLE, event, headers={"Idempotency-Key": key})
    else:
        status, again = post(store, SINGLE, {**event, "idempotency_key": key})
    # Then the replay answers 200 with the original id, and the units count once
    assert first_status == 202
    assert (status, again) == (200, {"id": first["id"], "duplicate": True})
    assert len(store.event_times()) == 1 and store.units_recorded() == event["quantity"]


@st.composite
def another_body(draw: st.DrawFn, event: dict[str, Json]) -> dict[str, Json]:
    """The same customer and key with a body that differs in what is billed."""
    change = draw(st.sampled_from(["quantity", "meter", "timestamp"]))
    if change == "quantity":
        quantity = event["quantity"]
        return {**event, "quantity": quantity + 1 if quantity < MAX_QUANTITY else quantity - 1}
    if change == "meter":
        return {**event, "meter": next(m for m in sorted(METERS) if m != event["meter"])}
    if "timestamp" in event:  # dropping it means "now": another moment
        return {field: value for field, value in event.items() if field != "timestamp"}
    moved = NOW - timedelta(seconds=draw(st.integers(min_value=1, max_value=3600)))
    return {**event, "timestamp": rfc3339(moved)}


@contract(150, data=st.data(), event=keyed_events)
def test_the_same_key_with_another_body_is_409_and_changes_nothing(
    fresh: Fresh, data: st.DataObject, event: dict[str, Json]
) -> None:
    # Given an event recorded with an idempotency key
    store = fresh()
    assert post(store, SINGLE, event)[0] == 202
    before = store.snapshot()
    # When the key comes back with a different quantity, meter or timestamp
    status, answer = post(store, SINGLE, data.draw(another_body(event)))
    # Then it is 409 and the store is unchanged
    assert status == 409 and error_fields(answer) == ["idempotency_key"]
    assert store.snapshot() == before


# --- odd unicode in keys and headers ---------------------------------------------------------

header_names = wire_text.filter(lambda name: name.strip() != "").filter(
    lambda name: name.lower() != "idempotency-key"
)


@contract(
    200,
    key=wire_text,
    other_headers=st.dictionaries(header_names, wire_text, max_size=3),
    event=unkeyed_events,
)
def test_any_unicode_idempotency_key_header_is_accepted_exactly_when_1_to_100_chars(
    fresh: Fresh, key: str, other_headers: dict[str, str], event: dict[str, Json]
) -> None:
    # Given a valid event without a key in its body
    store = fresh()
    # When the Idempotency-Key header carries any text: control characters, emoji, NUL, ...
    headers = {**other_headers, "Idempotency-Key": key}
    status, answer = post(store, SINGLE, event, headers=headers)
    # Then a key of 1 to 100 characters is accepted and any other is 422 on the key
    if 1 <= len(key) <= 100:
        assert status == 202 and len(store.event_times()) == 1
    else:
        assert (status, error_fields(answer)) == (422, ["idempotency_key"])
        assert store.event_times() == []


@contract(100, key=wire_text, event=unkeyed_events)
def test_the_batch_route_refuses_any_idempotency_key_header(
    fresh: Fresh, key: str, event: dict[str, Json]
) -> None:
    # Given a valid batch
    store = fresh()
    # When it comes with an Idempotency-Key header of any text
    status, answer = post(store, BATCH, {"events": [event]}, headers={"Idempotency-Key": key})
    # Then it is 422 on the header and nothing is stored
    assert (status, error_fields(answer)) == (422, ["Idempotency-Key"])
    assert store.event_times() == []


@contract(
    200, key=st.text(st.characters(), max_size=110), event=unkeyed_events, batch=st.booleans()
)
def test_any_unicode_idempotency_key_in_the_body_is_accepted_exactly_when_valid_text(
    fresh: Fresh, key: str, event: dict[str, Json], batch: bool
) -> None:
    # Given a valid event whose key is any string JSON can carry, lone surrogates included
    store = fresh()
    keyed = {**event, "idempotency_key": key}
    # When it is posted alone or in a batch
    path, body = (BATCH, {"events": [keyed]}) if batch else (SINGLE, keyed)
    status, answer = post(store, path, body)
    # Then 1 to 100 characters of real text are accepted; anything else is 422 on the key
    is_text = not any(0xD800 <= ord(c) <= 0xDFFF for c in key)
    if is_text and 1 <= len(key) <= 100:
        assert status == 202 and len(store.event_times()) == 1
    else:
        field = "events[0].idempotency_key" if batch else "idempotency_key"
        assert (status, error_fields(answer)) == (422, [field])
        assert store.event_times() == []


# --- batches ---------------------------------------------------------------------------------


@contract(40, event=unkeyed_events, count=st.integers(min_value=0, max_value=MAX_BATCH_EVENTS + 5))
def test_a_batch_is_accepted_exactly_when_it_has_1_to_100_events(
    fresh: Fresh, event: dict[str, Json], count: int
) -> None:
    # Given a store holding one keyed event
    store = seeded(fresh())
    before = store.snapshot()
    # When `count` valid unkeyed events are posted as one batch
    status, answer = post(store, BATCH, {"events": [event] * count})
    # Then 1 to 100 are all stored; 0 or 101 and more are 422 on `events`, storing nothing
    if 1 <= count <= MAX_BATCH_EVENTS:
        assert status == 202 and len(answer["results"]) == count
        assert len(store.event_times()) == 1 + count
    else:
        assert (status, error_fields(answer)) == (422, ["events"])
        assert store.snapshot() == before


@contract(60, data=st.data(), events=st.lists(keyed_events, min_size=2, max_size=10))
def test_the_same_idempotency_key_twice_in_one_batch_is_422_naming_the_repeat(
    fresh: Fresh, data: st.DataObject, events: list[dict[str, Json]]
) -> None:
    # Given a batch whose events carry distinct keys, except event j repeats event i's
    events = [{**event, "idempotency_key": f"k{index}"} for index, event in enumerate(events)]
    i = data.draw(st.integers(min_value=0, max_value=len(events) - 2), label="i")
    j = data.draw(st.integers(min_value=i + 1, max_value=len(events) - 1), label="j")
    events[j] = {
        **events[j],
        "stripe_customer_id": events[i]["stripe_customer_id"],
        "idempotency_key": events[i]["idempotency_key"],
    }
    store = seeded(fresh())
    before = store.snapshot()
    # When it is posted
    status, answer = post(store, BATCH, {"events": events})
    # Then it is 422 naming the repeat, and nothing is stored
    assert status == 422 and f"events[{j}].idempotency_key" in error_fields(answer)
    assert store.snapshot() == before


@contract(
    150,
    data=st.data(),
    events=st.lists(unkeyed_events, min_size=1, max_size=20),
    invalidation=st.sampled_from(INVALIDATIONS) | st.sampled_from(EVENT_FIELDS[:3]),
)
def test_one_invalid_event_anywhere_in_a_batch_is_422_naming_it_and_stores_nothing(
    fresh: Fresh,
    data: st.DataObject,
    events: list[dict[str, Json]],
    invalidation: tuple[str, Json] | str,
) -> None:
    # Given valid events, one of which is spoilt: a bad value, an unknown field, a missing one
    index = data.draw(st.integers(min_value=0, max_value=len(events) - 1), label="index")
    spoilt = dict(events[index])
    if isinstance(invalidation, str):
        del spoilt[invalidation]
    else:
        field, value = invalidation
        spoilt[field] = value
    events[index] = spoilt
    store = seeded(fresh())
    before = store.snapshot()
    # When the batch is posted
    status, answer = post(store, BATCH, {"events": events})
    # Then it is 422, every problem is on that event, and nothing is stored
    fields = error_fields(answer)
    assert status == 422 and fields
    assert all(field.startswith(f"events[{index}].") for field in fields), fields
    assert store.snapshot() == before


# --- timestamps ------------------------------------------------------------------------------

WINDOW_EDGES = [
    -int(MAX_AGE.total_seconds()) - 1,
    -int(MAX_AGE.total_seconds()),
    0,
    int(MAX_FUTURE.total_seconds()),
    int(MAX_FUTURE.total_seconds()) + 1,
]


@st.composite
def rfc3339_forms(draw: st.DrawFn, moment: datetime) -> str:
    """`moment` written in any RFC 3339 form: any offset, `T` or `t`, `Z` or `z`, 0-9 digits
    of a fraction of a second (which the API drops)."""
    minutes = draw(st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
    local = moment.astimezone(timezone(timedelta(minutes=minutes)))
    fraction = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,9}", fullmatch=True)))
    if minutes == 0 and draw(st.booleans()):
        offset = draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if minutes < 0 or (minutes == 0 and draw(st.booleans())) else "+"
        offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    separator = draw(st.sampled_from(["T", "t"]))
    return f"{local:%Y-%m-%d}{separator}{local:%H:%M:%S}{fraction}{offset}"


@contract(
    300,
    data=st.data(),
    seconds_from_now=st.integers(min_value=-40 * 86400, max_value=86400)
    | st.sampled_from(WINDOW_EDGES),
    as_unix_seconds=st.booleans(),
    event=unkeyed_events,
)
def test_a_timestamp_is_accepted_exactly_when_inside_the_window(
    fresh: Fresh,
    data: st.DataObject,
    seconds_from_now: int,
    as_unix_seconds: bool,
    event: dict[str, Json],
) -> None:
    # Given a moment between 40 days ago and a day ahead, as Unix seconds or RFC 3339
    moment = NOW + timedelta(seconds=seconds_from_now)
    timestamp: int | str = (
        int(moment.timestamp()) if as_unix_seconds else data.draw(rfc3339_forms(moment))
    )
    store = fresh()
    # When an event carries it
    status, answer = post(store, SINGLE, {**event, "timestamp": timestamp})
    # Then it is accepted, at that moment, exactly when no more than 33 days old or 5 min ahead
    if NOW - MAX_AGE <= moment <= NOW + MAX_FUTURE:
        assert status == 202
        assert store.event_times() == [int(moment.timestamp())]
    else:
        assert (status, error_fields(answer)) == (422, ["timestamp"])
        assert store.event_times() == []


@contract(150, unix_seconds=st.integers(min_value=-(2**70), max_value=2**70), event=unkeyed_events)
def test_any_integer_timestamp_is_accepted_exactly_when_inside_the_window(
    fresh: Fresh, unix_seconds: int, event: dict[str, Json]
) -> None:
    # Given any integer as the timestamp, far outside datetime's range included
    store = fresh()
    # When an event carries it
    status, answer = post(store, SINGLE, {**event, "timestamp": unix_seconds})
    # Then only the window is accepted
    inside = (NOW - MAX_AGE).timestamp() <= unix_seconds <= (NOW + MAX_FUTURE).timestamp()
    assert status == (202 if inside else 422)
    assert_documented(SINGLE, status, answer)


# --- reading usage ---------------------------------------------------------------------------


@contract(
    300,
    customer_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
    | customers
    | st.text(ALPHANUMERIC, min_size=248, max_size=255).map("cus_".__add__),
)
def test_a_usage_read_for_any_customer_id_is_200_or_422(fresh: Fresh, customer_id: str) -> None:
    # Given an empty store
    store = fresh()
    # When any string is read as a customer id
    status, answer = get_usage(store, customer_id)
    # Then a Stripe customer id (at most 255 characters) is 200 and anything else is 422
    if CUSTOMER_ID.fullmatch(customer_id) and len(customer_id) <= 255:
        assert status == 200 and answer["stripe_customer_id"] == customer_id
    else:
        assert (status, error_fields(answer)) == (422, ["stripe_customer_id"])


counts = st.integers(min_value=0, max_value=MAX_QUANTITY * 1000)
counters = st.dictionaries(
    st.sampled_from([*sorted(INCLUDED), "retired_meter"]),
    st.tuples(counts, counts).map(sorted).map(tuple),  # (reported, quantity), reported <= quantity
    max_size=3,
)


@contract(200, mine=counters, noise=counters)
def test_usage_shows_every_configured_meter_with_quantity_equal_to_reported_plus_pending(
    fresh: Fresh, mine: dict[str, tuple[int, int]], noise: dict[str, tuple[int, int]]
) -> None:
    # Given period counters for this customer now, and for another customer and last month
    store = fresh()
    this_period = period_key(calendar_month(NOW))
    last_period = period_key(calendar_month(NOW - timedelta(days=31)))
    for meter, (reported, quantity) in mine.items():
        store.put_counter(CUSTOMER, this_period, meter, quantity, reported)
    for meter, (reported, quantity) in noise.items():
        store.put_counter("cus_Other1", this_period, meter, quantity + 1, reported)
        store.put_counter(CUSTOMER, last_period, meter, quantity + 2, reported)
    # When the customer's usage is read
    status, answer = get_usage(store, CUSTOMER)
    # Then every configured meter appears once, from this customer's current counters only
    assert status == 200
    assert [m["meter"] for m in answer["meters"]] == sorted(INCLUDED)
    for shown in answer["meters"]:
        reported, quantity = mine.get(shown["meter"], (0, 0))
        included = INCLUDED[shown["meter"]]
        assert shown == {
            "meter": shown["meter"],
            "quantity": quantity,
            "reported": reported,
            "pending": quantity - reported,
            "included": included,
            "included_remaining": max(included - quantity, 0),
            "billable": max(quantity - included, 0),
        }
        assert shown["quantity"] == shown["reported"] + shown["pending"]


# --- defects these properties found, now fixed -------------------------------------------


def test_deeply_nested_json_under_64_kib_is_400_not_500(fresh: Fresh) -> None:
    # Given a body of 20,000 nested arrays: 40 KB, well under the size limit
    store = fresh()
    # When it is posted
    status, answer = post(store, SINGLE, raw_body="[" * 20_000 + "]" * 20_000)
    # Then it is refused as invalid JSON, not a 500
    assert (status, answer["error"]["code"]) == (400, "invalid_json")


@pytest.mark.parametrize("timestamp", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_a_timestamp_at_the_edge_of_the_calendar_is_422_not_500(
    fresh: Fresh, timestamp: str
) -> None:
    # Given an RFC 3339 timestamp whose UTC instant falls outside years 1-9999
    store = fresh()
    # When an event carries it
    status, answer = post(store, SINGLE, {**SEEDED_EVENT, "timestamp": timestamp})
    # Then it is 422 on the timestamp, not a 500
    assert (status, error_fields(answer)) == (422, ["timestamp"])
