"""A real pool for the client tests: the system Mosquitto, a coordinator and two NumPy agents as processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import gpupool as gp
from gpupool.local import LocalPool

#: Each agent may hold this much; small enough that the out-of-memory tests stay cheap.
AGENT_MEMORY = 64 << 20


@pytest.fixture(scope="session")
def local_pool(system_broker_url: str) -> Iterator[LocalPool]:
    """Two agents with the NumPy backend and a 64 MiB limit each, for the whole session."""
    with LocalPool(
        agents=2,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(AGENT_MEMORY),
        # Every array spread over both agents, however small: the tests exercise multi-shard layouts.
        coordinator_args=["--min-shard-bytes", "0"],
    ) as local:
        yield local


@pytest.fixture(scope="module")
def pool(local_pool: LocalPool) -> Iterator[gp.Pool]:
    """A client session on the shared pool."""
    with local_pool.connect() as session:
        yield session
