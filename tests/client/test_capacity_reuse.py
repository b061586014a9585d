"""Room freed is room again at once: an array uploaded and freed over and over on a nearly full agent never
meets NoCapacity. The agent reports memory soon after a free (not at its next heartbeat), and a placement
that finds no room while recent placements are unreported waits, bounded, for the agents' reports."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import gpupool as gp
from gpupool.local import LocalPool

LIMIT = 8 << 20


@pytest.mark.slow
def test_upload_and_free_in_a_loop_reuses_the_room(system_broker_url: str) -> None:
    with (
        LocalPool(
            agents=1,
            broker_url=system_broker_url,
            port=0,
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            backend="numpy",
            memory_limit=str(LIMIT),
            # Heartbeats far apart: the room must come back by the report after the free, and the
            # coordinator's wait (3 s) is shorter than a heartbeat.
            agent_args=["--heartbeat", "6"],
        ) as local,
        local.connect() as pool,
    ):
        block = np.ones((1 << 18,), np.float64)  # 2 MiB
        kept = [pool.asarray(block) for _ in range(2)]
        big = np.ones((3 << 17,), np.float64)  # 3 MiB: fits beside the two kept, twice only once freed
        for round_ in range(12):
            x = pool.asarray(big * round_)
            assert float(x.sum()) == big.size * round_
            x.free()
        with pytest.raises(gp.NoCapacity):  # the room really taken is still refused
            [pool.asarray(block) for _ in range(3)]
        del kept
