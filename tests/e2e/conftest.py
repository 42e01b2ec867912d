from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.local_stack import LocalStack, StackOptions
from tests.clock import on_real_clock


@pytest.fixture(scope="package", autouse=True)
def _on_the_functions_clock() -> Iterator[None]:
    # The functions run in Lambda emulators, on the real clock; the stand-ins in this process
    # (Stripe, the local API) and the times these tests send must agree with it, whatever
    # clock the run forces on this process (tests/clock.py).
    with on_real_clock():
        yield


@pytest.fixture(scope="session")
def stack(sam_host_build: Path) -> Iterator[LocalStack]:
    """The stack `make dev` runs, on free ports and in memory, shared by the e2e modules."""
    options = StackOptions(
        build_dir=sam_host_build,
        api_port=0,  # never the :3000 of a running `make dev`
        table_name="usage-e2e-local",
        run_schedules=False,  # flushed on demand through POST /_local/flush
        function_log=lambda function, line: None,
        log=lambda line: None,
    )
    # Started on the real clock too: session-scoped, it starts before the package's clock.
    with on_real_clock():
        running = LocalStack(options).start()
    try:
        yield running
    finally:
        running.stop()
