"""The record and read functions never import `stripe`: cold-start time they don't need."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("app", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def imported_by(function: str) -> set[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "layers" / "shared"),
        "TABLE_NAME": "usage",
        "METERS": '{"ai_messages": {"included": 10}}',
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "functions" / function / "app.py")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("function", ["record", "read", "authorizer"])
def test_api_functions_do_not_import_stripe(function):
    assert "stripe" not in imported_by(function)


def test_the_flush_does_import_stripe():
    # The probe itself is sound: the one function that needs stripe shows it.
    assert "stripe" in imported_by("flush")
