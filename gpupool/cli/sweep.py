"""``gpupool demo --sweep``: a pool on this machine, the sweep of ``examples/sweep.py`` on it, every training
checked against the same training in NumPy."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import gpupool
from gpupool.local import LocalPool

EXAMPLE = Path(gpupool.__file__).resolve().parent.parent / "examples" / "sweep.py"


def load_example(path: Path = EXAMPLE) -> ModuleType:
    """``examples/sweep.py`` as a module (it ships with the source tree, not inside the package).

    Raises:
        FileNotFoundError: gpupool is installed without its source tree; the caller says so.
    """
    name = "gpupool_examples_sweep"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run(args: argparse.Namespace) -> int:
    """Start a local pool, run the sweep, print the ranked table and the checks; 0 when all match NumPy."""
    try:
        example = load_example()
    except FileNotFoundError as exc:
        print(f"gpupool demo --sweep: needs the source tree's examples/sweep.py, not found at {exc}")
        return 2
    sweep = example.Sweep.quick() if args.quick else example.Sweep()
    tasks = len(sweep.grid())
    print(f"gpupool demo --sweep: starting a local pool with {args.agents} agents ...", flush=True)
    started = time.perf_counter()
    log_path = Path(tempfile.gettempdir()) / f"gpupool-demo-{os.getpid()}.log"
    with (
        log_path.open("wb") as log,
        LocalPool(agents=args.agents, port=0, backend=args.backend, stderr=log) as local,
    ):
        print(f"  coordinator  {local.coordinator_address}   logs {log_path}")
        print(f"  pool up in {time.perf_counter() - started:.2f} s\n", flush=True)
        data = example.make_data(sweep.rows, sweep.features, sweep.seed)
        print(
            f"training {tasks} MLPs ({len(sweep.learning_rates)} learning rates x widths "
            f"{', '.join(map(str, sweep.widths))}; {sweep.steps} full-batch steps each on "
            f"{sweep.rows} x {sweep.features} float32), one task per worker at a time ...",
            flush=True,
        )
        with local.connect() as pool:
            start = time.perf_counter()
            results = example.run_sweep(pool, sweep, data=data)
            pool_seconds = time.perf_counter() - start
    print()
    example.print_table(results, title=f"{tasks} trainings on the pool in {pool_seconds:.2f} s")
    start = time.perf_counter()
    expected = example.run_numpy(sweep, data=data)
    numpy_seconds = time.perf_counter() - start
    print(f"\nthe same {tasks} trainings one after another in NumPy here: {numpy_seconds:.2f} s")
    failed: int = example.report_checks(results, expected)
    verdict = "all results match NumPy's" if not failed else f"{failed} RESULTS DIFFER FROM NUMPY'S"
    print(f"\ngpupool demo --sweep: {verdict}; the pool has stopped.")
    return 1 if failed else 0
