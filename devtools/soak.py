"""Run the suite many times, each in another random order and on another clock: what flakes.

    make soak                                  # 20 runs of tests/
    make soak RUNS=3 PATHS=tests/unit
    python -m devtools.soak --runs 20 --clocks real,month-rollover tests/unit tests/integration

Run n takes a fresh pytest-randomly seed and the n-th clock of --clocks in turn: the real one,
or the whole run started just before an hour boundary or the Dec 31 -> Jan 1 rollover
(USAGE_METER_TEST_CLOCK, tests/clock.py). It prints one line per run and the table, writes the
table and each run's output under --out, and exits 1 if any run had a failure or error. A
failed run's line is the command that repeats it (same seed, same clock).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCK_VARIABLE = "USAGE_METER_TEST_CLOCK"
CLOCKS = ("real", "hour-boundary", "month-rollover")
DEFAULT_OUT = REPO_ROOT / ".local" / "soak"


@dataclass(frozen=True)
class Run:
    number: int
    seed: int
    clock: str
    passed: int
    failed: int  # failures and errors
    skipped: int
    seconds: float
    exit_code: int
    log: Path

    @property
    def ok(self) -> bool:
        # pytest's own exit code too: a crash or an interrupted run counts no failure
        return self.failed == 0 and self.exit_code == 0


def pytest_command(paths: list[str], seed: int, junit: Path) -> list[str]:
    # -p randomly turns random order on even where addopts turns it off
    return [
        *(sys.executable, "-m", "pytest", *paths),
        *("-p", "randomly", f"--randomly-seed={seed}", "-q", f"--junitxml={junit}"),
    ]


def repeat_command(paths: list[str], seed: int, clock: str) -> str:
    """What a person types to run it again."""
    words = [".venv/bin/python", "-m", "pytest", *paths, f"--randomly-seed={seed}"]
    return f"{CLOCK_VARIABLE}={clock} " + shlex.join(words)


def counts(junit: Path) -> tuple[int, int, int]:
    """(passed, failed or errored, skipped) from pytest's JUnit XML; zeros if it wrote none."""
    try:
        suite = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return 0, 0, 0
    if suite.tag == "testsuites":
        suite = suite[0]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return total - failed - skipped, failed, skipped


def run_once(number: int, paths: list[str], seed: int, clock: str, out: Path) -> Run:
    log, junit = out / f"run-{number:02d}.log", out / f"run-{number:02d}.xml"
    junit.unlink(missing_ok=True)
    started = time.monotonic()
    with log.open("w") as output:
        done = subprocess.run(
            pytest_command(paths, seed, junit),
            cwd=REPO_ROOT,
            env={**os.environ, CLOCK_VARIABLE: clock},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    passed, failed, skipped = counts(junit)
    seconds = time.monotonic() - started
    return Run(number, seed, clock, passed, failed, skipped, seconds, done.returncode, log)


def table(runs: list[Run]) -> str:
    lines = [
        "| run | seed | clock | passed | failed | skipped | seconds | exit |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.number} | {r.seed} | {r.clock} | {r.passed} | {r.failed} | {r.skipped} "
        f"| {r.seconds:.0f} | {r.exit_code} |"
        for r in runs
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="*", default=["tests"], help="what pytest runs (tests)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--clocks",
        default=",".join(CLOCKS),
        help=f"comma-separated, taken in turn (default {','.join(CLOCKS)}); an ISO instant too",
    )
    parser.add_argument("--seed", type=int, help="the first run's seed, then +1 (default random)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    clocks = [c.strip() for c in args.clocks.split(",") if c.strip()]
    if args.runs < 1 or not clocks:
        parser.error("at least one run and one clock")
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    out = args.out / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)

    runs = []
    for number in range(1, args.runs + 1):
        seed, clock = (first + number - 1) % 2**32, clocks[(number - 1) % len(clocks)]
        print(f"run {number}/{args.runs}: seed {seed}, clock {clock} ...", flush=True)
        run = run_once(number, args.paths, seed, clock, out)
        runs.append(run)
        verdict = "ok" if run.ok else f"FAILED, log {run.log}; again: "
        again = "" if run.ok else repeat_command(args.paths, seed, clock)
        print(
            f"  {run.passed} passed, {run.failed} failed, {run.skipped} skipped "
            f"in {run.seconds:.0f} s: {verdict}{again}",
            flush=True,
        )

    failures = [r for r in runs if not r.ok]
    summary = (
        f"{len(runs)} runs of {' '.join(args.paths)}: {len(failures)} with failures"
        f" (pytest -p randomly, {CLOCK_VARIABLE} cycling {','.join(clocks)})"
    )
    report = f"{table(runs)}\n\n{summary}\n"
    for run in failures:
        report += f"\nrun {run.number}: {repeat_command(args.paths, run.seed, run.clock)}"
    (out / "table.md").write_text(report + "\n")
    print(f"\n{report}\ntable and logs: {out}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
