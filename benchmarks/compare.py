"""Issue 9's figures, old design next to new, in one run: `make bench`.

One DynamoDB Local serves both designs, one after the other. Each design runs
`benchmarks.scenarios` in its own interpreter with PYTHONPATH at its own layers/shared and
builds its tables from its own template.yaml. The old design is the commit before the flush
redesign (BASELINE), unpacked with `git archive` into .local/bench-baseline/; without git
history that column is skipped with a message.

Prints the tables as Markdown and, unless --no-readme, rewrites the README between the
`bench:start` / `bench:end` markers (and nothing else). Exits 1 when a figure breaks its bound
(`check`): counts against their targets, times only as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import prices
from devtools.dynamodb_local import DynamoDBLocal

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "bc33e96"  # main before the flush redesign: per-event claims into hourly batches
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TARGETS = {"single": 4.0, "batch": 2.5, "flush": 0.1, "drain": 20_000, "hot_ratio": 3.0}


def baseline_checkout(commit: str) -> Path | None:
    """The old design's layer and template, unpacked from git; None when git can't give them."""
    target = ROOT / ".local" / "bench-baseline" / commit
    if (target / "template.yaml").is_file():
        return target
    if shutil.which("git") is None:
        print("old design skipped: git is not installed", file=sys.stderr)
        return None
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
    )
    if found.returncode != 0:
        print(f"old design skipped: commit {commit} is not in this clone's history "
              "(a shallow clone? `git fetch --unshallow`)", file=sys.stderr)  # fmt: skip
        return None
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "old.tar"
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", "-o", str(archive), commit,
             "layers/shared", "template.yaml"],
            check=True,
        )  # fmt: skip
        staging = Path(scratch) / "tree"
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, target)
    return target


def run_design(checkout: Path, endpoint: str, quick: bool) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{checkout / 'layers' / 'shared'}{os.pathsep}{ROOT}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("AWS_SESSION_TOKEN", None)
    command = [sys.executable, "-m", "benchmarks.scenarios", "--endpoint", endpoint,
               "--template", str(checkout / "template.yaml")]  # fmt: skip
    if quick:
        command.append("--quick")
    done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- tables ------------------------------------------------------------------------------------


def units_per_event(units: dict[str, Any], part: str, kind: str = "writes") -> float:
    bill = units[part]
    if kind == "writes":
        return float(bill["table_writes"] + bill["index_writes"]) / units["events"]
    return float(bill[kind]) / units["events"]


def derive(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures the tables show, from one design's raw results."""
    w, drain, hot = figures["write_units"], figures["drain"], figures["hot_customer"]
    flush_writes = units_per_event(w["batch"], "flush")
    out: dict[str, Any] = {
        "single": units_per_event(w["single"], "record"),
        "single_index": units_per_event(w["single"], "record", "index_writes"),
        "batch": units_per_event(w["batch"], "record"),
        "batch_index": units_per_event(w["batch"], "record", "index_writes"),
        "flush": flush_writes,
        "flush_index": units_per_event(w["batch"], "flush", "index_writes"),
        "total_single": units_per_event(w["single"], "record") + flush_writes,
        "total_batch": units_per_event(w["batch"], "record") + flush_writes,
        "reads_batch": units_per_event(w["batch"], "record", "reads"),
        "reads_flush": units_per_event(w["batch"], "flush", "reads"),
        **{f"drain_{k}": v for k, v in drain.items()},
    }
    for engine in ("local", "emulated"):
        for where in ("hot", "spread"):
            for key, value in hot[f"{engine}_{where}"].items():
                out[f"{engine}_{where}_{key}"] = value
        out[f"{engine}_ratio"] = out[f"{engine}_hot_p99_ms"] / out[f"{engine}_spread_p99_ms"]
    for mode in ("single", "batch"):
        for part, dollars in costs(figures, mode).items():
            out[f"usd_{mode}_{part}"] = dollars
    return out


def costs(figures: dict[str, Any], mode: str) -> dict[str, float]:
    """$ per million events, record + flush, for one way of sending (single or batch)."""
    units, batch = figures["write_units"][mode], figures["write_units"]["batch"]
    requests = 1e6 if mode == "single" else 1e6 / 100
    duration = figures["latency"][f"{mode}_request_s"]
    flush_seconds = figures["drain"]["flush_seconds"] / figures["drain"]["events"]

    def dynamodb(units: dict[str, Any], part: str) -> float:
        writes = units_per_event(units, part) * prices.DYNAMODB_PER_WRU
        return 1e6 * (writes + units_per_event(units, part, "reads") * prices.DYNAMODB_PER_RRU)

    gb_second = prices.LAMBDA_MEMORY_GB * prices.LAMBDA_PER_GB_SECOND
    return {
        "dynamodb": dynamodb(units, "record") + dynamodb(batch, "flush"),
        "lambda": requests * (prices.LAMBDA_PER_REQUEST + duration * gb_second)
        + 1e6 * flush_seconds * gb_second,
        "http": requests * prices.HTTP_API_PER_REQUEST,
    }


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


Row = tuple[str, Any, Any]  # label, cell(figures) -> str, target(new figures) -> str

WRITE_ROWS: list[Row] = [
    ("write units, single-event request",
     lambda f: f"{f['single']:.3f} ({f['single_index']:.3f} index)",
     lambda f: f"≤ 4: {_met(f['single'] <= 4)}"),
    ("write units, batches of 100",
     lambda f: f"{f['batch']:.3f} ({f['batch_index']:.3f} index)",
     lambda f: f"≤ 2.5: {_met(f['batch'] <= 2.5)}"),
    ("write units, flush",
     lambda f: f"{f['flush']:.3f} ({f['flush_index']:.3f} index)",
     lambda f: f"≤ 0.1: {_met(f['flush'] <= 0.1)}"),
    ("write units, record + flush, single requests", lambda f: f"{f['total_single']:.2f}", None),
    ("write units, record + flush, batches of 100", lambda f: f"{f['total_batch']:.2f}", None),
    ("read units, batch record", lambda f: f"{f['reads_batch']:.3f}", None),
    ("read units, flush", lambda f: f"{f['reads_flush']:.3f}", None),
]  # fmt: skip

DRAIN_ROWS: list[Row] = [
    ("Stripe calls", lambda f: str(f["drain_stripe_calls"]),
     lambda f: f"= pairs: {_met(f['drain_stripe_calls'] == f['drain_pairs'])}"),
    ("units billed / recorded",
     lambda f: f"{_n(f['drain_stripe_units'])} / {_n(f['drain_units'])}", lambda f: "equal"),
    ("flush run (median; all runs)", lambda f: f"{f['drain_flush_seconds']:.2f} s ("
     + ", ".join(f"{t:.2f}" for t in f["drain_flush_seconds_all"]) + ")", None),
    ("drain: events covered per second", lambda f: _n(f["drain_events_per_second"]),
     lambda f: f"≥ 20,000: {_met(f['drain_events_per_second'] >= 20_000)}"),
    ("a second flush: Stripe calls", lambda f: str(f["drain_second_flush_calls"]), lambda f: "0"),
]  # fmt: skip


def hot_rows(engine: str) -> list[Row]:
    def pair(key: str, digits: int = 0) -> Any:
        return lambda f: (
            f"{_n(f[f'{engine}_hot_{key}'], digits)} / {_n(f[f'{engine}_spread_{key}'], digits)}"
        )

    def target(f: dict[str, Any]) -> str:
        ok = f[f"{engine}_ratio"] < 3 and f[f"{engine}_hot_errors_5xx"] == 0
        return f"< 3, no 5xx: {_met(ok)}"

    return [
        (f"{engine}: 5xx, hot / spread", pair("errors_5xx"), lambda f: "0"),
        (f"{engine}: conflicts (each one retry), hot / spread", pair("conflicts"), None),
        (f"{engine}: p50 ms, hot / spread", pair("p50_ms"), None),
        (f"{engine}: p99 ms, hot / spread", pair("p99_ms"), None),
        (f"{engine}: p99 hot ÷ p99 spread", lambda f: f"{f[f'{engine}_ratio']:.2f}", target),
        (f"{engine}: requests/s, hot customer",
         lambda f: _n(f[f"{engine}_hot_requests_per_second"]), None),
        (f"{engine}: the hot pair's counter items / Stripe calls in the next flush",
         lambda f: f"{f[f'{engine}_hot_counter_items']} / {f[f'{engine}_hot_flush_stripe_calls']}",
         lambda f: "1 call per pair"),
    ]  # fmt: skip


def cost_rows(mode: str, label: str) -> list[Row]:
    def usd(part: str) -> Any:
        return lambda f: f"${f[f'usd_{mode}_{part}']:.3f}"

    def total(f: dict[str, Any]) -> str:
        return f"**${sum(f[f'usd_{mode}_{p}'] for p in ('dynamodb', 'lambda', 'http')):.2f}**"

    return [
        (f"{label}: DynamoDB", usd("dynamodb"), None),
        (f"{label}: Lambda", usd("lambda"), None),
        (f"{label}: HTTP API", usd("http"), None),
        (f"{label}: total", total, None),
    ]


def table(caption: str, rows: list[Row], shown: list[tuple[str, dict[str, Any]]]) -> list[str]:
    new = shown[-1][1]
    lines = [caption, "", "| | " + " | ".join(name for name, _ in shown) + " | target (now) |"]
    lines.append("|---" * (len(shown) + 2) + "|")
    for label, cell, target in rows:
        cells = " | ".join(cell(figures) for _, figures in shown)
        lines.append(f"| {label} | {cells} | {target(new) if target else ''} |")
    return [*lines, ""]


def tables(results: dict[str, dict[str, Any] | None], quick: bool) -> str:
    shown = [
        (name, derive(figures))
        for name, figures in (("before (bc33e96)", results.get("old")), ("now", results["new"]))
        if figures is not None
    ]
    new = shown[-1][1]
    lines = table(
        "**DynamoDB request units per event**, AWS's pricing rules applied to every call the "
        "code makes (record: the API's transaction; flush: everything a run writes, with 100 "
        "events per pair between flushes)",
        WRITE_ROWS,
        shown,
    )
    lines += table(
        f"**The issue's backlog**: {_n(new['drain_events'])} events of {new['drain_pairs']} "
        f"customers, one meter, {new['drain_groups']} (customer, meter, hour) groups, "
        f"{new['drain_pairs']} (customer, meter, period) pairs; one flush run drains it (real "
        "SDK, fake Stripe); runs on a fresh backlog are repeated while they total under 2 s, up "
        "to 3",
        DRAIN_ROWS,
        shown,
    )
    lines += table(
        f"**Hot customer**: {new['local_hot_writers']} concurrent writers, each with its own "
        f"client, {new['local_hot_requests'] // new['local_hot_writers']} single-event requests "
        "each through record_events and DynamoStore: all on one (customer, meter), "
        "then on 16 customers. DynamoDB Local runs transactions one at a time and never answers "
        "TransactionConflict (`local`); `emulated` adds DynamoDB's rule in the client: a "
        "transaction touching an item another one holds in flight is cancelled with "
        "TransactionConflict.",
        hot_rows("local") + hot_rows("emulated"),
        shown,
    )
    lines += table(
        f"**$ per million events**, on-demand, {prices.REGION}, record + flush; Lambda arm64 "
        f"{int(prices.LAMBDA_MEMORY_GB * 1024)} MB with the durations measured here (a lower "
        "bound for AWS)",
        cost_rows("single", "single-event requests") + cost_rows("batch", "batches of 100"),
        shown,
    )
    lines.append(prices.NOTE)
    if results.get("old") is None:
        lines += ["", "_No column for the old design: its commit was not available._"]
    if quick:
        lines += ["", "_A --quick run: small samples, for development only._"]
    return "\n".join(lines)


# -- bounds ------------------------------------------------------------------------------------

# What `make bench` holds each published figure to: a broken bound fails the run, after the
# tables are printed and published, so the regression is on record. Units, calls and sums are
# counted, not timed: they are held to their targets. Times are held only as ratios of two
# figures measured side by side in the same run, with room for a shared 2-core machine, where
# a p99 of a few hundred requests moves by half from one run to the next.
SINGLE_WRITE_UNITS = 4.05  # 4 by construction, plus an index write per counter re-entering
FLUSH_VS_RECORD = 5  # the flush covers the backlog at least 5 times faster than recording it
HOT_RATIO = 3.0  # p99 of writers on one pair ÷ p99 of writers spread over customers (target)
WRITE_UNITS_VS_OLD = 0.75  # record + flush write units, now ÷ before (published: 0.44 to 0.56)
DRAIN_VS_OLD = 10  # events the flush covers per second, now ÷ before (published: about 70)


def check(new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """The bounds this tree's figures (from derive) break, beside the old design's when
    given; empty when all hold."""
    bounds = [
        (f"write units, single-event request ≤ {SINGLE_WRITE_UNITS}",
         new["single"] <= SINGLE_WRITE_UNITS),
        ("write units, batches of 100 ≤ 2.5", new["batch"] <= TARGETS["batch"]),
        ("write units, flush ≤ 0.1", new["flush"] <= TARGETS["flush"]),
        ("Stripe calls = pairs", new["drain_stripe_calls"] == new["drain_pairs"]),
        ("units billed = recorded", new["drain_stripe_units"] == new["drain_units"]),
        ("a second flush: 0 Stripe calls", new["drain_second_flush_calls"] == 0),
        ("the drain's flush runs without errors", not new["drain_errors"]),
        (f"flush run ≤ 1/{FLUSH_VS_RECORD} of recording the same backlog",
         new["drain_flush_seconds"] * FLUSH_VS_RECORD <= new["drain_record_seconds"]),
    ]  # fmt: skip
    for engine in ("local", "emulated"):
        bounds += [
            (f"{engine}: no 5xx, hot or spread",
             new[f"{engine}_hot_errors_5xx"] == new[f"{engine}_spread_errors_5xx"] == 0),
            (f"{engine}: p99 hot ÷ p99 spread < {HOT_RATIO}", new[f"{engine}_ratio"] < HOT_RATIO),
            (f"{engine}: the hot pair's units billed = stored",
             new[f"{engine}_hot_billed_units"] == new[f"{engine}_hot_stored_units"]),
            (f"{engine}: one Stripe call per counter item of the hot pair",
             new[f"{engine}_hot_flush_stripe_calls"] == new[f"{engine}_hot_counter_items"]),
        ]  # fmt: skip
    if old is not None:
        bounds += [
            (f"write units, record + flush, now ≤ {WRITE_UNITS_VS_OLD} of before",
             new["total_single"] <= WRITE_UNITS_VS_OLD * old["total_single"]
             and new["total_batch"] <= WRITE_UNITS_VS_OLD * old["total_batch"]),
            (f"drain: events covered per second, now ≥ {DRAIN_VS_OLD} times before",
             new["drain_events_per_second"] >= DRAIN_VS_OLD * old["drain_events_per_second"]),
        ]  # fmt: skip
    return [name for name, held in bounds if not held]


def machine_note() -> str:
    cores = os.cpu_count()
    return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()} Linux, {cores} cores, "
            "shared with other work: compare the two columns, not the absolute figures "
            "(ratios matter).")  # fmt: skip


def publish(text: str, start: str = START, end: str = END) -> None:
    """Put `text` in the README between the `start` and `end` markers (and nothing else)."""
    readme = README.read_text(encoding="utf-8")
    if start not in readme or end not in readme:
        print(f"README has no {start} ... {end} block; not published", file=sys.stderr)
        return
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")
    print(f"published in {README.relative_to(ROOT)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small samples, for development")
    parser.add_argument("--no-readme", action="store_true", help="print only")
    parser.add_argument("--baseline", default=BASELINE, help="commit of the old design")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    old = baseline_checkout(args.baseline)
    results: dict[str, dict[str, Any] | None] = {"old": None}
    with DynamoDBLocal(java_opts=("-XX:+UseSerialGC",)) as engine:
        if old is not None:
            print(f"old design ({args.baseline}):", file=sys.stderr)
            results["old"] = run_design(old, engine.endpoint_url, args.quick)
        print("new design (this tree):", file=sys.stderr)
        results["new"] = new = run_design(ROOT, engine.endpoint_url, args.quick)
    out = ROOT / ".local" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    text = f"_{machine_note()}_\n\n{tables(results, args.quick)}"
    print(text)
    if not args.no_readme and not args.quick:
        publish(text)
    print(f"benchmarks took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    before = results["old"]
    broken = check(derive(new), derive(before) if before is not None else None)
    for bound in broken:
        print(f"bound broken: {bound}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
