"""The test run's clock (tests/clock.py): forced near a boundary for a whole run, set aside where
a test needs the real one, and never mistyped silently."""

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine

from tests import clock
from tests.clock import (
    CLOCK_VARIABLE,
    ClockSettingError,
    forced_instant,
    on_real_clock,
    quiet_instant,
    real_time,
    wait_out_month_end,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 30, 6, 17, 34, tzinfo=UTC)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("", None),
        ("real", None),
        ("hour-boundary", datetime(2026, 11, 30, 6, 59, 45, tzinfo=UTC)),
        ("month-rollover", datetime(2026, 12, 31, 23, 59, 45, tzinfo=UTC)),
        ("2027-02-28T23:59:50Z", datetime(2027, 2, 28, 23, 59, 50, tzinfo=UTC)),
        ("2027-03-01T01:59:50+02:00", datetime(2027, 2, 28, 23, 59, 50, tzinfo=UTC)),
    ],
)
def test_a_setting_names_where_the_run_starts(setting, expected):
    assert forced_instant(setting, NOW) == expected


def test_on_an_hour_the_boundary_is_the_next_one():
    assert forced_instant("hour-boundary", NOW.replace(minute=0, second=0)) == NOW.replace(
        minute=59, second=45
    )


@pytest.mark.parametrize("setting", ["month-end", "2027-02-28 23:59:50", "tomorrow"])
def test_a_mistyped_or_naive_setting_is_refused(setting):
    with pytest.raises(ClockSettingError, match=CLOCK_VARIABLE):
        forced_instant(setting, NOW)


ON_THE_CLOCK = "test_the_run_is_on_the_clock_it_was_given"


def test_the_run_is_on_the_clock_it_was_given(forced_clock):
    # Given the run's clock (forced when USAGE_METER_TEST_CLOCK is set, as `make soak` does)
    now = datetime.now(UTC)
    seen: list[float] = []
    thread = threading.Thread(target=lambda: seen.append(time.time()))
    thread.start()
    thread.join()
    if forced_clock is None:
        assert abs(now.timestamp() - real_time()) < 5
    else:
        # It started there with the first test, and has been ticking since
        assert forced_clock <= now < forced_clock + timedelta(hours=2)
    # and threads share it
    assert abs(seen[0] - now.timestamp()) < 5


def test_a_forced_run_starts_there_and_a_mistyped_one_stops(tmp_path):
    # Given this module's clock test, run alone on a forced clock far from the real one
    def run(setting: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", f"{__file__}::{ON_THE_CLOCK}", "-q"],
            cwd=ROOT,
            env={**os.environ, CLOCK_VARIABLE: setting},
            capture_output=True,
            text=True,
            timeout=120,
        )

    forced = run("2031-05-05T10:00:00Z")
    mistyped = run("month-end")
    # Then the forced run passes it, and a mistyped setting stops the run before any test
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "1 passed" in forced.stdout
    assert mistyped.returncode == pytest.ExitCode.USAGE_ERROR
    assert "expected one of real, hour-boundary, month-rollover" in mistyped.stderr


def test_the_real_clock_can_be_read_and_restored_inside_a_forced_one():
    with time_machine.travel(datetime(2031, 5, 5, tzinfo=UTC), tick=True):
        assert abs(real_time() - time_machine.escape_hatch.time.time()) < 1
        with on_real_clock():
            assert abs(time.time() - real_time()) < 1
        assert time.time() < datetime(2031, 5, 6, tzinfo=UTC).timestamp()


def test_the_quiet_instant_is_mid_month_and_mid_hour():
    assert quiet_instant(NOW.timestamp()) == datetime(2026, 11, 15, 12, 30, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("now", "slept"),
    [
        (datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC), 31.0),  # 30 s left, within the margin
        (datetime(2026, 11, 30, 23, 58, 0, tzinfo=UTC), None),  # 2 minutes left
        (datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC), None),  # just begun
    ],
)
def test_a_month_end_within_the_margin_is_waited_out(monkeypatch, now, slept):
    sleeps: list[float] = []
    monkeypatch.setattr(clock, "real_time", lambda: now.timestamp())
    monkeypatch.setattr(clock.time, "sleep", sleeps.append)
    wait_out_month_end(60)
    assert sleeps == ([] if slept is None else [slept])
