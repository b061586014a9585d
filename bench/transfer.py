"""The transfer section: shard bytes in and out of a pool, against Dask, bare gRPC and raw TCP.

gpupool: ``pool.asarray(host)`` and ``x.get()`` of one float32 array (256 MiB; 16 MiB with ``--quick``),
its rows split over two local NumPy agents (a :class:`~gpupool.local.LocalPool` with its own broker), so
the client streams to both at once: an open pool (``--insecure`` agents, plaintext), a secure one (TLS and
capabilities, as ``gpupool up`` runs), and the open pool again from a session that moves each shard over
:data:`SPLIT` streams (``GPUPOOL_STREAMS``: row ranges, two connections per agent). Dask: ``client.scatter``
of the same two row halves to a LocalCluster of 2 workers x 1 thread (processes), and ``client.gather`` of
them (two arrays; the concatenation a caller wanting one array would add is not timed). Baselines, from
``bench.baselines``: a bare ``grpc.aio`` stream of the same bytes in the same 1 MiB chunks (identity
serializers, no protobuf), its server and its client each a process of their own; and a raw TCP socket,
its server a process, its client this one. The baseline servers get the malloc thresholds gpupool's
agents set for themselves (see :func:`_start_baseline`). Without Dask installed (the ``bench`` extra) its
rows are left out.

Every figure is the median of ``ctx.repeats`` timed runs after one untimed warm-up run: the first touch of
memory the VM has not handed to a process before is many times slower than any later one here (0.5 GB/s
against 11 GB/s for a fresh 256 MiB array), and it would land on whichever run came first. The rounds
interleave the contenders. Every side allocates its destination afresh on every run, as a receiver of a
new array must; gpupool's arrays are freed between runs, and the bytes that come back are checked against
the ones sent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import gpupool as gp
from bench.common import Context, Result
from gpupool._config import Streams
from gpupool._process import Child, spawn
from gpupool.agent._malloc import MMAP_THRESHOLD, TRIM_THRESHOLD
from gpupool.local import LocalPool

__all__ = ["run"]

SECTION = "transfer"
_ROOT = Path(__file__).resolve().parent.parent
#: ``GPUPOOL_STREAMS`` of the split contender: streams per shard, connections per agent.
SPLIT = "4,2"


def run(ctx: Context) -> list[Result]:
    """Upload and download through gpupool, bare gRPC and raw TCP; GB/s and the ratios."""
    mib = 16 if ctx.quick else 256
    host = _sample(mib << 20)
    dask = _Dask.available()
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(_Gpupool(host, secure=False))
        secure = stack.enter_context(_Gpupool(host, secure=True, name="gpupool TLS"))
        split = stack.enter_context(ours.another_session(f"gpupool {SPLIT} streams", SPLIT))
        contenders: list[Any] = [ours, secure, split]
        if dask:
            contenders.append(stack.enter_context(_Dask(host, [p.stop for p in ours.layout][:-1])))
        contenders += [stack.enter_context(_BareGrpc(host)), stack.enter_context(_RawTcp(host))]
        samples: dict[tuple[str, str], list[float]] = {}
        # Rounds interleave the contenders, so a spell of load from elsewhere on the machine lands on all;
        # which goes first alternates.
        for round_ in range(ctx.repeats + 1):
            for direction in ("upload", "download"):
                for contender in contenders if round_ % 2 else contenders[::-1]:
                    elapsed = contender.upload() if direction == "upload" else contender.download()
                    if round_:  # round 0 is the warm-up
                        samples.setdefault((contender.name, direction), []).append(elapsed)
        for checked in (ours, secure, split):
            checked.check()
    note = f"median of {ctx.repeats} after a warm-up run"
    dask_names = {"upload": "Dask scatter", "download": "Dask gather"}
    comparisons = [
        ("gpupool", "bare gRPC", 0.8),
        ("gpupool", "raw TCP", None),
        *([("gpupool", "Dask", 1.0), ("gpupool TLS", "Dask", 1.0)] if dask else []),
        (split.name, "gpupool", None),
    ]
    results = []
    for direction in ("upload", "download"):
        for contender, baseline, target in comparisons:
            tls = ", TLS" if contender == "gpupool TLS" else ""
            streams = f", {SPLIT} streams" if contender == split.name else ""
            results.append(
                Result(
                    SECTION,
                    f"{direction} {mib} MiB float32, 2 agents{tls}{streams}",
                    _gbps(host.nbytes, samples[contender, direction]),
                    "GB/s",
                    baseline_name=dask_names[direction] if baseline == "Dask" else baseline,
                    baseline=_gbps(host.nbytes, samples[baseline, direction]),
                    target=target,
                    note=note,
                    samples=[host.nbytes / s / 1e9 for s in samples[contender, direction]],
                )
            )
    return results


def _sample(nbytes: int) -> np.ndarray:
    """A (rows, 1024) float32 array of ``nbytes``, rising, so bytes out of place show as a difference."""
    return np.arange(nbytes // 4, dtype=np.float32).reshape(-1, 1024)


def _gbps(nbytes: int, samples: list[float]) -> float:
    return nbytes / statistics.median(samples) / 1e9


# -- the contenders: each a context manager with upload() and download(), both returning seconds --------


class _Gpupool:
    """``pool.asarray`` and ``x.get()`` on a LocalPool of two NumPy agents.

    ``secure`` is the LocalPool's: enrolled agents serving TLS and checking capabilities (the default),
    or open ``--insecure`` ones (the tls section compares the two).
    """

    def __init__(
        self,
        host: np.ndarray,
        *,
        secure: bool = True,
        name: str = "gpupool",
        streams: str = "",
        local: LocalPool | None = None,
    ) -> None:
        self.name = name
        self._host = host
        self._secure = secure
        self._streams = streams
        self._local = local
        self._stack = contextlib.ExitStack()
        self._checked_upload = False
        self._last: np.ndarray | None = None

    def __enter__(self) -> _Gpupool:
        with self._stack as stack:
            if self._local is None:
                self._local = stack.enter_context(
                    LocalPool(
                        agents=2, port=0, backend="numpy", stderr=subprocess.DEVNULL, secure=self._secure
                    )
                )
            saved = os.environ.pop(Streams.ENVIRONMENT, None)
            if self._streams:
                os.environ[Streams.ENVIRONMENT] = self._streams  # read once, by the session
            try:
                self._pool = stack.enter_context(self._local.connect())
            finally:
                os.environ.pop(Streams.ENVIRONMENT, None)
                if saved is not None:
                    os.environ[Streams.ENVIRONMENT] = saved
            self._resident = self._pool.asarray(self._host)  # what downloads fetch
            if len(self._resident.shards) != 2:
                raise RuntimeError(f"gpupool: expected 2 shards, got {self._resident.shards}")
            self._stack = stack.pop_all()
        return self

    @property
    def layout(self) -> list[Any]:
        """The resident array's pieces, in row order."""
        return list(self._resident.pieces)

    def another_session(self, name: str, streams: str) -> _Gpupool:
        """A contender on the same pool, from a session of its own with ``GPUPOOL_STREAMS=streams``."""
        return _Gpupool(self._host, secure=self._secure, name=name, streams=streams, local=self._local)

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def pool(self) -> gp.Pool:
        """The session on the pool, for other measures on the same pool."""
        return self._pool

    def upload(self) -> float:
        start = time.perf_counter()
        x = self._pool.asarray(self._host)
        elapsed = time.perf_counter() - start
        if not self._checked_upload:
            if not np.array_equal(x.get(), self._host):
                raise RuntimeError("gpupool: the uploaded bytes came back different")
            self._checked_upload = True
        x.free()
        return elapsed

    def download(self) -> float:
        self._last = None
        start = time.perf_counter()
        self._last = self._resident.get()
        return time.perf_counter() - start

    def check(self) -> None:
        """Raise unless the last download brought back exactly the uploaded bytes."""
        if self._last is None or not np.array_equal(self._last, self._host):
            raise RuntimeError("gpupool: the downloaded bytes differ from the uploaded ones")
        self._last = None


class _Dask:
    """``client.scatter`` and ``client.gather`` of the array's row blocks on a LocalCluster of 2 x 1."""

    name = "Dask"

    def __init__(self, host: np.ndarray, cuts: list[int]) -> None:
        self._parts = np.split(host, cuts)

    @staticmethod
    def available() -> bool:
        """Whether Dask's distributed is installed (the ``bench`` extra)."""
        return importlib.util.find_spec("distributed") is not None

    def __enter__(self) -> _Dask:
        from bench.workloads import _dask_cluster

        self._cluster, self._client = _dask_cluster()
        try:
            self._resident = self._client.scatter(self._parts, hash=False)  # what gathers fetch
            holders = self._client.who_has(self._resident)
            if len({w for workers in holders.values() for w in workers}) != 2:
                raise RuntimeError(f"Dask: expected the blocks on 2 workers, got {holders}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()
        self._cluster.close()

    def upload(self) -> float:
        start = time.perf_counter()
        futures = self._client.scatter(self._parts, hash=False)
        elapsed = time.perf_counter() - start
        self._client.cancel(futures)
        return elapsed

    def download(self) -> float:
        start = time.perf_counter()
        blocks = self._client.gather(self._resident)
        elapsed = time.perf_counter() - start
        if sum(block.nbytes for block in blocks) != sum(part.nbytes for part in self._parts):
            raise RuntimeError("Dask: gathered another size")
        return elapsed


def _baseline_env() -> dict[str, str]:
    """Where ``python -m bench.baselines`` finds the ``bench`` package, from whatever directory."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def _start_baseline(kind: str) -> Child:
    """A baseline server, with the malloc thresholds gpupool's agents set for themselves.

    An agent keeps its ~1 MiB chunk buffers in its heap (:mod:`gpupool.agent._malloc`) instead of faulting
    in fresh pages for every chunk, which costs more than the copies here; the servers it is compared with
    get the same policy, through glibc's tunables. Each client keeps malloc's defaults, as gpupool's does
    (it lives in the user's process), so every baseline process runs as its gpupool counterpart does and the
    ratios measure protocol and code, not the allocator.
    """
    tunables = f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
    env = {**_baseline_env(), "GLIBC_TUNABLES": tunables}
    return spawn(f"bare-{kind}", [sys.executable, "-m", "bench.baselines", kind], timeout=60, env=env)


class _BareGrpc:
    """The bare grpc.aio server of ``bench.baselines`` and its client, each a process of its own."""

    name = "bare gRPC"

    def __init__(self, host: np.ndarray) -> None:
        self._total = host.nbytes

    def __enter__(self) -> _BareGrpc:
        self._server = _start_baseline("grpc")
        try:
            address = f"127.0.0.1:{self._server.ready['port']}"
            self._client = subprocess.Popen(
                [sys.executable, "-m", "bench.baselines", "grpc-client", address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, **_baseline_env()},
                text=True,
            )
            ready = self._reply()
            if ready.get("event") != "ready":
                raise RuntimeError(f"bare gRPC client: {ready}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            assert client.stdin is not None
            assert client.stdout is not None
            client.stdin.close()
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
            client.stdout.close()
        self._server.stop()

    def _reply(self) -> dict[str, object]:
        assert self._client.stdout is not None
        line = self._client.stdout.readline()
        if not line:
            raise RuntimeError(f"bare gRPC client exited with code {self._client.wait(10)}")
        reply: dict[str, object] = json.loads(line)
        return reply

    def _run(self, command: str) -> float:
        assert self._client.stdin is not None
        self._client.stdin.write(f"{command} {self._total}\n")
        self._client.stdin.flush()
        return float(self._reply()["seconds"])  # type: ignore[arg-type]

    def upload(self) -> float:
        return self._run("upload")

    def download(self) -> float:
        return self._run("download")


class _RawTcp:
    """The raw TCP server of ``bench.baselines``, and one connection to it."""

    name = "raw TCP"

    def __init__(self, host: np.ndarray) -> None:
        self._source = host.reshape(-1).view(np.uint8).data
        self._total = len(self._source)

    def __enter__(self) -> _RawTcp:
        self._server = _start_baseline("tcp")
        try:
            self._conn = socket.create_connection(("127.0.0.1", self._server.ready["port"]))
            self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self._server.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._conn.close()
        self._server.stop()

    def upload(self) -> float:
        start = time.perf_counter()
        self._conn.sendall(struct.pack("<Q", self._total))
        self._conn.sendall(self._source)
        counted = struct.unpack("<Q", _read_exact(self._conn, 8))[0]
        elapsed = time.perf_counter() - start
        if counted != self._total:
            raise RuntimeError("raw TCP: the server counted another size")
        return elapsed

    def download(self) -> float:
        start = time.perf_counter()
        self._conn.sendall(b"GET" + struct.pack("<Q", self._total))
        target = np.empty(self._total, np.uint8).data
        got = 0
        while got < self._total:
            n = self._conn.recv_into(target[got:], min(self._total - got, 4 << 20))
            if n == 0:
                raise RuntimeError("raw TCP: short download")
            got += n
        return time.perf_counter() - start


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise RuntimeError("raw TCP: the server closed the connection")
        data += part
    return data
