"""The fault suite, with a score (issue 9, item 7): one pool of real agents, a seeded schedule of faults
injected with real processes and real signals, and every result compared with NumPy.

Each round opens a session, uploads random rows, computes a chain (persisted) and a reduction, and injects
one fault on the way:

- ``sigkill``: an agent holding a shard is SIGKILLed between ops (rebuilt from lineage);
- ``sigkill-mid``: an agent is SIGKILLed while its program runs (the call fails; rebuilt; run again);
- ``sigstop``: an agent is frozen until the coordinator shows it offline (the work moves), then thawed;
- ``worker``: an agent's worker process is SIGKILLed (the agent says its buffers were lost; rebuilt);
- ``slow``: a slowed agent joins and takes rows (its program is twinned on another agent);
- ``corrupt``: an agent that corrupts results joins (verification catches it; the work is redone);
- ``drain``: an agent holding a shard is drained (its buffers move agent to agent; the client follows);
- ``coordinator``: the coordinator is stopped and started again mid-session (the client reconnects).

The pool is brought back to four healthy agents after each round. ``GPUPOOL_FAULT_SEED`` and
``GPUPOOL_FAULT_ROUNDS`` change the schedule (default: seed 2026, every fault twice).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

import gpupool as gp
from gpupool._process import Child
from gpupool._proto.v1 import coordinator_pb2
from gpupool.agent.corruption import CORRUPT_ENV, LOG_MARK
from gpupool.agent.measure import SLOWDOWN_ENV
from gpupool.agent.workerproc import FAULT_INJECTION_ENV
from gpupool.local import LocalPool

FAULTS = ("sigkill", "sigkill-mid", "sigstop", "worker", "slow", "corrupt", "drain", "coordinator")
SEED = int(os.environ.get("GPUPOOL_FAULT_SEED", "2026"))
ROUNDS = int(os.environ.get("GPUPOOL_FAULT_ROUNDS", str(2 * len(FAULTS))))
WORKER_COMMAND = "from gpupool.agent.workerproc import entry; entry()"
HEALTHY = 4


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[LocalPool, Path]]:
    log = tmp_path / "pool.log"
    with (
        log.open("wb") as stream,
        LocalPool(
            agents=HEALTHY,
            port=0,
            backend="numpy",
            memory_limit="256MiB",
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            coordinator_args=[
                *("--min-shard-bytes", "0", "--liveness", "2", "--placement", "memory"),
                *("--quarantine-after", "1000"),
            ],
            agent_args=["--heartbeat", "0.3"],
            stderr=stream,
        ) as local,
    ):
        yield local, log


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def holder(local: LocalPool, array: gp.RemoteArray, rng: random.Random) -> Child:
    """A live agent of ``local`` that holds a shard of ``array``."""
    by_id = {str(a.ready["agent_id"]): a for a in local.live_agents()}
    return by_id[rng.choice(sorted({s.agent_id for s in array.shards} & set(by_id)))]


def chain(x: object) -> object:
    return np.sqrt(np.abs(x) * 2.0 + 1.0) - 0.5  # type: ignore[operator]


def test_the_fault_suite_every_result_matches_numpy(pool: tuple[LocalPool, Path]) -> None:
    local, log = pool
    rng = random.Random(SEED)
    schedule = [FAULTS[i % len(FAULTS)] for i in range(ROUNDS)]
    rng.shuffle(schedule)
    injected: collections.Counter[str] = collections.Counter()
    matched = 0
    caught = 0
    twins = 0
    started = time.monotonic()
    for number, fault in enumerate(schedule):
        print(f"round {number}: {fault}", flush=True)
        data = np.random.default_rng(SEED + number).standard_normal((20_000, 8))
        extra: list[Child] = []
        if fault == "slow":
            extra.append(local.add_agent(name=f"slow-{number}", env={SLOWDOWN_ENV: "2000"}))
        if fault == "corrupt":
            env = {FAULT_INJECTION_ENV: "1", CORRUPT_ENV: f"1.0:{number}"}
            extra.append(local.add_agent(name=f"liar-{number}", env=env))
        options = {"verify": 1.0} if fault == "corrupt" else {}
        with local.connect(**options) as session:  # type: ignore[arg-type]
            x = session.asarray(data)
            y = chain(x).persist()  # type: ignore[attr-defined]
            victim = holder(local, y, rng)
            thawed: list[int] = []
            if fault == "sigkill":
                victim.kill()
            elif fault == "sigkill-mid":
                z = (y * 3 + 1) ** 2
                timer = threading.Timer(0.05, victim.kill)
                timer.start()
                total = float(z.sum())
                timer.join()
                np.testing.assert_allclose(total, float(((chain(data) * 3 + 1) ** 2).sum()), rtol=1e-9)
            elif fault == "sigstop":
                os.kill(victim.pid, signal.SIGSTOP)
                thawed.append(victim.pid)
            elif fault == "worker":
                (worker,) = [
                    p for p in psutil.Process(victim.pid).children() if WORKER_COMMAND in p.cmdline()
                ]
                worker.kill()
                worker.wait(10)
            elif fault == "coordinator":
                local.restart_coordinator(down_for=0.3)
            elif fault == "drain":
                local.coordinator_client().call(
                    "Drain",
                    coordinator_pb2.AdminRequest(
                        agent_id=str(victim.ready["agent_id"]), reason="fault suite"
                    ),
                    timeout=60,
                )
            try:
                want = chain(data)
                got_sum = float((y * 2).sum())
                got = y.get()
                np.testing.assert_allclose(got_sum, float((want * 2).sum()), rtol=1e-9)  # type: ignore[operator]
                np.testing.assert_allclose(got, want, rtol=1e-12)
                matched += 1
            finally:
                for pid in thawed:
                    os.kill(pid, signal.SIGCONT)
            caught += session._session.verification.wrong
            twins += session._session.recovery.twins_won
        injected[fault] += 1
        # Back to four healthy agents: the faulty or extra ones go, fresh ones come.
        for child in extra:
            child.kill()
        if fault in ("sigkill", "sigkill-mid", "sigstop", "drain"):
            victim.kill()
        live = [a for a in local.live_agents() if a not in extra]
        for _ in range(HEALTHY - len(live)):
            local.add_agent()
    seconds = time.monotonic() - started
    corruptions = sum(LOG_MARK in line for line in log.read_text(errors="replace").splitlines())
    print(
        f"fault suite, seed {SEED}: {sum(injected.values())} faults injected "
        f"({', '.join(f'{k} {v}' for k, v in sorted(injected.items()))}), "
        f"{matched} of {len(schedule)} rounds matched NumPy; {corruptions} corruptions injected, "
        f"{caught} caught; {twins} twins won; {seconds:.1f} s"
    )
    assert matched == len(schedule)
    assert set(injected) == set(FAULTS) or len(FAULTS) > ROUNDS
    if injected["corrupt"]:
        assert caught >= 1
        assert corruptions >= caught
    if injected["slow"]:
        assert twins >= 1
