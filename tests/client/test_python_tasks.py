"""Python tasks that cannot be traced: run (cloudpickle, a process of their own per task) only by agents
whose owners started them with ``--allow-python``, refused elsewhere; a task that raises, aborts its
process or hangs past its deadline fails alone, and the agent carries on serving (real agent processes).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import gpupool as gp
from gpupool.local import LocalPool

DATA = np.arange(24, dtype=np.float64).reshape(6, 4)


def branchy(x: Any, threshold: float) -> Any:
    """Data-dependent Python: not traceable."""
    total = float(x.sum())
    return ("big", total) if total > threshold else ("small", total)


@pytest.fixture(scope="module")
def python_pool(system_broker_url: str) -> Iterator[gp.Pool]:
    with (
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            backend="numpy",
            agent_args=["--allow-python"],
        ) as local,
        local.connect() as pool,
    ):
        yield pool


def test_untraceable_functions_run_as_python_where_owners_allow_it(python_pool: gp.Pool) -> None:
    data = python_pool.replicate(DATA)
    futures = python_pool.map(branchy, [data] * 4, [0, 100, 276, 1000])
    assert [f.result(60) for f in futures] == [
        ("big", 276.0),
        ("big", 276.0),
        ("small", 276.0),
        ("small", 276.0),
    ]
    assert all(f.where for f in futures)
    # traced tasks still run as programs next to them
    assert python_pool.submit(lambda x: (x * 2).sum(), data).result(60) == 552.0


def test_a_python_task_that_raises_aborts_or_hangs_fails_alone(python_pool: gp.Pool) -> None:
    # Each needs a value first (float()), so tracing stops there, on the client, before the rest runs:
    # the function is then shipped as Python and does the rest on the rig.
    def raises(x: Any, n: int) -> int:
        raise ValueError(f"no good: {n} after {float(x.sum())}")

    def aborts(x: Any) -> None:
        if float(x.sum()) >= 0:
            os.abort()

    def hangs(x: Any) -> None:
        threading.Event().wait(120 + float(x.sum()))  # waits for what never comes, as a hung task

    raised = python_pool.submit(raises, DATA, 7)
    error = raised.exception(60)
    assert isinstance(error, gp.RemoteKernelError)
    assert "ValueError: no good: 7 after 276.0" in str(error)
    aborted = python_pool.submit(aborts, DATA, retries=0)
    error = aborted.exception(60)
    assert isinstance(error, gp.RemoteKernelError)
    assert "SIGABRT" in str(error)
    assert "carries on" in str(error)
    started = time.monotonic()
    hung = python_pool.submit(hangs, DATA, retries=0, timeout=3)
    assert isinstance(hung.exception(60), gp.DeadlineExceeded)
    assert time.monotonic() - started < 30
    # the agents carry on: Python and traced tasks alike
    assert python_pool.submit(branchy, DATA, 0).result(60) == ("big", 276.0)
    assert python_pool.submit(lambda x: x.sum(), python_pool.replicate(DATA)).result(60) == 276.0


def test_pools_without_python_refuse_untraceable_functions(pool: gp.Pool) -> None:
    with pytest.raises(gp.TracingError, match="--allow-python"):
        pool.submit(branchy, pool.replicate(DATA), 0)


def test_an_agent_without_allow_python_refuses_the_call_itself(pool: gp.Pool) -> None:
    """As an attacker would try: RunPython sent straight to an agent whose owner did not allow it."""
    session = pool._session
    agent = pool.agents()[0]
    payload = b"\x80\x05N."  # pickle of None: never unpickled there

    async def call() -> bytes:
        await session.grant([agent.id])
        channel = session.channel(agent.id, agent.endpoint)
        return await channel.run_python(0, payload, session=session.id, timeout=30)

    with pytest.raises(gp.AuthError, match="--allow-python"):
        session.run(call(), timeout=60, what="run python")
