"""The test run's clock: real, or forced near a boundary for a whole run (tests/conftest.py).

    USAGE_METER_TEST_CLOCK=hour-boundary   make test   # starts LEAD_SECONDS before the next hour
    USAGE_METER_TEST_CLOCK=month-rollover  make test   # ... before the next Dec 31 -> Jan 1
    USAGE_METER_TEST_CLOCK=2027-02-28T23:59:50Z make test

The forced clock ticks from there (time-machine), in this process only: DynamoDB Local and the
functions in Lambda emulators keep the real one. Tests of those functions (tests/e2e,
tests/browser) therefore run on_real_clock(): the stand-ins in this process (Stripe, the local
API, portals) and the times a test sends must agree with the functions' clock. A test that
records through them and then reads the month's usage waits out a month end first
(wait_out_month_end), as nothing can move their clock.

In this process, a test whose code reads the clock itself and must not straddle a boundary
travels to a quiet_instant() (the quiet_clock fixture); where the code takes a clock, it is
given one.
"""

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import time_machine

CLOCK_VARIABLE = "USAGE_METER_TEST_CLOCK"
CLOCKS = ("real", "hour-boundary", "month-rollover")  # or an ISO 8601 instant
LEAD_SECONDS = 15  # the first tests of a run straddle the boundary


class ClockSettingError(ValueError):
    pass


def forced_instant(setting: str, now: datetime) -> datetime | None:
    """Where the run's clock starts for a setting; None for the real clock."""
    lead = timedelta(seconds=LEAD_SECONDS)
    if setting in ("", "real"):
        return None
    if setting == "hour-boundary":
        return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1) - lead
    if setting == "month-rollover":  # the year's last month boundary: day, month and year roll
        return datetime(now.year + 1, 1, 1, tzinfo=UTC) - lead
    try:
        instant = datetime.fromisoformat(setting)
    except ValueError:
        raise ClockSettingError(
            f"{CLOCK_VARIABLE}={setting!r}: expected one of {', '.join(CLOCKS)} "
            "or an ISO 8601 instant with its offset (2027-02-28T23:59:50Z)"
        ) from None
    if instant.tzinfo is None:
        raise ClockSettingError(f"{CLOCK_VARIABLE}={setting!r} needs an offset, e.g. Z")
    return instant.astimezone(UTC)


def real_time() -> float:
    """The wall clock of the other processes (DynamoDB Local, the Lambda emulators), even
    while this one's is forced."""
    if time_machine.escape_hatch.is_travelling():
        return time_machine.escape_hatch.time.time()
    return time.time()


@contextlib.contextmanager
def on_real_clock() -> Iterator[None]:
    """The real clock, ticking, inside a forced one (time-machine's travels nest)."""
    if not time_machine.escape_hatch.is_travelling():
        yield
        return
    with time_machine.travel(real_time(), tick=True):
        yield


def quiet_instant(now: float) -> float:
    """The 15th of now's month at 12:30 UTC: two weeks from a month boundary and half an hour
    from an hour boundary, whatever the wall clock says."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=15, hour=12, minute=30, second=0, microsecond=0).timestamp()


def wait_out_month_end(margin_seconds: float) -> None:
    """If a month ends (UTC, real clock) within margin_seconds, wait until it has: for a test
    that records through the functions, on the real clock, and then reads that month's usage."""
    now = datetime.fromtimestamp(real_time(), UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    left = (next_month - now).total_seconds()
    if left < margin_seconds:
        time.sleep(left + 1)  # not a poll: the functions' clock can only be waited for
