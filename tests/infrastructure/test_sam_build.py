"""`sam build` without Docker produces every function and the layer, for either architecture."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infrastructure.test_cold_start import PROBE

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ("RecordFunction", "FlushFunction", "ReadFunction")
pytestmark = pytest.mark.slow


def sam_build(build_dir: Path, architecture: str) -> Path:
    sam = shutil.which("sam", path=str(Path(sys.executable).parent)) or "sam"
    # sam build looks for python3.13 on PATH; the project's virtualenv provides it.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SAM_CLI_TELEMETRY": "0",
    }
    subprocess.run(
        [
            sam,
            "build",
            "--build-dir",
            str(build_dir),
            "--cache-dir",
            str(build_dir / ".cache"),
            "--parameter-overrides",
            f"Architecture={architecture}",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return build_dir


@pytest.fixture(scope="module")
def host_build(sam_host_build: Path) -> Path:
    return sam_host_build  # the session's build for this machine, shared with the e2e tests


def test_every_function_and_the_layer_are_built(host_build):
    for function in FUNCTIONS:
        assert (host_build / function / "app.py").is_file()
    layer = host_build / "SharedLayer" / "python"
    assert (layer / "usage_meter" / "api.py").is_file()
    assert (layer / "pydantic").is_dir() and (layer / "stripe").is_dir()
    assert (host_build / "template.yaml").is_file()


@pytest.mark.parametrize("function", ["RecordFunction", "ReadFunction"])
def test_built_api_functions_do_not_import_stripe(host_build, function):
    env = {
        "PYTHONPATH": str(host_build / "SharedLayer" / "python"),
        "TABLE_NAME": "usage",
        "METERS": '{"m": {}}',
        "AWS_DEFAULT_REGION": "us-east-1",
        "PATH": os.environ["PATH"],
    }
    # The artifact plus boto3, which Lambda's runtime provides.
    site = subprocess.run(
        [
            sys.executable,
            "-c",
            "import boto3, os; print(os.path.dirname(os.path.dirname(boto3.__file__)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env["PYTHONPATH"] += f":{site}"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(host_build / function / "app.py")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "stripe" not in out and "usage_meter" in out


@pytest.mark.timeout(660)  # a whole `sam build`, given 600 s by sam_build() itself
def test_the_default_arm64_build_carries_arm64_binaries(tmp_path):
    build = sam_build(tmp_path, "arm64")
    extensions = (build / "SharedLayer" / "python" / "pydantic_core").glob("_pydantic_core*.so")
    # Both architectures' extensions: SAM tells the layer's makefile build neither
    assert sorted("aarch64" in e.name for e in extensions) == [False, True]
    for function in FUNCTIONS:
        assert (build / function / "app.py").is_file()


def test_the_layer_ships_bytecode_lambda_never_revalidates(host_build):
    layer = host_build / "SharedLayer" / "python"
    sources = [p for p in layer.rglob("*.py") if "bin" not in p.relative_to(layer).parts]
    assert len(sources) > 1000  # the package and every dependency
    missing, checked = [], []
    for source in sources:
        compiled = source.parent / "__pycache__" / f"{source.stem}.cpython-313.pyc"
        if not compiled.is_file():
            missing.append(source)
            continue
        flags = int.from_bytes(compiled.read_bytes()[4:8], "little")
        checked.append(flags == 0b01)  # hash-based, never checked against the source (PEP 552)
    assert missing == [] and all(checked)
