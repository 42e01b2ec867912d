from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.local_stack import LocalStack, StackOptions


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
    with LocalStack(options) as running:
        yield running
