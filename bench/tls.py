"""The tls section: a secure pool against an open one, in the same run, on the same machine.

Two :class:`~gpupool.local.LocalPool`\\ s of two NumPy agents each, both up for the whole section, each with
a session from this process: a secure one (``secure=True``, the default: agents enrolled with the pool CA
serve gRPC over TLS with their own certificate, and every data-plane call carries a signed capability the
agent verifies, cached after the first time) and an open one (``secure=False``: ``--insecure`` agents,
plaintext, no capabilities). The coordinator wants a token in both; it is not on the data path.

Figures, each measured the way its own section measures it:

- upload and download of one float32 array (256 MiB; 16 MiB with ``--quick``) over both agents, with the
  transfer section's contender (:class:`bench.transfer._Gpupool`), bytes checked: the median of twice
  ``ctx.repeats`` timed runs after a warm-up (the figure is the difference between two runs of one system,
  and a single run here varies by 20% or more, far more on a machine shared with other work);
- op latency, p50 and p99 of ``(x + 1).persist()`` on a 1,000-element array, with the overhead section's
  :func:`bench.overhead.time_ops`.

The rounds interleave the two pools, and which goes first alternates, so a spell of load from elsewhere on
the machine lands on both. Each ratio is how many times better the secure pool is than plaintext (below 1:
what TLS and capabilities cost). Targets: transfers at least 0.7x plaintext's GB/s; op p50 at most 1.2x
plaintext's time (a ratio of at least 1/1.2).
"""

from __future__ import annotations

import contextlib
import statistics

import numpy as np

from bench.common import Context, Result, percentile
from bench.overhead import OP_ELEMENTS, WARMUP_OPS, time_ops
from bench.transfer import _gbps, _Gpupool, _sample

__all__ = ["run"]

SECTION = "tls"
PLAINTEXT = "plaintext, --insecure agents"
#: Transfers are timed this many times ``ctx.repeats`` times.
TRANSFER_REPEATS = 2
#: Ops are timed in blocks of this many, alternating between the pools.
OP_BLOCK = 100


def run(ctx: Context) -> list[Result]:
    """Upload, download and op latency through a secure pool and an open one; the ratios."""
    mib = 16 if ctx.quick else 256
    calls = 200 if ctx.quick else 2000
    host = _sample(mib << 20)
    with _Gpupool(host, secure=True) as secure, _Gpupool(host, secure=False) as plain:
        contenders = {"secure": secure, "plain": plain}
        transfers = _time_transfers(contenders, TRANSFER_REPEATS * ctx.repeats)
        ops, shards = _time_ops(contenders, calls)
    note = f"median of {TRANSFER_REPEATS * ctx.repeats} after a warm-up run"
    results = []
    for direction in ("upload", "download"):
        secure_samples = transfers["secure", direction]
        results.append(
            Result(
                SECTION,
                f"{direction} {mib} MiB float32, 2 agents, TLS",
                _gbps(host.nbytes, secure_samples),
                "GB/s",
                baseline_name=PLAINTEXT,
                baseline=_gbps(host.nbytes, transfers["plain", direction]),
                target=0.7,
                note=note,
                samples=[host.nbytes / s / 1e9 for s in secure_samples],
            )
        )
    note = f"{shards} shard(s), {calls} calls"
    results.append(
        Result(
            SECTION,
            "op p50: (x + 1).persist(), TLS + capability",
            statistics.median(ops["secure"]) * 1e3,
            "ms",
            better="lower",
            baseline_name=f"{PLAINTEXT} p50",
            baseline=statistics.median(ops["plain"]) * 1e3,
            target=1 / 1.2,
            note=note,
            samples=[s * 1e3 for s in ops["secure"][:: max(1, calls // 200)]],
        )
    )
    results.append(
        Result(
            SECTION,
            "op p99",
            percentile(ops["secure"], 99) * 1e3,
            "ms",
            better="lower",
            baseline_name=f"{PLAINTEXT} p99",
            baseline=percentile(ops["plain"], 99) * 1e3,
        )
    )
    return results


def _alternating(contenders: dict[str, _Gpupool], round_: int) -> list[tuple[str, _Gpupool]]:
    """The contenders in a round's order: which goes first alternates from round to round."""
    order = list(contenders.items())
    return order if round_ % 2 == 0 else order[::-1]


def _time_transfers(contenders: dict[str, _Gpupool], repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of each timed upload and download, by (contender, direction); round 0 is the warm-up.

    Raises:
        RuntimeError: bytes came back different from the ones sent.
    """
    samples: dict[tuple[str, str], list[float]] = {}
    for round_ in range(repeats + 1):
        for direction in ("upload", "download"):
            for name, contender in _alternating(contenders, round_):
                elapsed = contender.upload() if direction == "upload" else contender.download()
                if round_:
                    samples.setdefault((name, direction), []).append(elapsed)
    for contender in contenders.values():
        contender.check()
    return samples


def _time_ops(contenders: dict[str, _Gpupool], calls: int) -> tuple[dict[str, list[float]], int]:
    """Seconds of each timed op by contender, in blocks that alternate between them; and the shards."""
    ones = np.ones(OP_ELEMENTS, np.float32)
    arrays = {name: contender.pool.asarray(ones) for name, contender in contenders.items()}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    with contextlib.ExitStack() as frees:
        for x in arrays.values():
            frees.callback(x.free)
            time_ops(x, WARMUP_OPS)
        for block in range(max(1, calls // OP_BLOCK)):
            for name, _ in _alternating(contenders, block):
                samples[name] += time_ops(arrays[name], OP_BLOCK)
    return samples, len(arrays["secure"].shards)
