"""What a worker can do, measured where it runs: GEMM throughput (float32, float16) and host-to-device
bandwidth, in about a tenth of a second, when the worker starts.

Placement sizes shards by the float32 GEMM figure (:func:`gpupool.placement.split_rows`), so that a slow card
holds fewer rows than a fast one and the whole array does not wait for it. Each figure is the best of a few
timed runs after a warm-up (the best run is the card's speed; the others include whatever else ran).

``GPUPOOL_SLOWDOWN`` (tests and benchmarks only) makes a worker that many times slower than it is: it
sleeps after each program for the extra time, and its measured figures are divided alike, as a slower
card's would be.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool.agent.backend import ArrayBackend

__all__ = ["SLOWDOWN_ENV", "Measured", "measure", "slowdown"]

log = logging.getLogger(__name__)

#: Set to a factor above 1 where an agent starts, this slows its workers by that factor (tests, benchmarks).
SLOWDOWN_ENV: Final = "GPUPOOL_SLOWDOWN"

#: Matrix sizes per backend: big enough to be compute-bound, small enough to take milliseconds.
_GEMM_SIZE: Final = {"numpy": 256, "cupy": 2048}
_COPY_BYTES: Final = 16 << 20
_REPEATS: Final = 3


@dataclass(frozen=True, slots=True)
class Measured:
    """A worker's measured figures (0.0 where a figure could not be had)."""

    gemm_f32_gflops: float = 0.0
    gemm_f16_gflops: float = 0.0
    host_to_device_gbps: float = 0.0


def slowdown() -> float:
    """The factor ``GPUPOOL_SLOWDOWN`` asks for (1.0 when unset or unreadable)."""
    try:
        factor = float(os.environ.get(SLOWDOWN_ENV, "1"))
    except ValueError:
        return 1.0
    return factor if factor > 1.0 else 1.0


def measure(backend: ArrayBackend, *, factor: float = 1.0) -> Measured:
    """Time GEMMs and a host-to-device copy on ``backend`` (in a thread bound to its device)."""
    try:
        f32 = _gemm(backend, np.float32)
        f16 = _gemm(backend, np.float16)
        copy = _copy(backend)
    except Exception as exc:  # a figure we cannot get must not keep the worker from serving
        log.warning(
            "worker %d: could not measure its speed (%s); placed by memory alone", backend.device_index, exc
        )
        return Measured()
    measured = Measured(f32 / factor, f16 / factor, copy / factor)
    log.info(
        "worker %d measured: GEMM %.1f GFLOP/s float32, %.1f float16; host to device %.2f GB/s",
        backend.device_index,
        measured.gemm_f32_gflops,
        measured.gemm_f16_gflops,
        measured.host_to_device_gbps,
    )
    return measured


def _best(run: Callable[[], Any], synchronize: Callable[[], None]) -> float:
    run()
    synchronize()  # warm-up: the BLAS handle, the kernel cache, first-touch pages
    best = float("inf")
    for _ in range(_REPEATS):
        start = time.perf_counter()
        run()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _gemm(backend: ArrayBackend, dtype: type[np.generic]) -> float:
    n = _GEMM_SIZE.get(backend.name, 256)
    if backend.name == "numpy" and dtype is np.float16:
        n = 64  # NumPy has no float16 BLAS: a loop in C, far slower; a small size keeps this quick
    xp = backend.xp
    a = backend.to_device(np.ones((n, n), dtype))
    b = backend.to_device(np.ones((n, n), dtype))
    seconds = _best(lambda: xp.matmul(a, b), backend.synchronize)
    return 2 * n**3 / seconds / 1e9


def _copy(backend: ArrayBackend) -> float:
    host = np.ones(_COPY_BYTES, np.uint8)
    target = backend.empty((_COPY_BYTES,), np.dtype(np.uint8))
    # copy_in: what an upload does with each staging block (a memory copy on a NumPy worker).
    seconds = _best(lambda: backend.copy_in(target, 0, host), backend.synchronize)
    return _COPY_BYTES / seconds / 1e9
