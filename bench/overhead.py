"""Per-op overhead: a remote elementwise op on a resident 1,000-element array, against a bare grpc.aio
unary round trip; and the rate of pipelined ops (many ops in one round of programs)."""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import numpy as np

import gpupool as gp
from bench._pools import bare_server, local_gpupool
from bench.common import Context, Result, percentile

#: The op measured: ``(x + 1).persist()`` on this many float32 elements, after this many untimed ones.
OP_ELEMENTS = 1000
WARMUP_OPS = 200


def _bare_round_trips(port: int, calls: int) -> list[float]:
    async def go() -> list[float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary("/bench.Bare/Echo")
            payload = b"x" * 256  # about the size of a one-op program
            for _ in range(200):
                await echo(payload)
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                await echo(payload)
                samples.append(time.perf_counter() - start)
            return samples

    return asyncio.run(go())


def time_ops(x: gp.RemoteArray, calls: int) -> list[float]:
    """Seconds of each of ``calls`` ops ``(x + 1).persist()``, one after another: the op latency measured.

    The tls section times its ops with it too; both time them on ``OP_ELEMENTS`` float32 ones, after
    ``WARMUP_OPS`` untimed ops.
    """
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        (x + 1).persist()
        samples.append(time.perf_counter() - start)
    return samples


def run(ctx: Context) -> list[Result]:
    """The section's figures."""
    calls = 200 if ctx.quick else 2000
    with bare_server("grpc") as server:
        bare = _bare_round_trips(int(server.ready["port"]), calls)
    bare_p50, bare_p99 = statistics.median(bare), percentile(bare, 99)
    results: list[Result] = []
    # Open agents (plaintext, no capabilities), like for like with the plaintext bare gRPC baseline; the tls
    # section measures what the default, secure pool costs on top.
    with local_gpupool(secure=False) as pool:
        x = pool.asarray(np.ones(OP_ELEMENTS, np.float32))
        shards = len(x.shards)
        time_ops(x, WARMUP_OPS)
        samples = time_ops(x, calls)
        fetch_samples = []
        for _ in range(calls // 4):
            start = time.perf_counter()
            float((x + 1).sum())
            fetch_samples.append(time.perf_counter() - start)
        pipelined = []
        for _ in range(ctx.repeats):
            start = time.perf_counter()
            gp.persist(*(x + i for i in range(calls)))
            pipelined.append(calls / (time.perf_counter() - start))
    note = f"{shards} shard(s), {calls} calls"
    results.append(
        Result(
            "overhead",
            "op p50: (x + 1).persist()",
            statistics.median(samples) * 1e3,
            "ms",
            better="lower",
            baseline_name="bare grpc.aio unary p50",
            baseline=bare_p50 * 1e3,
            target=1 / 1.5,
            note=note,
            samples=[s * 1e3 for s in samples[:: max(1, calls // 200)]],
        )
    )
    results.append(
        Result(
            "overhead",
            "op p99",
            percentile(samples, 99) * 1e3,
            "ms",
            better="lower",
            baseline_name="bare grpc.aio unary p99",
            baseline=bare_p99 * 1e3,
        )
    )
    results.append(
        Result(
            "overhead",
            "op + fetch p50: float((x + 1).sum())",
            statistics.median(fetch_samples) * 1e3,
            "ms",
            better="lower",
            baseline_name="bare grpc.aio unary p50",
            baseline=bare_p50 * 1e3,
        )
    )
    results.append(
        Result(
            "overhead",
            "pipelined ops: gp.persist(*(x + i ...))",
            statistics.median(pipelined),
            "ops/s",
            better="higher",
            baseline_name="bare unary calls/s, one at a time",
            baseline=1 / bare_p50,
            note=f"{calls} ops per round",
        )
    )
    return results
