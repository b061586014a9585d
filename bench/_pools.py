"""Pools and clusters the benchmark sections share: a local gpupool, a bare gRPC server, a Dask cluster."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import gpupool as gp
from gpupool._process import Child, spawn
from gpupool.local import LocalPool


@contextlib.contextmanager
def local_gpupool(agents: int = 2, backend: str = "numpy", **kwargs: object) -> Iterator[gp.Pool]:
    """A local pool (its own embedded broker, one BLAS thread per agent on 2 cores) and a session on it."""
    with (
        LocalPool(agents=agents, port=0, backend=backend, stderr=subprocess.DEVNULL, **kwargs) as local,  # type: ignore[arg-type]
        local.connect() as pool,
    ):
        yield pool


@contextlib.contextmanager
def bare_server(kind: str) -> Iterator[Child]:
    """``python -m bench.baselines grpc|tcp`` as a subprocess."""
    child = spawn(f"bare-{kind}", [sys.executable, "-m", "bench.baselines", kind], timeout=30)
    try:
        yield child
    finally:
        child.stop()
