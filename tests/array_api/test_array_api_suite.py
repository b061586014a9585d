"""The Array API standard's own test suite against ``import gpupool as gp``, on a real local pool.

Two NumPy agents as processes behind the system Mosquitto, every array split over both (``--min-shard-bytes
0``), the suite run as its README says (``ARRAY_API_TESTS_MODULE=gpupool``) in a subprocess that connects
to the pool from the environment. The tests gpupool skips, each with its reason, are in ``skips.txt``
(every one fails for NumPy too); anything else failing fails here.
"""

from __future__ import annotations

import os
import uuid

import pytest

from gpupool.local import LocalPool
from tests.array_api.suite_runner import run_suite, table

#: NumPy itself passes 1,248 of the suite's tests with these flags (three examples each; RESULTS.md): the
#: issue's target is 95% of that. A run that passes fewer (tests silently skipped or erroring) fails here.
NUMPY_PASSES = 1248


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_array_api_suite_passes_against_a_pool(system_broker_url: str) -> None:
    with LocalPool(
        agents=2,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(256 << 20),
        coordinator_args=["--min-shard-bytes", "0"],
    ) as local:
        env = {
            **os.environ,
            "GPUPOOL_COORDINATOR": local.coordinator_address,
            "GPUPOOL_TOKEN": local.client_token,
        }
        code, tail, counts = run_suite("gpupool", env, max_examples=3, skips=True, timeout=840)
    print(table({"gpupool": counts}))
    assert code == 0, tail
    passed = sum(file["passed"] for file in counts.values())
    assert passed >= 0.95 * NUMPY_PASSES, table({"gpupool": counts})
