"""Placement by measured speed on a real pool: each agent's worker measures itself as it starts, its status
carries the figures, and the coordinator gives a slow worker fewer rows than a fast one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from gpupool.agent.measure import SLOWDOWN_ENV
from gpupool.local import LocalPool


@pytest.fixture(scope="module")
def mixed_pool(system_broker_url: str) -> Iterator[LocalPool]:
    """One agent as it is, one made 8 times slower (as a slower card would be)."""
    with LocalPool(
        agents=1,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(256 << 20),
        coordinator_args=["--min-shard-bytes", "0"],
    ) as local:
        local.add_agent(name="slow", env={SLOWDOWN_ENV: "8"})
        yield local


def test_statuses_carry_each_workers_measured_speed(mixed_pool: LocalPool) -> None:
    speeds = {
        record.status.name: record.status.workers[0].gemm_f32_gflops for record in mixed_pool.list_agents()
    }
    print(f"measured float32 GEMM GFLOP/s: {speeds}")
    assert all(speed > 0 for speed in speeds.values()), speeds
    assert speeds["slow"] * 2 < min(speed for name, speed in speeds.items() if name != "slow")


def test_the_slow_worker_holds_fewer_rows(mixed_pool: LocalPool) -> None:
    with mixed_pool.connect() as pool:
        x = pool.asarray(np.zeros((10_000, 64), np.float32))
        names = {record.status.agent_id: record.status.name for record in mixed_pool.list_agents()}
        rows = {names[shard.agent_id]: shard.stop - shard.start for shard in x.shards}
        print(f"rows by agent: {rows}")
        assert rows["slow"] * 2 < sum(rows.values()) - rows["slow"], rows
        np.testing.assert_array_equal((x + 1).get(), np.ones((10_000, 64), np.float32))


def test_a_session_reports_the_throughput_it_observed_per_agent(tmp_path: object) -> None:
    """Uploads and downloads are timed per agent, and the next heartbeat (every second) carries the
    figures to the coordinator, which lists a smoothed one per agent (issue 9, item 1)."""
    import time
    import uuid

    import numpy as np

    from gpupool._proto.v1 import coordinator_pb2
    from gpupool.local import LocalPool

    with LocalPool(
        agents=2,
        port=0,
        backend="numpy",
        memory_limit="256MiB",
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        coordinator_args=["--min-shard-bytes", "0"],
    ) as local:
        with local.connect() as pool:
            host = np.ones((1 << 18, 8), np.float32)  # 8 MiB: 4 MiB per agent
            x = pool.asarray(host)
            np.testing.assert_array_equal(x.get(), host)
            deadline = time.monotonic() + 10
            while True:
                records = local.coordinator_client().call("ListAgents", coordinator_pb2.ListAgentsRequest())
                speeds = {r.status.agent_id: r.network_bytes_per_second for r in records.agents}
                if all(speeds.get(s.agent_id, 0) > 0 for s in x.shards) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        print({a: f"{v / 1e6:.0f} MB/s" for a, v in speeds.items()})
        assert all(speeds[s.agent_id] > 0 for s in x.shards)
