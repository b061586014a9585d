"""The GPU section: gpupool with one local CuPy agent against CuPy in this process, on the same GPU.

Skipped (no rows) where CuPy cannot reach a CUDA device.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

import gpupool as gp
from bench._pools import local_gpupool
from bench.common import Context, Result


def _cupy() -> Any:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    return None


def run(ctx: Context) -> list[Result]:
    """The section's figures, or none without a GPU."""
    cp = _cupy()
    if cp is None:
        print("no CUDA device with CuPy here: GPU section skipped")
        return []
    n = 2048 if ctx.quick else 8192
    chain = 4 if ctx.quick else 10
    upload_bytes = (64 if ctx.quick else 1024) << 20
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    w = (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32)
    flops = 2.0 * n**3 * chain
    big = np.ones(upload_bytes // 4, np.float32)

    # Local CuPy: the same chain on resident data, synchronised at the end.
    xa, wa = cp.asarray(a), cp.asarray(w)

    def local_chain() -> None:
        y = xa
        for _ in range(chain):
            y = y @ wa
        cp.cuda.Device().synchronize()

    local_chain()
    local_times = []
    for _ in range(ctx.repeats):
        start = time.perf_counter()
        local_chain()
        local_times.append(time.perf_counter() - start)
    local_up = []
    for _ in range(ctx.repeats):
        start = time.perf_counter()
        on_device = cp.asarray(big)
        cp.cuda.Device().synchronize()
        local_up.append(upload_bytes / (time.perf_counter() - start) / 1e9)
        del on_device
    cp.get_default_memory_pool().free_all_blocks()
    model = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()

    with local_gpupool(agents=1, backend="cupy") as pool:
        x, wr = pool.asarray(a), pool.asarray(w)

        def pool_chain() -> None:
            y = x
            for _ in range(chain):
                y = y @ wr
            y.persist()  # one program: the matmuls run back to back on the agent's GPU

        pool_chain()
        pool_times = []
        for _ in range(ctx.repeats):
            start = time.perf_counter()
            pool_chain()
            pool_times.append(time.perf_counter() - start)
        pool_up = []
        for _ in range(ctx.repeats):
            start = time.perf_counter()
            remote = pool.asarray(big)
            pool_up.append(upload_bytes / (time.perf_counter() - start) / 1e9)
            remote.free()
        check = gp.persist(x @ wr)[0].get()

        # A task: the same chain as one traced program on the agent (pool.submit, gp.fori_loop).
        xs, ws = pool.replicate(a), pool.replicate(w)

        def task(x: Any, w: Any) -> Any:
            return gp.fori_loop(chain, lambda i, y: y @ w, x)[:1, :4]

        pool.submit(task, xs, ws).result(600)
        task_times = []
        for _ in range(ctx.repeats):
            start = time.perf_counter()
            task_result = pool.submit(task, xs, ws).result(600)
            task_times.append(time.perf_counter() - start)

        # An elementwise chain and its reduction over a resident array (fused on NumPy agents only so far).
        elements = (16 if ctx.quick else 256) << 20
        z = pool.asarray(np.ones(elements, np.float32))
        float(((z * 2 + 1) ** 2).sum())
        chain_times = []
        for _ in range(ctx.repeats):
            start = time.perf_counter()
            float(((z * 2 + 1) ** 2).sum())
            chain_times.append(time.perf_counter() - start)
        z.free()
    np.testing.assert_allclose(check[:4], (a @ w)[:4], rtol=1e-2, atol=1e-2)
    want = a[:1]
    for _ in range(chain):
        want = want @ w
    np.testing.assert_allclose(task_result, want[:, :4], rtol=1e-2, atol=1e-2)

    za = cp.ones(elements, cp.float32)
    float(((za * 2 + 1) ** 2).sum())
    local_chain_times = []
    for _ in range(ctx.repeats):
        start = time.perf_counter()
        float(((za * 2 + 1) ** 2).sum())
        local_chain_times.append(time.perf_counter() - start)
    del za

    local_tflops = flops / statistics.median(local_times) / 1e12
    pool_tflops = flops / statistics.median(pool_times) / 1e12
    return [
        Result(
            "gpu",
            f"{chain} chained {n}^2 f32 matmuls, resident",
            pool_tflops,
            "TFLOP/s",
            baseline_name="local CuPy, same GPU",
            baseline=local_tflops,
            target=0.9,
            note=model,
        ),
        Result(
            "gpu",
            f"a task of {chain} chained {n}^2 f32 matmuls (pool.submit, gp.fori_loop)",
            flops / statistics.median(task_times) / 1e12,
            "TFLOP/s",
            baseline_name="local CuPy, same GPU",
            baseline=local_tflops,
            target=0.9,
            note=model,
        ),
        Result(
            "gpu",
            f"((x*2+1)**2).sum(), {elements >> 20}M resident f32",
            statistics.median(chain_times),
            "s",
            better="lower",
            baseline_name="local CuPy, same GPU",
            baseline=statistics.median(local_chain_times),
            target=0.5,
            note=f"{model}; no fused kernels on CuPy agents yet",
        ),
        Result(
            "gpu",
            f"upload {upload_bytes >> 20} MiB",
            statistics.median(pool_up),
            "GB/s",
            baseline_name="local cupy.asarray (pageable)",
            baseline=statistics.median(local_up),
        ),
    ]
