"""A slice of the randomized campaign runs in every CI build; `make campaign` runs 200 seeds."""

import pytest

from tests.faults.campaign import holds, run_schedule


@pytest.mark.timeout(300)  # a schedule of kills, stale runs and Stripe faults, on a busy machine
@pytest.mark.parametrize("seed", range(12))
def test_a_seeded_fault_schedule_keeps_the_invariant(world, seed):
    result = run_schedule(world, seed)
    assert holds(result), result
