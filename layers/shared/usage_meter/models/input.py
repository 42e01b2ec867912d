"""Request bodies of the HTTP API (DESIGN §4). Constraints live on the fields."""

import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator

MAX_QUANTITY = 1_000_000_000_000
MAX_BATCH_EVENTS = 100

CustomerId = Annotated[
    str, StringConstraints(pattern=r"^cus_[A-Za-z0-9]+$", min_length=5, max_length=255)
]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=100)]

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
# Unix seconds before 2001 or after 2286 are typos, not usage.
_MIN_UNIX, _MAX_UNIX = 1_000_000_000, 9_999_999_999


def parse_timestamp(value: int | str) -> datetime:
    """RFC 3339 with an offset, or whole Unix seconds; sub-second digits are dropped."""
    if isinstance(value, int):
        if not _MIN_UNIX <= value <= _MAX_UNIX:
            raise ValueError("Unix timestamp out of range")
        return datetime.fromtimestamp(value, UTC)
    match = _RFC3339.match(value)
    if not match:
        raise ValueError("must be RFC 3339 with an offset (2026-11-26T08:00:00Z) or Unix seconds")
    date, time, _fraction, offset = match.groups()
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return datetime.fromisoformat(f"{date}T{time}{offset}").astimezone(UTC)
    except OverflowError:
        raise ValueError("outside the range of dates") from None
    except ValueError as error:
        raise ValueError(f"not a real date or time: {error}") from None


class EventIn(BaseModel):
    """One usage event as a client sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    stripe_customer_id: CustomerId
    meter: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    quantity: Annotated[StrictInt, Field(ge=1, le=MAX_QUANTITY)]
    timestamp: datetime | None = None
    idempotency_key: IdempotencyKey | None = None

    @field_validator("timestamp", mode="before", json_schema_input_type=int | datetime | None)
    @classmethod
    def _timestamp(cls, value: object) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("must be an RFC 3339 string or an integer of Unix seconds")
        return parse_timestamp(value)


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_BATCH_EVENTS)]


class PortalTokenIn(BaseModel):
    """A request for a portal token: read-only access to one customer's usage."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    stripe_customer_id: CustomerId
    ttl_seconds: Annotated[StrictInt, Field(ge=60, le=24 * 3600)] = 3600
