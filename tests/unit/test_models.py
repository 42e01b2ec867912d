from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from usage_meter.models.input import BatchIn, EventIn

VALID = {"stripe_customer_id": "cus_Q1w2E3r4", "meter": "ai_messages", "quantity": 1}


def errors_for(**changes: object) -> list[str]:
    with pytest.raises(ValidationError) as raised:
        EventIn.model_validate({**VALID, **changes})
    return [".".join(map(str, e["loc"])) for e in raised.value.errors()]


def test_a_minimal_event_is_valid():
    # Given the three required fields / When validated / Then the optional ones are absent
    event = EventIn.model_validate(VALID)
    assert (event.quantity, event.timestamp, event.idempotency_key) == (1, None, None)


@pytest.mark.parametrize("quantity", [True, False, 1.0, 1.5, "1", 0, -1, 10**12 + 1, None])
def test_quantity_must_be_an_integer_from_1_to_a_trillion(quantity):
    assert errors_for(quantity=quantity) == ["quantity"]


def test_the_largest_quantity_is_accepted():
    assert EventIn.model_validate({**VALID, "quantity": 10**12}).quantity == 10**12


@pytest.mark.parametrize("customer", ["", "cus_", "cust_1", "cus_a-b", "cus_ä", "CUS_1", 7, None])
def test_customer_must_be_cus_followed_by_letters_and_digits(customer):
    assert errors_for(stripe_customer_id=customer) == ["stripe_customer_id"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-11-26T08:00:00Z", datetime(2026, 11, 26, 8, tzinfo=UTC)),
        ("2026-11-26T09:30:00+01:30", datetime(2026, 11, 26, 8, tzinfo=UTC)),
        ("2026-11-26T08:00:00.987654321Z", datetime(2026, 11, 26, 8, tzinfo=UTC)),
        (1795680000, datetime(2026, 11, 26, 8, tzinfo=UTC)),
    ],
)
def test_timestamp_accepts_rfc3339_with_offset_or_unix_seconds(given, expected):
    assert EventIn.model_validate({**VALID, "timestamp": given}).timestamp == expected


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-11-26T08:00:00",
        "2026-11-26",
        "yesterday",
        "2026-02-30T08:00:00Z",
        1.5,
        True,
        12,
        [],
        10**12,
    ],
)
def test_timestamp_without_offset_or_malformed_is_rejected(timestamp):
    assert errors_for(timestamp=timestamp) == ["timestamp"]


def test_unknown_fields_are_rejected():
    assert errors_for(price=3) == ["price"]


@pytest.mark.parametrize("key", ["", "k" * 101, 5])
def test_idempotency_key_is_a_string_of_1_to_100_characters(key):
    assert errors_for(idempotency_key=key) == ["idempotency_key"]


def test_a_batch_holds_1_to_100_events():
    # Given batches of 0, 100 and 101 events
    assert BatchIn.model_validate({"events": [VALID] * 100})
    for size in (0, 101):
        with pytest.raises(ValidationError):
            BatchIn.model_validate({"events": [VALID] * size})
