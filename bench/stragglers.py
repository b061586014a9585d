"""Stragglers: the same upload and chain of ops on three agents, one of them slowed, against three healthy
agents, in the same run (issue 9, item 3). Shards are sized by free memory (``--placement memory``), so
the slowed agent holds a third of the rows and placement by speed cannot hide it: what keeps the array
from waiting for it is the speculative twin (:mod:`gpupool.client.stragglers`), which reruns its shard's
program on a healthy worker and moves its buffers there for good.

Each timed run is a new session (connect, upload, chain, close): a session that gave the slowed agent up
places nothing new on it, so a new one gets its third again and pays for noticing the straggler and for
the twin's rebuild every time.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import numpy as np

import gpupool as gp
from bench.common import Context, Result, median_time
from gpupool.agent.measure import SLOWDOWN_ENV
from gpupool.local import LocalPool

SECTION = "stragglers"
#: How much slower the slowed agent is; the target: the slowed case within 1.5x the healthy one's time (the
#: ratio, healthy time / slowed time, at least 1 / 1.5).
SLOWDOWN = 20.0
TARGET = 1 / 1.5
#: Persisted steps of the chain: about a second of work on three healthy agents here.
STEPS = 24


@contextlib.contextmanager
def _pool(slowed: bool) -> Iterator[LocalPool]:
    """Three agents with 1 GiB each (the third slowed, or not), on a coordinator placing by memory."""
    with LocalPool(
        agents=2,
        port=0,
        backend="numpy",
        memory_limit=str(1 << 30),
        coordinator_args=["--placement", "memory", "--min-shard-bytes", "0"],
        stderr=subprocess.DEVNULL,
    ) as local:
        local.add_agent(name="third", env={SLOWDOWN_ENV: str(SLOWDOWN)} if slowed else None)
        yield local


def _steps(y: gp.RemoteArray, steps: int) -> gp.RemoteArray:
    for _ in range(steps):
        y = gp.persist(gp.sqrt(y * y + 1.0) - 0.5)[0]
    return y


def _numpy(host: np.ndarray, steps: int) -> float:
    y = host
    for _ in range(steps):
        y = np.sqrt(y * y + np.float32(1.0)) - np.float32(0.5)
    return float(np.sum(y, dtype=np.float64))


def _time(
    slowed: bool, host: np.ndarray, steps: int, repeats: int, twins: bool = True
) -> tuple[float, list[float]]:
    want = _numpy(host, steps)
    with _pool(slowed) as local:

        def once() -> None:
            with local.connect(twins=twins) as pool:
                got = float(gp.sum(_steps(pool.asarray(host), steps)))
            if not np.isclose(got, want, rtol=1e-4):
                raise AssertionError(f"the chain on the pool gave {got}, NumPy {want}")

        once()  # warm-up (and a check)
        return median_time(once, repeats)


def run(ctx: Context) -> list[Result]:
    """The section's figures."""
    rows, steps = (1 << 12, 3) if ctx.quick else (1 << 17, STEPS)
    host = np.random.default_rng(5).random((rows, 64), dtype=np.float32)
    healthy, _ = _time(False, host, steps, ctx.repeats)
    slowed, samples = _time(True, host, steps, ctx.repeats)
    waited, _ = _time(True, host, steps, max(1, ctx.repeats // 2), twins=False)
    note = (
        f"{rows}x64 f32, a new session's upload, {steps} persisted steps and a sum, 3 agents by memory, "
        f"one slowed {SLOWDOWN:g}x; without twins the slowed case took {waited:.3f} s; "
        f"median of {ctx.repeats}"
    )
    return [
        Result(
            SECTION,
            "upload and a chain with one of three agents slowed, speculative twins on",
            slowed,
            "s",
            better="lower",
            baseline_name="the same on three healthy agents",
            baseline=healthy,
            target=TARGET,
            note=note,
            samples=samples,
        )
    ]
