"""Placement by measured speed: a chain of ops over an array on one fast and one slowed agent, with shards
sized by each worker's measured speed (the coordinator's default) against shards sized by free memory
(``--placement memory``), in the same run.

The slowed agent runs with ``GPUPOOL_SLOWDOWN`` (:mod:`gpupool.agent.measure`): its worker sleeps after each
program for (factor - 1) times the program's time, and measures itself that much slower, as a slower card
would. Both agents have the same memory, so memory-proportional shards are halves and the whole array waits
for the slow half.
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

SECTION = "placement"
#: How much slower the slowed agent is, and the target: the chain at least this much sooner by speed.
SLOWDOWN = 4.0
TARGET = 1.5


@contextlib.contextmanager
def _mixed_pool(placement: str) -> Iterator[gp.Pool]:
    """One agent as it is and one slowed, both with 1 GiB, on a coordinator placing by ``placement``."""
    with LocalPool(
        agents=1,
        port=0,
        backend="numpy",
        memory_limit=str(1 << 30),
        coordinator_args=["--placement", placement],
        stderr=subprocess.DEVNULL,
    ) as local:
        local.add_agent(name="slowed", env={SLOWDOWN_ENV: str(SLOWDOWN)})
        with local.connect() as pool:
            yield pool


def _chain(x: gp.RemoteArray) -> float:
    """Ten elementwise steps and a sum, computed on the pool."""
    y = x
    for _ in range(5):
        y = gp.sqrt(y * y + 1.0) - 0.5
        y = gp.persist(y)[0]
    return float(gp.sum(y))


def _time_chain(placement: str, host: np.ndarray, repeats: int) -> tuple[float, list[float], list[int]]:
    with _mixed_pool(placement) as pool:
        x = pool.asarray(host)
        rows = [shard.stop - shard.start for shard in x.shards]
        want = float(np.sum(_chain_numpy(host)))
        got = _chain(x)
        if not np.isclose(got, want, rtol=1e-4):
            raise AssertionError(f"the chain on the pool gave {got}, NumPy {want}")
        seconds, samples = median_time(lambda: _chain(x), repeats)
    return seconds, samples, rows


def _chain_numpy(host: np.ndarray) -> np.ndarray:
    y = host
    for _ in range(5):
        y = np.sqrt(y * y + np.float32(1.0)) - np.float32(0.5)
    return y


def run(ctx: Context) -> list[Result]:
    """The section's figures."""
    # 32 MiB: each agent's intermediates stay under glibc's largest mmap threshold, so they reuse freed
    # heap memory instead of faulting fresh pages in (slow and erratic on a small VM) at every step.
    rows = 1 << 14 if ctx.quick else 1 << 17
    host = np.random.default_rng(3).random((rows, 64), dtype=np.float32)
    by_speed, samples, speed_rows = _time_chain("speed", host, ctx.repeats)
    by_memory, _, memory_rows = _time_chain("memory", host, ctx.repeats)
    note = (
        f"{rows}x64 f32, one agent slowed {SLOWDOWN:g}x; rows by speed {speed_rows}, "
        f"by memory {memory_rows}; median of {ctx.repeats}"
    )
    return [
        Result(
            SECTION,
            "a chain on one fast and one slowed agent, shards by measured speed",
            by_speed,
            "s",
            better="lower",
            baseline_name="shards by free memory (--placement memory)",
            baseline=by_memory,
            target=TARGET,
            note=note,
            samples=samples,
        )
    ]
