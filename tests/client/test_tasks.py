"""``pool.submit``, ``pool.map`` and ``pool.replicate`` on a real pool (agents as processes): results in
order and equal to NumPy's, concurrent.futures semantics, one task per worker at a time, a failing task
failing alone, tracing errors before anything is queued, and tasks retried elsewhere when their agent is
killed with SIGKILL in the middle of a map.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import gpupool as gp
from gpupool.local import LocalPool

DATA = np.random.default_rng(1).standard_normal((512, 16)).astype(np.float32)


def train(x: Any, lr: float, steps: int) -> Any:
    """Least squares by gradient descent, in a loop on the agent."""

    def step(i: Any, w: Any) -> Any:
        return w - lr * (x.T @ (x @ w - 1.0)) / x.shape[0]

    w = gp.fori_loop(steps, step, np.zeros(16, np.float32))
    return w, ((x @ w - 1.0) ** 2).mean()


def train_numpy(lr: float, steps: int) -> tuple[np.ndarray, np.float32]:
    w = np.zeros(16, np.float32)
    for _ in range(steps):
        w = w - lr * (DATA.T @ (DATA @ w - 1.0)) / DATA.shape[0]
    return w, ((DATA @ w - 1.0) ** 2).mean()


def test_map_returns_numpys_results_in_order_and_says_where_each_ran(pool: gp.Pool) -> None:
    data = pool.replicate(DATA)
    rates = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3]
    futures = pool.map(train, [data] * len(rates), rates, [20] * len(rates))
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    _done, not_done = concurrent.futures.wait(futures, timeout=120)
    assert not not_done
    for future, lr in zip(futures, rates, strict=True):
        w, loss = future.result()
        want_w, want_loss = train_numpy(lr, 20)
        np.testing.assert_allclose(w, want_w, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(loss, want_loss, rtol=2e-4)
        assert isinstance(loss, np.float32)
    names = {agent.name for agent in pool.agents()}
    assert {f.where.split("/")[0] for f in futures} <= names
    assert len({f.where for f in futures}) == 2  # both workers took tasks
    data.free()


def test_submit_as_completed_and_a_failing_task_fails_alone(pool: gp.Pool) -> None:
    data = pool.replicate(DATA[:64])
    good = [pool.submit(lambda x, s: (x * s).sum(axis=0), data, s) for s in range(4)]
    # a 64 x 10**6 float32 intermediate: larger than the agent's memory limit, so the agent refuses it
    bad = pool.submit(
        lambda x: (x @ np.ones((16, 1), np.float32) * np.ones((1, 10**6), np.float32)).sum(), data
    )
    results = {id(f): f.result(60) for f in concurrent.futures.as_completed(good, timeout=60)}
    for s, future in enumerate(good):
        np.testing.assert_allclose(results[id(future)], (DATA[:64] * s).sum(axis=0), rtol=1e-5)
    assert isinstance(bad.exception(60), gp.DeviceOutOfMemory)
    assert (pool.submit(lambda x: x[0] + 1, data).result(60) == DATA[0] + 1).all()  # the pool carries on


def test_tracing_errors_come_at_once_and_queue_nothing(pool: gp.Pool) -> None:
    data = pool.replicate(DATA)
    with pytest.raises(gp.TracingError, match=r"gp\.where"):
        pool.map(lambda x, s: x if x.sum() > s else -x, [data] * 3, [0, 1, 2])
    x = pool.asarray(DATA)
    with pytest.raises(gp.TracingError, match=r"pool\.replicate"):
        pool.submit(lambda x: x + 1, x)
    with pytest.raises(gp.UsageError):
        pool.submit("not a function")  # type: ignore[arg-type]
    assert pool.map(lambda s: s, []) == []
    with pytest.raises(gp.TracingError, match="come back inline"):
        pool.submit(lambda x: x @ np.ones((16, 50_000), np.float32), data)  # 100 MB of results


def test_one_task_per_worker_at_a_time(pool: gp.Pool) -> None:
    """Tasks that each take a while: at no moment do more run than there are workers."""
    data = pool.replicate(DATA)
    running = 0
    most = 0
    lock = threading.Lock()
    futures = pool.map(train, [data] * 8, [0.01] * 8, [400] * 8)

    def watch(future: concurrent.futures.Future[Any]) -> None:
        nonlocal running, most
        with lock:
            running -= 1

    started = threading.Event()
    for future in futures:
        future.add_done_callback(watch)
    # Count tasks the futures say are running, while they run.
    while not all(f.done() for f in futures):
        with lock:
            most = max(most, sum(1 for f in futures if f.running()))
        started.wait(0.005)
    assert 1 <= most <= 2
    for future in futures:
        future.result()


@pytest.fixture
def killable(system_broker_url: str) -> Iterator[LocalPool]:
    with LocalPool(
        agents=2,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        coordinator_args=["--min-shard-bytes", "0", "--liveness", "3"],
    ) as local:
        yield local


def test_tasks_of_an_agent_killed_mid_map_run_again_elsewhere(killable: LocalPool) -> None:
    with killable.connect() as pool:
        data = pool.replicate(DATA)
        futures = pool.map(train, [data] * 12, [0.05] * 12, [1500] * 12)
        victim = killable.agents[0].ready["name"]
        first = next(concurrent.futures.as_completed(futures, timeout=120))
        assert first.result() is not None
        killable.kill_agent(0)  # SIGKILL, with tasks running and queued on it
        want_w, _want_loss = train_numpy(0.05, 1500)
        for future in futures:
            w, _loss = future.result(timeout=180)
            np.testing.assert_allclose(w, want_w, rtol=2e-4, atol=1e-6)
        late = [f for f in futures if f is not first and not f.where.startswith(victim)]
        assert late, "every task ran on the killed agent"
        assert sum(1 for f in futures if f.where.startswith(victim)) < len(futures)


def test_tiny_tasks_share_programs_and_a_failing_one_fails_alone(pool: gp.Pool) -> None:
    """Small tasks run many to a program (one round trip); when such a program fails, its tasks run again
    one by one, so that only the task at fault fails. The fault: a task whose traced program names a
    buffer that does not exist (the agent refuses it, as it would a lost one)."""
    tasks = pool._tasks
    data = pool.replicate(DATA[:8])
    queued = [tasks._task(lambda x, s: (x * s).sum(), (data, s), {}, 0) for s in range(40)]
    broken = queued[17].trace.ops[0]
    broken.inputs[0].buffer = "nowhere"
    futures = tasks._enqueue(queued)
    for s, future in enumerate(futures):
        if s == 17:
            assert isinstance(future.exception(60), gp.BufferNotFound)
        else:
            np.testing.assert_allclose(future.result(60), (DATA[:8] * s).sum(), rtol=1e-5)


def test_closing_the_pool_fails_the_tasks_still_queued(local_pool: LocalPool) -> None:
    pool = local_pool.connect()
    data = pool.replicate(DATA)
    futures = pool.map(train, [data] * 6, [0.01] * 6, [2000] * 6)
    pool.close()
    for future in futures:
        error = future.exception(timeout=30)  # each ends, one way or the other: none is left pending
        assert error is None or isinstance(error, gp.UsageError)
    assert any(isinstance(f.exception(), gp.UsageError) for f in futures)


def test_tasks_of_an_agent_frozen_mid_map_run_again_elsewhere(killable: LocalPool) -> None:
    """SIGSTOP (a hung rig): the calls waiting on it are abandoned once the coordinator shows it offline
    (its liveness is 3 s here), and their tasks run on the other agent."""
    with killable.connect() as pool:
        data = pool.replicate(DATA)
        futures = pool.map(train, [data] * 8, [0.05] * 8, [1500] * 8)
        frozen = killable.agents[0]
        first = next(concurrent.futures.as_completed(futures, timeout=120))
        assert first.result() is not None
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            want_w, _ = train_numpy(0.05, 1500)
            for future in futures:
                w, _loss = future.result(timeout=180)
                np.testing.assert_allclose(w, want_w, rtol=2e-4, atol=1e-6)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        victim = frozen.ready["name"]
        assert any(not f.where.startswith(victim) for f in futures)


def test_tasks_go_to_workers_with_room_for_them(system_broker_url: str) -> None:
    """A task that may take 36 MiB runs on the agent with 512 MiB, not the one with 16 MiB: placed by the
    workers' free memory, and, where that view was stale (here: made up), moved there after the agent
    with too little refused it out of memory."""
    with LocalPool(
        agents=1,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(16 << 20),
    ) as local:
        local.add_agent(name="roomy", args=["--memory-limit", str(512 << 20)])
        with local.connect() as pool:
            x = np.linspace(0, 1, 3000, dtype=np.float32)

            def outer_sum(v: Any, s: float) -> Any:
                return (v.reshape(-1, 1) * v.reshape(1, -1) * s).sum()

            want = [float((np.outer(x, x) * s).sum()) for s in range(4)]
            futures = pool.map(outer_sum, [x] * 4, range(4))
            assert [f.result(60) for f in futures] == pytest.approx(want, rel=1e-4, abs=1e-3)
            assert {f.where.split("/")[0] for f in futures} == {"roomy"}
            pool._tasks._free = {place: 1 << 40 for place in pool._tasks._free}  # a stale view
            futures = pool.map(outer_sum, [x] * 4, range(4))
            assert [f.result(60) for f in futures] == pytest.approx(want, rel=1e-4, abs=1e-3)
            assert {f.where.split("/")[0] for f in futures} == {"roomy"}
