"""Workloads against Dask and NumPy, data already resident in each system.

gpupool: 2 local agents, NumPy backend, one BLAS thread each. Dask: distributed LocalCluster(n_workers=2,
threads_per_worker=1). NumPy: this process, 2 BLAS threads (the machine's limit) for the matmul.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import gpupool as gp
from bench._pools import local_gpupool
from bench.common import Context, Result, median_time


def _dask_cluster(*, secure: bool = False):  # type: ignore[no-untyped-def]
    """A LocalCluster of 2 workers x 1 thread (processes) and its client; ``secure``: TLS between all of
    them, with Dask's own temporary certificates (``Security.temporary()``)."""
    import dask
    from distributed import Client, LocalCluster
    from distributed.security import Security

    dask.config.set({"logging.distributed": "error"})
    security = Security.temporary() if secure else None
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # None still takes 8787, and a second cluster then warns that it is in use
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        **({"security": security, "protocol": "tls://"} if secure else {}),
    )
    return cluster, Client(cluster, security=security) if secure else Client(cluster)


def _dask_persist_time(client: Any, make: Callable[[], Any], repeats: int) -> float:
    """Median time to persist ``make()`` on the cluster, each run from scratch.

    Dask names results by their inputs, so a result still in memory would be reused, not recomputed:
    between runs, the last result is released and the scheduler is asked until it is gone (untimed).
    """
    from dask.core import flatten
    from distributed import wait

    samples = []
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        result = make().persist()
        wait(result)
        if attempt:  # the first run is a warm-up
            samples.append(time.perf_counter() - start)
        keys = list(flatten(result.__dask_keys__()))
        del result
        deadline = time.monotonic() + 10
        while any(client.who_has(keys).values()) and time.monotonic() < deadline:
            time.sleep(0.01)
    return statistics.median(samples)


def run(ctx: Context) -> list[Result]:
    """The section's figures."""
    import dask.array as da
    from distributed import wait

    n = 1024 if ctx.quick else 4096
    chain_n = (4 << 20) if ctx.quick else (64 << 20)
    small_ops = 200 if ctx.quick else 2000
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    v = rng.standard_normal(chain_n, dtype=np.float32)
    s = np.ones(1000, np.float32)
    repeats = ctx.repeats
    results: list[Result] = []

    # NumPy, in this process
    numpy_mm, _ = median_time(lambda: a @ b, repeats)
    numpy_chain, _ = median_time(lambda: ((v * 2 + 1) ** 2).sum(), repeats)
    numpy_small, _ = median_time(lambda: [s + i for i in range(small_ops)], repeats)

    # gpupool
    with local_gpupool() as pool:
        x, w = pool.asarray(a), pool.asarray(b)
        gp_mm, _ = median_time(lambda: (x @ w).persist(), repeats)  # the warm-up run replicates w once
        xv = pool.asarray(v)
        gp_chain, _ = median_time(lambda: float(((xv * 2 + 1) ** 2).sum()), repeats)  # forced: lazy
        check = float(((xv * 2 + 1) ** 2).sum())
        xs = pool.asarray(s)
        gp_small, _ = median_time(lambda: gp.persist(*(xs + i for i in range(small_ops))), repeats)
        gp_small_seq, _ = median_time(lambda: [(xs + i).persist() for i in range(small_ops // 10)], 3)
        gp_small_seq *= 10
        mm_shards = len(x.shards)
    assert np.isclose(check, float(((v.astype(np.float64) * 2 + 1) ** 2).sum()), rtol=1e-4)

    # Dask
    cluster, client = _dask_cluster()
    try:
        # Scattered first, so each system starts from resident data (and Dask warns of no large graphs).
        dx = da.concatenate(
            [da.from_delayed(client.scatter(part), part.shape, part.dtype) for part in np.array_split(a, 2)]
        ).persist()
        dw = da.from_delayed(client.scatter(b, broadcast=True), b.shape, b.dtype).persist()
        dv = da.concatenate(
            [da.from_delayed(client.scatter(part), part.shape, part.dtype) for part in np.array_split(v, 2)]
        ).persist()
        wait([dx, dw, dv])

        dask_mm_t = _dask_persist_time(client, lambda: dx @ dw, repeats)
        dx2 = dx.rechunk((n // 2, n // 2)).persist()
        dw2 = dw.rechunk((n // 2, n // 2)).persist()
        wait([dx2, dw2])
        dask_mm_blocks = _dask_persist_time(client, lambda: dx2 @ dw2, repeats)
        dask_chain, _ = median_time(lambda: ((dv * 2 + 1) ** 2).sum().compute(), repeats)
        s_future = client.scatter(s, broadcast=True)

        def dask_small() -> None:
            futures = [client.submit(np.add, s_future, i, pure=False) for i in range(small_ops)]
            wait(futures)
            del futures

        dask_small_t, _ = median_time(dask_small, repeats)
    finally:
        client.close()
        cluster.close()

    results += [
        Result(
            "workloads",
            f"matmul {n}x{n} f32, row-sharded x replicated",
            gp_mm,
            "s",
            better="lower",
            baseline_name="local NumPy, 2 threads",
            baseline=numpy_mm,
            target=0.9,
            note=f"{mm_shards} shards",
        ),
        Result(
            "workloads",
            "matmul, same row sharding",
            gp_mm,
            "s",
            better="lower",
            baseline_name="Dask 2x1, row chunks",
            baseline=dask_mm_t,
            target=1.0,
        ),
        Result(
            "workloads",
            "matmul",
            gp_mm,
            "s",
            better="lower",
            baseline_name=f"Dask 2x1, {n // 2}^2 blocks",
            baseline=dask_mm_blocks,
        ),
        Result(
            "workloads",
            f"((x*2+1)**2).sum(), {chain_n >> 20}M f32",
            gp_chain,
            "s",
            better="lower",
            baseline_name="Dask 2x1",
            baseline=dask_chain,
            target=1.5,
        ),
        Result(
            "workloads",
            "((x*2+1)**2).sum()",
            gp_chain,
            "s",
            better="lower",
            baseline_name="local NumPy",
            baseline=numpy_chain,
        ),
        Result(
            "workloads",
            f"{small_ops} independent small ops, gp.persist",
            gp_small,
            "s",
            better="lower",
            baseline_name="Dask 2x1, client.submit",
            baseline=dask_small_t,
            target=5.0,
        ),
        Result(
            "workloads",
            f"{small_ops} small ops, one round trip each",
            gp_small_seq,
            "s",
            better="lower",
            baseline_name="Dask 2x1, client.submit",
            baseline=dask_small_t,
        ),
        Result(
            "workloads",
            f"{small_ops} small ops",
            gp_small,
            "s",
            better="lower",
            baseline_name="local NumPy loop",
            baseline=numpy_small,
        ),
    ]
    return results
