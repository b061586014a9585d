"""A hyperparameter sweep over a gpupool: one whole training per task, 16 learning rates x 2 widths.

A 2-layer MLP (tanh hidden layer, sigmoid output, binary cross-entropy) with hand-written gradients is
trained full-batch on a synthetic classification data set. The data set goes to every worker once
(``pool.replicate``); each task gets its learning rate and its initial weights (small host arrays, seeded,
so every run starts from the same weights) and runs its whole training on the agent inside
``gp.fori_loop``: one program per task, no round trip per step. ``pool.map`` runs one task per worker at a
time, placed by free capacity, and retries a task whose agent is lost on another worker::

    . ~/.local/state/gpupool/pool/client.env          # or --coordinator ADDR --token TOKEN
    python examples/sweep.py                           # the ranked table, and where each training ran
    python examples/sweep.py --check                   # and every result against the same NumPy training

The training is written once, over an array namespace ``xp``: ``gp`` inside a task (where it is traced
into a program of the agents' ops, as ``jax.jit`` traces) and ``numpy`` in :func:`train_numpy`, the
reference that ``gpupool demo --sweep`` and the benchmark compare with.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import gpupool as gp

__all__ = [
    "Result",
    "Sweep",
    "check",
    "initial_params",
    "main",
    "make_data",
    "print_table",
    "report_checks",
    "run_numpy",
    "run_sweep",
    "train_numpy",
]

Params = dict[str, Any]  # "w1" (features x width), "b1" (width,), "w2" (width x 1), "b2" (1,)
PARAM_NAMES = ("w1", "b1", "w2", "b2")


@dataclass(frozen=True, slots=True)
class Sweep:
    """What a sweep trains: the data set's size and seed, the grid, the steps and the weights' seed."""

    rows: int = 4096
    features: int = 32
    # Up to 5: beyond about 10, float32 training turns chaotic here (two summation orders of the same
    # gradients end far apart), and a comparison with NumPy would measure rounding, not correctness.
    learning_rates: tuple[float, ...] = tuple(float(lr) for lr in np.geomspace(0.01, 5.0, 16))
    widths: tuple[int, ...] = (16, 64)
    steps: int = 100
    seed: int = 0

    @classmethod
    def quick(cls) -> Sweep:
        """A small sweep for tests and smoke runs: 4 learning rates x 2 widths, 512 rows, 20 steps."""
        return cls(rows=512, learning_rates=(0.03, 0.1, 0.3, 1.0), widths=(8, 16), steps=20)

    def grid(self) -> list[tuple[float, int]]:
        """Every (learning rate, width) pair, widths outermost."""
        return [(lr, width) for width in self.widths for lr in self.learning_rates]


@dataclass(frozen=True, slots=True)
class Result:
    """One training's outcome: the final loss and accuracy on the data set, the weights and where it ran."""

    lr: float
    width: int
    loss: float
    accuracy: float
    params: Params
    where: str = "here"


# -- the data set and the initial weights: seeded NumPy, the same on every run ------------------------------
def make_data(rows: int = 4096, features: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (rows x features, float32) and labels (rows x 1, 0 or 1) from a hidden 2-layer teacher."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    teacher = rng.standard_normal((features, 8)) / np.sqrt(features)
    logits = np.tanh(x @ teacher) @ rng.standard_normal(8) + 0.3 * rng.standard_normal(rows)
    y = (logits > 0).astype(np.float32).reshape(rows, 1)
    return x, y


def initial_params(features: int, width: int, seed: int) -> Params:
    """Seeded initial weights (Glorot-like scale), float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((features, width)) / np.sqrt(features)).astype(np.float32),
        "b1": np.zeros(width, np.float32),
        "w2": (rng.standard_normal((width, 1)) / np.sqrt(width)).astype(np.float32),
        "b2": np.zeros(1, np.float32),
    }


# -- the model, written once over an array namespace ``xp`` (numpy, or gp inside a traced task) -------------
def _forward(xp: Any, x: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> tuple[Any, Any]:
    """The hidden activations (rows x width) and the output logits (rows x 1)."""
    h = xp.tanh(x @ w1 + b1)
    return h, h @ w2 + b2


def _loss_terms(xp: Any, z: Any, y: Any) -> tuple[Any, Any, Any]:
    """Per-row sigmoid, cross-entropy and correctness for logits ``z``, without overflow for any ``z``."""
    e = xp.exp(-xp.abs(z))  # in (0, 1]: exp never overflows
    p = xp.where(z >= 0, 1 / (1 + e), e / (1 + e))
    loss = xp.maximum(z, 0) - y * z + xp.log(1 + e)  # log(1 + exp(z)) - y z
    correct = xp.where(z >= 0, y, 1 - y)
    return p, loss, correct


def _step(xp: Any, x: Any, y: Any, lr: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> tuple[Any, ...]:
    """One full-batch gradient-descent step; the new (w1, b1, w2, b2)."""
    h, z = _forward(xp, x, w1, b1, w2, b2)
    p, _, _ = _loss_terms(xp, z, y)
    dz = (p - y) / x.shape[0]  # d loss / d z, the loss being the mean over rows
    dh = (dz @ w2.T) * (1 - h * h)
    return (
        w1 - lr * (x.T @ dh),
        b1 - lr * xp.sum(dh, axis=0),
        w2 - lr * (h.T @ dz),
        b2 - lr * xp.sum(dz, axis=0),
    )


def _evaluate(xp: Any, x: Any, y: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> tuple[Any, Any]:
    """Mean cross-entropy and accuracy over the data set."""
    _, z = _forward(xp, x, w1, b1, w2, b2)
    _, loss, correct = _loss_terms(xp, z, y)
    return xp.mean(loss), xp.mean(correct)


def make_task(steps: int) -> Callable[..., dict[str, Any]]:
    """The task ``pool.map`` runs: ``steps`` training steps on the agent, then the loss and accuracy.

    ``steps`` is fixed when the task is traced (a loop's trip count is part of the program).
    """

    def train(x: Any, y: Any, lr: float, w1: Any, b1: Any, w2: Any, b2: Any) -> dict[str, Any]:
        def body(i: Any, params: tuple[Any, ...]) -> tuple[Any, ...]:
            return _step(gp, x, y, lr, *params)

        w1, b1, w2, b2 = gp.fori_loop(steps, body, (w1, b1, w2, b2))
        loss, accuracy = _evaluate(gp, x, y, w1, b1, w2, b2)
        return {"loss": loss, "accuracy": accuracy, "w1": w1, "b1": b1, "w2": w2, "b2": b2}

    return train


def train_numpy(x: np.ndarray, y: np.ndarray, lr: float, params: Params, steps: int) -> Result:
    """The same training as a task, in NumPy in this process: the reference the pool's results meet."""
    w1, b1, w2, b2 = (params[name] for name in PARAM_NAMES)
    for _ in range(steps):
        w1, b1, w2, b2 = _step(np, x, y, lr, w1, b1, w2, b2)
    loss, accuracy = _evaluate(np, x, y, w1, b1, w2, b2)
    final = dict(zip(PARAM_NAMES, (w1, b1, w2, b2), strict=True))
    return Result(lr=lr, width=w1.shape[1], loss=float(loss), accuracy=float(accuracy), params=final)


# -- the sweep -----------------------------------------------------------------------------------------------
def run_sweep(
    pool: gp.Pool,
    sweep: Sweep = Sweep(),
    *,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    retries: int = 2,
) -> list[Result]:
    """Every training of ``sweep`` as one task on ``pool`` (``pool.map``), in grid order.

    The data set is replicated to every worker once and freed at the end (``data``: one made already,
    else :func:`make_data`). Errors of a task (after its retries) are raised here, from its future.
    """
    x, y = data if data is not None else make_data(sweep.rows, sweep.features, sweep.seed)
    grid = sweep.grid()
    inits = [initial_params(x.shape[1], width, sweep.seed + k) for k, (_, width) in enumerate(grid)]
    x_replicas, y_replicas = pool.replicate(x), pool.replicate(y)
    try:
        futures = pool.map(
            make_task(sweep.steps),
            [x_replicas] * len(grid),
            [y_replicas] * len(grid),
            [lr for lr, _ in grid],
            *([init[name] for init in inits] for name in PARAM_NAMES),
            retries=retries,
        )
        outs = [future.result() for future in futures]
    finally:
        x_replicas.free()
        y_replicas.free()
    return [
        Result(
            lr=lr,
            width=width,
            loss=float(out["loss"]),
            accuracy=float(out["accuracy"]),
            params={name: np.asarray(out[name]) for name in PARAM_NAMES},
            where=future.where,
        )
        for (lr, width), out, future in zip(grid, outs, futures, strict=True)
    ]


def run_numpy(sweep: Sweep = Sweep(), *, data: tuple[np.ndarray, np.ndarray] | None = None) -> list[Result]:
    """Every training of ``sweep`` one after another in this process (:func:`train_numpy`), in grid order."""
    x, y = data if data is not None else make_data(sweep.rows, sweep.features, sweep.seed)
    return [
        train_numpy(x, y, lr, initial_params(x.shape[1], width, sweep.seed + k), sweep.steps)
        for k, (lr, width) in enumerate(sweep.grid())
    ]


def check(got: Result, want: Result, *, rtol: float = 1e-3, atol: float = 1e-4) -> list[str]:
    """How ``got`` differs from ``want`` (NumPy's) beyond float32 tolerance; empty when they match."""
    problems = []
    for name, a, b in (("loss", got.loss, want.loss), ("accuracy", got.accuracy, want.accuracy)):
        if not np.isclose(a, b, rtol=rtol, atol=atol):
            problems.append(f"{name} {a:.6g}, NumPy {b:.6g}")
    for name in PARAM_NAMES:
        a, b = np.asarray(got.params[name]), want.params[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name} {a.dtype}{list(a.shape)}, NumPy {b.dtype}{list(b.shape)}")
        elif not np.allclose(a, b, rtol=rtol, atol=atol):
            problems.append(f"{name} differs by up to {float(np.max(np.abs(a - b))):.3g}")
    return problems


def report_checks(results: Sequence[Result], expected: Sequence[Result], file: Any = None) -> int:
    """Print how many results match NumPy's and every mismatch; the number of mismatched results."""
    out = file or sys.stdout
    failed = 0
    for got, want in zip(results, expected, strict=True):
        problems = check(got, want)
        if problems:
            failed += 1
            label = f"lr {got.lr:.4g} width {got.width} on {got.where}"
            print(f"  MISMATCH {label}: " + "; ".join(problems), file=out)
    print(f"{len(results) - failed} of {len(results)} results match NumPy's training", file=out)
    return failed


def print_table(results: Sequence[Result], *, title: str = "sweep", file: Any = None) -> None:
    """The results ranked by final loss (best first), with where each ran, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header in ("rank", "learning rate", "width", "loss", "accuracy", "ran on"):
        table.add_column(header, justify="left" if header == "ran on" else "right")
    ranked = sorted(results, key=lambda r: (np.nan_to_num(r.loss, nan=np.inf), r.lr, r.width))
    for rank, r in enumerate(ranked, 1):
        table.add_row(str(rank), f"{r.lr:.4g}", str(r.width), f"{r.loss:.4f}", f"{r.accuracy:.2%}", r.where)
    Console(file=file or sys.stdout, width=100).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep on a pool (``--coordinator``, ``--token``, ``--ca``, else ``$GPUPOOL_*``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--coordinator", metavar="ADDR", help="HOST:PORT (default $GPUPOOL_COORDINATOR)")
    parser.add_argument("--token", help="a client token (default $GPUPOOL_TOKEN)")
    parser.add_argument("--ca", metavar="PEM", help="the pool CA (default $GPUPOOL_CA)")
    parser.add_argument("--steps", type=int, default=Sweep().steps, help="training steps per task")
    parser.add_argument("--rows", type=int, default=Sweep().rows, help="rows of the synthetic data set")
    parser.add_argument("--quick", action="store_true", help="a small sweep (8 tasks, 512 rows, 20 steps)")
    parser.add_argument("--check", action="store_true", help="compare every result with NumPy's training")
    args = parser.parse_args(argv)
    sweep = Sweep.quick() if args.quick else Sweep(rows=args.rows, steps=args.steps)
    address = args.coordinator or os.environ.get("GPUPOOL_COORDINATOR")
    with gp.connect(address, token=args.token, ca=args.ca) as pool:
        start = time.perf_counter()
        results = run_sweep(pool, sweep)
        seconds = time.perf_counter() - start
    print_table(results, title=f"{len(results)} trainings of {sweep.steps} steps in {seconds:.2f} s")
    if not args.check:
        return 0
    return 1 if report_checks(results, run_numpy(sweep)) else 0


if __name__ == "__main__":
    sys.exit(main())
