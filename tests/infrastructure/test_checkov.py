"""checkov's security scan of template.yaml: every check passes, or is skipped in the resource's
`Metadata: checkov: skip` with a written reason.

checkov lives in its own virtualenv (.venv-checkov, made by `make setup`): its pinned
dependencies clash with the project's. Set CHECKOV to use another binary.
"""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devtools.template import load_template

# The scan, given 300 s of its own, runs in the setup of the module's first test.
pytestmark = pytest.mark.timeout(330)
ROOT = Path(__file__).resolve().parents[2]
CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
# Over 40 checks today; far fewer means checkov no longer sees the template's resources.
MIN_CHECKS = 30
# What checkov writes when a skip has no comment.
NO_COMMENT = "No comment provided"


@pytest.fixture(scope="module")
def scan() -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: `make setup` installs checkov into .venv-checkov")
    result = subprocess.run(
        [
            CHECKOV,
            "--file",
            "template.yaml",
            # SAM templates go through the CloudFormation runner (AWS::Serverless::* included).
            "--framework",
            "cloudformation",
            "--output",
            "json",
            # Offline: no Prisma Cloud guidelines, which only add links to the report.
            "--skip-download",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Exit 1 only means "some check failed"; the tests below say which.
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    found = [r for r in reports if r.get("check_type") == "cloudformation"]
    if not found:
        pytest.fail(f"checkov scanned no CloudFormation resources: {result.stdout[:2000]}")
    return found[0]


def described(checks: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {c['check_id']} {c['resource']} (lines {c.get('file_line_range')}): {c['check_name']}"
        for c in checks
    )


def test_checkov_scans_the_templates_resources(scan):
    summary = scan["summary"]
    checks = summary["passed"] + summary["failed"] + summary["skipped"]
    assert summary["parsing_errors"] == 0
    assert checks >= MIN_CHECKS, f"checkov ran {checks} checks, expected at least {MIN_CHECKS}"


def test_no_check_fails(scan):
    failed = scan["results"]["failed_checks"]
    assert not failed, (
        f"{len(failed)} checkov check(s) failed; fix them, or skip each in the resource's "
        f"Metadata (checkov: skip: [{{id, comment}}]) with the reason:\n{described(failed)}"
    )


def test_every_skipped_check_carries_a_written_reason(scan):
    unexplained = [
        c
        for c in scan["results"]["skipped_checks"]
        if (c.get("check_result") or {}).get("suppress_comment", "").strip() in ("", NO_COMMENT)
    ]
    assert not unexplained, f"skipped without a reason:\n{described(unexplained)}"


def test_every_skip_in_the_template_is_one_checkov_applied(scan):
    # A skip for a check that no longer runs on its resource is a stale excuse: remove it.
    declared = {
        (logical_id, skip["id"])
        for logical_id, resource in load_template()["Resources"].items()
        for skip in ((resource.get("Metadata") or {}).get("checkov") or {}).get("skip", [])
    }
    applied = {
        (c["resource"].rsplit(".", 1)[-1], c["check_id"]) for c in scan["results"]["skipped_checks"]
    }
    assert declared == applied
