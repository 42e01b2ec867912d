"""Mutation testing of the money paths (issue 15): `make mutate`.

    python -m devtools.mutation            # run mutmut, then publish the score
    python -m devtools.mutation --report   # publish the last run's results again, run nothing
    python -m devtools.mutation --full     # forget earlier results and test every mutant

mutmut (in .venv-mutate: it needs a newer click than SAM CLI allows) changes one thing at a time
in logic/, store/, billing/ and api.py and runs the tests that reach the changed function; a
mutant the tests still pass is a survivor. Publishing writes mutation/score.json (counts per
module, the score, and a hash of the mutated sources that a CI test compares with the tree),
mutation/survivors.md (every survivor, its diff and the reason it is left, from
mutation/reasons.toml) and the README's table between the `mutation:` markers.

mutmut names a mutant after its file's path, and runs it only in the module of that name, so the
path must be the module the tests import: it runs in .mutate/, links that mirror the repository
with usage_meter at the top. Runs are incremental: mutmut keeps each function's results until the
function changes; when the tests changed, this script also has it retest every survivor, so a
new test that kills one counts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "layers" / "shared" / "usage_meter"
WORKDIR = ROOT / ".mutate"  # mutmut's working folder; its results are in WORKDIR / "mutants"
SCORE = ROOT / "mutation" / "score.json"
SURVIVORS = ROOT / "mutation" / "survivors.md"
REASONS = ROOT / "mutation" / "reasons.toml"
RUN_SOURCES = WORKDIR / "sources.sha256"  # sources_hash() when the last run started
README = ROOT / "README.md"
START, END = "<!-- mutation:start -->", "<!-- mutation:end -->"
GOAL = 90.0  # percent of mutants killed, over all the mutated modules

# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code), in the columns shown here.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no_tests", 33: "no_tests", 34: "skipped"}
STATUS |= {36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}
NOT_KILLED = ("survived", "no_tests", "suspicious")  # what survivors.md lists
RETEST = {0, 5, 33, 35}  # survived, no tests, suspicious: a new test may kill them
# The tests run in a zone that is not UTC (UTC-3:30, -2:30 in summer), so a mutant that drops
# an explicit UTC shows; Lambda runs in UTC, where such a mutant would not.
TEST_ENV = {"TZ": "America/St_Johns"}


def config() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return dict(tomllib.load(file)["tool"]["mutmut"])


def mutated_files() -> list[Path]:
    """The source files mutmut mutates (pyproject's only_mutate), sorted, under PACKAGE."""
    patterns = config()["only_mutate"]
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = f"usage_meter/{path.relative_to(PACKAGE).as_posix()}"
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            files.append(path)
    return files


def sources_hash() -> str:
    """sha256 over the mutated files' names and contents: the score is current while it holds."""
    digest = hashlib.sha256()
    for path in mutated_files():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


# --- running mutmut ----------------------------------------------------------------------------


def prepare_workdir() -> None:
    """.mutate/ mirrors the root (pyproject.toml, tests and also_copy) with usage_meter on top."""
    links = {"usage_meter": PACKAGE, "pyproject.toml": ROOT / "pyproject.toml"}
    links |= {name: ROOT / name for name in ["tests", *config().get("also_copy", [])]}
    WORKDIR.mkdir(exist_ok=True)
    for name, target in links.items():
        link = WORKDIR / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        # mutmut copies these into mutants/ over what is there: drop the old copy, so a test
        # deleted from the tree is not run from it.
        copy = WORKDIR / "mutants" / name
        if name != "usage_meter" and copy.is_dir():
            shutil.rmtree(copy)


def tests_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def reset_for_retest() -> int:
    """When the tests changed since the last run, mark its survivors untested, so mutmut runs
    them again with the new tests (it keeps a result until the function itself changes)."""
    stamp = WORKDIR / "tests.sha256"
    current = tests_hash()
    if stamp.exists() and stamp.read_text() == current:
        return 0
    stamp.write_text(current)
    # mutmut maps tests to functions once, and later only adds new tests: map them all again.
    (WORKDIR / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    count = 0
    for meta_path in (WORKDIR / "mutants" / "usage_meter").rglob("*.py.meta"):
        meta = json.loads(meta_path.read_text())
        codes = meta["exit_code_by_key"]
        again = [key for key, code in codes.items() if code in RETEST]
        if again:
            codes.update(dict.fromkeys(again))
            meta_path.write_text(json.dumps(meta, indent=4))
            count += len(again)
    return count


def run_mutmut(jobs: int) -> None:
    mutmut = ROOT / ".venv-mutate" / "bin" / "mutmut"
    if not mutmut.exists():
        sys.exit(f"{mutmut} is missing: run `make mutate`, which installs it")
    command = [str(mutmut), "run", "--max-children", str(jobs)]
    # mutmut redraws one status line; it goes to a log, and a line a minute comes here instead.
    log_path = WORKDIR / "mutmut.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=WORKDIR, env=os.environ | TEST_ENV, stdout=log, stderr=subprocess.STDOUT
        )
        started = datetime.datetime.now()
        while process.poll() is None:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                minutes = (datetime.datetime.now() - started).total_seconds() / 60
                print(f"  {minutes:4.0f} min  {last_status(log_path)}", flush=True)
    if process.returncode != 0:
        print(log_path.read_text(errors="replace")[-4000:].replace("\r", "\n"))
        sys.exit(f"mutmut failed (exit {process.returncode}); its output is in {log_path}")


def last_status(log_path: Path) -> str:
    """mutmut's latest progress line: done/total and its emoji counts."""
    text = log_path.read_bytes()[-400:].decode(errors="replace")
    return text.replace("\r", "\n").strip().splitlines()[-1].lstrip("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")


# --- results -----------------------------------------------------------------------------------


@dataclass
class Counts:
    mutants: int = 0
    killed: int = 0
    survived: int = 0
    timeout: int = 0
    no_tests: int = 0
    other: int = 0  # suspicious, segfault, not checked

    @property
    def score(self) -> float:
        """Killed (a timeout is a kill: the tests noticed) per 100 mutants."""
        detected = self.killed + self.timeout
        return round(100 * detected / self.mutants, 1) if self.mutants else 100.0

    def add(self, status: str) -> None:
        self.mutants += 1
        name = status if status in ("killed", "survived", "timeout", "no_tests") else "other"
        setattr(self, name, getattr(self, name) + 1)


def read_results() -> dict[str, dict[str, int | None]]:
    """Exit code per mutant name, per module (`logic/flush.py`), from mutmut's meta files."""
    base = WORKDIR / "mutants" / "usage_meter"
    wanted = {f"usage_meter/{path.relative_to(PACKAGE).as_posix()}" for path in mutated_files()}
    results = {}
    for meta_path in sorted(base.rglob("*.py.meta")):
        name = f"usage_meter/{meta_path.relative_to(base).as_posix().removesuffix('.meta')}"
        codes = json.loads(meta_path.read_text())["exit_code_by_key"]
        if name in wanted and codes:
            results[name.removeprefix("usage_meter/")] = codes
    if not results:
        sys.exit("no mutmut results in .mutate/mutants: run `make mutate` first")
    return results


def status_of(code: int | None) -> str:
    return "not_checked" if code is None else STATUS.get(code, "suspicious")


def tally(results: dict[str, dict[str, int | None]]) -> tuple[dict[str, Counts], Counts]:
    modules, total = {}, Counts()
    for module, codes in results.items():
        counts = modules[module] = Counts()
        for code in codes.values():
            counts.add(status_of(code))
            total.add(status_of(code))
    return modules, total


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def diff_of(mutant: str, module: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    with contextlib.chdir(WORKDIR):  # mutmut reads mutants/ from where it ran
        lines = get_diff_for_mutant(mutant, path=f"usage_meter/{module}").splitlines()
    return "\n".join(line for line in lines if not line.startswith(("---", "+++")))


def reasons() -> dict[str, str]:
    """Mutant name → why it is left, from mutation/reasons.toml's [[left]] groups."""
    with REASONS.open("rb") as file:
        groups = tomllib.load(file).get("left", [])
    return {name: group["reason"] for group in groups for name in group["mutants"]}


def _row(counts: Counts) -> dict[str, Any]:
    return {**asdict(counts), "score": counts.score}


def write_score(modules: dict[str, Counts], total: Counts) -> None:
    score = {
        "tool": f"mutmut {mutmut_version()}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        # The sources the last run mutated: an edit since then makes the score stale.
        "sources_sha256": RUN_SOURCES.read_text().strip(),
        "files": [path.relative_to(ROOT).as_posix() for path in mutated_files()],
        "goal": GOAL,
        "modules": {module: _row(counts) for module, counts in modules.items()},
        "total": _row(total),
    }
    SCORE.write_text(json.dumps(score, indent=2) + "\n")


def write_survivors(results: dict[str, dict[str, int | None]], total: Counts) -> list[str]:
    """survivors.md; returns the names of survivors that have no written reason."""
    why = reasons()
    unexplained = []
    lines = [
        "# Surviving mutants",
        "",
        "Written by `make mutate` (devtools/mutation.py); the reasons come from",
        "mutation/reasons.toml. Each entry is a change to the code that the tests selected for it",
        "do not notice: a `survived` mutant ran them and they passed, a `no_tests` one is reached",
        "by none of the tests the mutation run uses.",
        "",
        f"{total.mutants - total.killed - total.timeout} of {total.mutants} mutants not killed "
        f"(score {total.score}%).",
    ]
    for module, codes in results.items():
        left = [(name, status_of(code)) for name, code in codes.items()]
        left = [(name, status) for name, status in left if status in NOT_KILLED]
        if not left:
            continue
        lines += ["", f"## {module}", ""]
        for name, status in left:
            reason = why.get(name)
            if reason is None:
                unexplained.append(name)
            lines += [
                f"### `{name}` ({status})",
                "",
                f"Reason: {reason or 'none written yet'}",
                "",
                "```diff",
                diff_of(name, module),
                "```",
                "",
            ]
    SURVIVORS.write_text("\n".join(lines).rstrip() + "\n")
    return unexplained


def table(modules: dict[str, Counts], total: Counts) -> str:
    lines = [
        "| module | mutants | killed | survived | timeout | no tests | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module, c in [*modules.items(), ("**total**", total)]:
        lines.append(
            f"| {module} | {c.mutants} | {c.killed} | {c.survived} | {c.timeout} | "
            f"{c.no_tests} | {c.score}% |"
        )
    return "\n".join(lines)


def write_readme(modules: dict[str, Counts], total: Counts) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers: its table is not updated")
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    score = json.loads(SCORE.read_text())
    body = (
        f"\n{table(modules, total)}\n\n"
        f"{score['tool']}, {score['date']}; sources sha256 `{score['sources_sha256'][:12]}`.\n"
    )
    README.write_text(head + START + body + END + tail)


def publish() -> bool:
    """Writes the score, the survivors and the README table; True when the goal is met."""
    results = read_results()
    modules, total = tally(results)
    write_score(modules, total)
    unexplained = write_survivors(results, total)
    write_readme(modules, total)
    print(table(modules, total))
    print(f"\nSurvivors and their diffs: {SURVIVORS.relative_to(ROOT)}")
    stale = set(reasons()) - {
        name for codes in results.values() for name, code in codes.items() if code in RETEST
    }
    if stale:
        print(f"Reasons for mutants that no longer survive: {', '.join(sorted(stale))}")
    if unexplained:
        print(f"{len(unexplained)} survivors have no reason in {REASONS.relative_to(ROOT)}:")
        print("\n".join(f"  {name}" for name in unexplained))
    if total.other:
        print(f"{total.other} mutants neither killed nor survived (suspicious, segfault, unrun)")
    met = total.score >= GOAL
    print(f"\nScore {total.score}% (goal {GOAL}%): {'met' if met else 'NOT met'}")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="publish the last run, run nothing")
    parser.add_argument("--full", action="store_true", help="forget earlier results first")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args(argv)
    if not args.report:
        if args.full:
            shutil.rmtree(WORKDIR, ignore_errors=True)
        prepare_workdir()
        retested = reset_for_retest()
        if retested:
            print(f"The tests changed: retesting the {retested} survivors of the last run")
        RUN_SOURCES.write_text(sources_hash())
        started = datetime.datetime.now()
        run_mutmut(args.jobs)
        print(f"mutmut finished in {datetime.datetime.now() - started}")
    return 0 if publish() else 1


if __name__ == "__main__":
    sys.exit(main())
