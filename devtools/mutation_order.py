"""pytest plugin for the mutation run (`make mutate`, pyproject's [tool.mutmut]): the fastest
tests first.

mutmut runs a mutant's tests with -x, so it stops at the first failure: with the fast tests
first, most killed mutants stop after a fraction of a second instead of after a property test.
The durations are mutmut's own, measured in its first test run (mutants/mutmut-stats.json).
"""

import json
from pathlib import Path
from typing import Any

STATS = Path("mutmut-stats.json")  # mutmut runs pytest in mutants/


def pytest_collection_modifyitems(items: list[Any]) -> None:
    if not STATS.exists():
        return
    durations = json.loads(STATS.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
