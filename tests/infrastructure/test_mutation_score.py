"""The published mutation score is current and meets the goal (issue 15).

A mutation run takes tens of minutes, too long for every CI run. CI checks instead that
mutation/score.json was measured on the mutated modules exactly as they are now (a sha256 of
their sources) and that it meets the goal; the README shows the same figures. A change to
logic/, store/, billing/ or api.py fails here until `make mutate` measures it again.
"""

import json

from devtools.mutation import GOAL, README, ROOT, SCORE, mutated_files, sources_hash

RUN = "run `make mutate` (it updates mutation/score.json, mutation/survivors.md and the README)"


def score() -> dict:
    return json.loads(SCORE.read_text())


def test_the_score_was_measured_on_the_current_sources():
    files = [path.relative_to(ROOT).as_posix() for path in mutated_files()]
    assert score()["files"] == files, f"the mutated modules changed: {RUN}"
    assert score()["sources_sha256"] == sources_hash(), (
        f"logic/, store/, billing/ or api.py changed since the mutation score was measured: {RUN}"
    )


def test_the_score_meets_the_goal():
    total = score()["total"]
    assert total["score"] >= GOAL, (
        f"{total['score']}% of mutants killed, under the {GOAL}% goal: mutation/survivors.md "
        "lists the survivors; kill them with tests, then " + RUN
    )
    counted = sum(total[n] for n in ("killed", "survived", "timeout", "no_tests", "other"))
    assert counted == total["mutants"] > 0


def test_the_readme_shows_the_published_score():
    readme = README.read_text()
    total = score()["total"]
    assert f"| **total** | {total['mutants']} | {total['killed']} |" in readme, RUN
    for module, counts in score()["modules"].items():
        assert f"| {module} | {counts['mutants']} | {counts['killed']} |" in readme, RUN
