"""``gpupool demo``: a pool on this machine, a sharded workload on it, checked against NumPy."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import gpupool as gp
    from gpupool.client.types import AgentInfo
    from gpupool.local import LocalPool

T = TypeVar("T")


def _timed(label: str, timings: list[tuple[str, float, str]], fn: Callable[[], T], note: str = "") -> T:
    start = time.perf_counter()
    result = fn()
    timings.append((label, time.perf_counter() - start, note))
    return result


def _kill_a_holder(local: LocalPool, array: gp.RemoteArray, agents: dict[str, AgentInfo]) -> str:
    """SIGKILL an agent holding one of ``array``'s shards (what a rig's plug being pulled looks like);
    returns what was killed, for the report."""
    ids = [str(child.ready["agent_id"]) for child in local.agents]
    victim = array.shards[0].agent_id
    local.kill_agent(ids.index(victim))
    name = agents[victim].name if victim in agents else victim
    print(f"  SIGKILLed {name} ({victim}), which held rows of x and y\n", flush=True)
    return f"SIGKILL of {name}"


def run(args: argparse.Namespace) -> int:
    """Start a local pool, run the workload, print timings and shard placement; 0 when all checks pass."""
    import gpupool as gp
    from gpupool.local import LocalPool

    rows, cols, out_cols = args.rows, args.cols, 64
    timings: list[tuple[str, float, str]] = []
    print(f"gpupool demo: starting a local pool with {args.agents} agents ...", flush=True)
    started = time.perf_counter()
    log_path = Path(tempfile.gettempdir()) / f"gpupool-demo-{os.getpid()}.log"
    with (
        log_path.open("wb") as log,
        LocalPool(agents=args.agents, port=0, backend=args.backend, stderr=log) as local,
    ):
        security = "enrolled agents, TLS, capabilities" if local.secure else "open agents"
        broker = "Mosquitto, per-agent users" if local.secure_broker else f"{local.broker_kind}, anonymous"
        print(f"  broker       {local.broker_url}  ({broker})")
        print(f"  coordinator  {local.coordinator_address}  (tokens; {security})")
        print(f"  logs         {log_path}")
        print(f"  pool up in {time.perf_counter() - started:.2f} s\n", flush=True)
        rng = np.random.default_rng(7)
        x_host = rng.standard_normal((rows, cols), dtype=np.float32)
        w_host = (rng.standard_normal((cols, out_cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)
        with gp.connect(local.coordinator_address, token=local.client_token) as pool:
            agents = {a.id: a for a in pool.agents()}
            for a in agents.values():
                where = ", ".join(g.model for g in a.gpus) or "host memory"
                print(
                    f"  agent {a.name:<10} {a.id}  {a.backend:<5} {where}  "
                    f"limit {a.memory_limit / 2**30:.1f} GiB  {a.gemm_gflops:,.0f} GFLOP/s  at {a.endpoint}"
                )
            print()
            x = _timed("upload x", timings, lambda: pool.asarray(x_host), f"{x_host.nbytes / 2**20:.0f} MiB")
            # Deferred ops run when a result is needed; persist() runs them now, so the timing is honest.
            y = _timed(
                "(tanh(x @ w) * 2 + 1).persist()", timings, lambda: (np.tanh(x @ w_host) * 2 + 1).persist()
            )
            killed = _kill_a_holder(local, y, agents) if args.kill else ""
            # Reductions are pending until forced: float() and np.asarray() force them inside the timing.
            total = _timed("float(y.sum())", timings, lambda: float(y.sum()))
            col_mean = _timed("np.asarray(y.mean(axis=0))", timings, lambda: np.asarray(y.mean(axis=0)))
            row_max = _timed("y.max(axis=1).persist()", timings, lambda: y.max(axis=1).persist())
            positive = _timed("int((x > 0).sum())", timings, lambda: int((x > 0).sum()))
            y_host = _timed("y.get()", timings, lambda: y.get(), f"{y.nbytes / 2**20:.0f} MiB")
            row_max_host = row_max.get()
            shards = x.shards
            recovery = pool._session.recovery

        expect_y = np.tanh(x_host @ w_host) * 2 + 1
        local_start = time.perf_counter()
        np.tanh(x_host @ w_host) * 2 + 1
        local_seconds = time.perf_counter() - local_start
        checks = {
            "y equals NumPy": np.allclose(y_host, expect_y, rtol=1e-4, atol=1e-4),
            "sum equals NumPy": np.isclose(float(total), float(expect_y.sum(dtype=np.float64)), rtol=1e-4),
            "mean(axis=0) equals NumPy": np.allclose(col_mean, expect_y.mean(axis=0), rtol=1e-4, atol=1e-5),
            "max(axis=1) equals NumPy": np.allclose(row_max_host, expect_y.max(axis=1)),
            "count(x > 0) equals NumPy": int(positive) == int((x_host > 0).sum()),
        }

    print("where each shard ran:")
    for shard in shards:
        agent = agents.get(shard.agent_id)
        print(
            f"  rows {shard.start:>7} to {shard.stop:>7}  ({shard.rows:>6} rows)"
            f"  on {agent.name if agent else '?'} ({shard.agent_id}) worker {shard.worker}"
        )
    if args.kill:
        print(
            f"\nafter the {killed}: the next call found it gone, and {recovery.rebuilt} of its buffers were "
            f"rebuilt elsewhere from lineage ({recovery.recoveries} recovery); the results below are checked "
            "all the same"
        )
    print("\ntimings:")
    for label, seconds, note in timings:
        print(f"  {label:<32} {seconds * 1000:9.1f} ms  {note}")
    print(f"  {'(NumPy here, same y)':<32} {local_seconds * 1000:9.1f} ms")
    print("\nchecks:")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    good = all(checks.values())
    print(f"\ngpupool demo: {'all checks passed' if good else 'SOME CHECKS FAILED'}; the pool has stopped.")
    return 0 if good else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--rows", type=int, default=50_001)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--kill", action="store_true")
    sys.exit(run(parser.parse_args()))
