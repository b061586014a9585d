"""Tasks (issue 8, item 6): ``pool.map`` of traced functions, one task per worker at a time.

- 1,000 tiny tasks, ``(data * i).sum()`` over a replicated 1,000-element float32 array, through
  ``pool.map`` on 2 local agents, against Dask's ``client.map`` of the same function on a LocalCluster of
  2 x 1 (the array scattered to both workers first, results gathered): both end with every result here.
- The sweep of ``examples/sweep.py`` (32 MLP trainings, 100 full-batch steps each on 4,096 x 32 float32,
  each a ``gp.fori_loop`` on its agent) on 2 local agents, against the same trainings one after another
  in NumPy in this process (``train_numpy``), with one BLAS thread as each agent has (the target) and
  with two; and, without a target, against Dask's ``client.map`` of ``train_numpy`` on its 2 x 1 cluster.

gpupool: 2 local agents (the default, secure pool), NumPy backend, one BLAS thread each. Each contender's
rounds interleave with the others', the order alternating, so load from elsewhere lands on all alike;
round 0 warms the pool and Dask up (tracing, connections) and is not counted. Every round checks the tiny
tasks' results; the last round's trainings are checked against NumPy's (float32 tolerance), and the
section raises where they differ.
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from bench._pools import local_gpupool
from bench.common import Context, Result
from bench.transfer import _Dask
from gpupool.cli.sweep import load_example

T = TypeVar("T")

SECTION = "tasks"
TINY_TARGET = 2.0  # times Dask's client.map + gather (issue 8, item 6)
SWEEP_TARGET = 1.8  # times the same trainings one after another here (issue 8, item 6)


def tiny(data: Any, i: Any) -> Any:
    """A tiny task: one elementwise op and a full reduction (traced by gpupool, run as is by Dask)."""
    return (data * i).sum()


def train_for_dask(x: np.ndarray, y: np.ndarray, lr: float, width: int, seed: int, steps: int) -> float:
    """``train_numpy`` on a Dask worker; its final loss (importable there: ``bench`` is on the path)."""
    example = load_example()
    return float(example.train_numpy(x, y, lr, example.initial_params(x.shape[1], width, seed), steps).loss)


@contextlib.contextmanager
def _blas_threads(count: int) -> Iterator[None]:
    """At most ``count`` BLAS threads in this process while inside (threadpoolctl, a bench dependency;
    without it, as many as BLAS takes: the figures are then not the quoted ones)."""
    if importlib.util.find_spec("threadpoolctl") is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=count):
        yield


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _rounds(
    contenders: dict[str, Callable[[], float]], repeats: int, *, warm: frozenset[str]
) -> dict[str, list[float]]:
    """Seconds of each contender over ``repeats`` interleaved rounds; ``warm`` also run once first."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for round_ in range(repeats + 1):
        for name in order if round_ % 2 else order[::-1]:
            if round_ or name in warm:
                elapsed = contenders[name]()
                if round_:
                    samples[name].append(elapsed)
    return samples


def run(ctx: Context) -> list[Result]:
    """Seconds of the tiny tasks and of the sweep on the pool and their baselines, and the ratios."""
    example = load_example()
    tasks = 100 if ctx.quick else 1000
    sweep = example.Sweep.quick() if ctx.quick else example.Sweep()
    sweep_repeats = max(1, min(ctx.repeats, 3))  # a round of the sweep rows takes about half a minute
    data = np.random.default_rng(0).standard_normal(1000, dtype=np.float32)
    expect_tiny = np.array([tiny(data, i) for i in range(tasks)])
    xy = example.make_data(sweep.rows, sweep.features, sweep.seed)
    grid = sweep.grid()
    dask = _Dask.available()

    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(local_gpupool())
        replicas = pool.replicate(data)

        def pool_tiny() -> float:
            elapsed, got = _timed(
                lambda: [f.result() for f in pool.map(tiny, [replicas] * tasks, range(tasks))]
            )
            if not np.allclose(np.asarray(got, dtype=np.float32), expect_tiny, rtol=1e-5, atol=1e-3):
                raise RuntimeError("gpupool: the tiny tasks' results differ from NumPy's")
            return elapsed

        last: dict[str, list[Any]] = {}  # the latest results of the pool and of NumPy, 1 thread

        def pool_sweep() -> float:
            elapsed, last["gpupool"] = _timed(lambda: example.run_sweep(pool, sweep, data=xy))
            return elapsed

        def numpy_sweep(threads: int) -> Callable[[], float]:
            def go() -> float:
                with _blas_threads(threads):
                    elapsed, results = _timed(lambda: example.run_numpy(sweep, data=xy))
                if threads == 1:
                    last["NumPy"] = results
                return elapsed

            return go

        tiny_contenders: dict[str, Callable[[], float]] = {"gpupool": pool_tiny}
        sweep_contenders: dict[str, Callable[[], float]] = {
            "gpupool": pool_sweep,
            "NumPy 1": numpy_sweep(1),
            "NumPy 2": numpy_sweep(2),
        }
        if dask:
            from bench.workloads import _dask_cluster

            cluster, client = _dask_cluster()
            stack.callback(cluster.close)
            stack.callback(client.close)
            data_future = client.scatter(data, broadcast=True, hash=False)
            x_future, y_future = (client.scatter(a, broadcast=True, hash=False) for a in xy)

            def dask_tiny() -> float:
                elapsed, got = _timed(
                    lambda: client.gather(client.map(tiny, [data_future] * tasks, range(tasks), pure=False))
                )
                if not np.allclose(np.asarray(got, dtype=np.float32), expect_tiny, rtol=1e-5, atol=1e-3):
                    raise RuntimeError("Dask: the tiny tasks' results differ from NumPy's")
                return elapsed

            def dask_sweep() -> float:
                def go() -> list[float]:
                    futures = client.map(
                        train_for_dask,
                        [x_future] * len(grid),
                        [y_future] * len(grid),
                        [lr for lr, _ in grid],
                        [width for _, width in grid],
                        [sweep.seed + k for k in range(len(grid))],
                        [sweep.steps] * len(grid),
                        pure=False,
                    )
                    return list(client.gather(futures))

                return _timed(go)[0]

            tiny_contenders["Dask"] = dask_tiny
            sweep_contenders["Dask"] = dask_sweep

        warm = frozenset({"gpupool", "Dask"})
        tiny_samples = _rounds(tiny_contenders, ctx.repeats, warm=warm)
        sweep_samples = _rounds(sweep_contenders, sweep_repeats, warm=warm)

    # A fast wrong answer is no figure: the pool's trainings against NumPy's, from the last round.
    pairs = zip(last["gpupool"], last["NumPy"], strict=True)
    mismatched = [(got.lr, got.width, bad) for got, want in pairs if (bad := example.check(got, want))]
    if mismatched:
        raise RuntimeError(f"gpupool: {len(mismatched)} trainings differ from NumPy's: {mismatched[:3]}")

    def median(samples: dict[str, list[float]], name: str) -> float | None:
        return statistics.median(samples[name]) if name in samples else None

    tasks_note = f"median of {ctx.repeats} after a warm-up run, every result fetched"
    sweep_note = (
        f"{len(grid)} trainings x {sweep.steps} steps on {sweep.rows}x{sweep.features} f32; "
        f"median of {sweep_repeats}"
    )
    sweep_name = f"sweep of {len(grid)} MLP trainings, 2 agents"
    rows: list[Result] = [
        Result(
            SECTION,
            f"{tasks:,} tiny tasks, pool.map of (data * i).sum(), replicated 1,000 f32",
            median(tiny_samples, "gpupool") or float("nan"),
            "s",
            better="lower",
            baseline_name="Dask 2x1 client.map + gather" if dask else "",
            baseline=median(tiny_samples, "Dask"),
            target=TINY_TARGET if dask else None,
            note=tasks_note,
            samples=tiny_samples["gpupool"],
        ),
    ]
    for baseline, label, target in (
        ("NumPy 1", "the same one after another, local NumPy, 1 BLAS thread", SWEEP_TARGET),
        ("NumPy 2", "the same one after another, local NumPy, 2 BLAS threads", None),
        ("Dask", "Dask 2x1 client.map of train_numpy", None),
    ):
        if baseline not in sweep_samples:
            continue
        rows.append(
            Result(
                SECTION,
                sweep_name,
                statistics.median(sweep_samples["gpupool"]),
                "s",
                better="lower",
                baseline_name=label,
                baseline=median(sweep_samples, baseline),
                target=target,
                note=sweep_note,
                samples=sweep_samples["gpupool"],
            )
        )
    return rows
