"""A real pool for the CLI tests, and a helper that runs ``gpupool`` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from gpupool.local import LocalPool

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def cli_pool(system_broker_url: str) -> Iterator[LocalPool]:
    """Two NumPy agents on the system Mosquitto, with a coordinator on a free port."""
    with LocalPool(
        agents=2,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit="64MiB",
    ) as pool:
        yield pool


def _run_gpupool(
    *args: str, coordinator: str | None = None, token: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gpupool.cli.main"]
    if coordinator is not None:
        argv += ["--coordinator", coordinator]
    env = dict(os.environ)
    env.pop("GPUPOOL_TOKEN", None)
    if token is not None:
        env["GPUPOOL_TOKEN"] = token  # as an operator's shell would have it, not on the command line
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


@pytest.fixture
def run_gpupool() -> RunCli:
    """Runs ``gpupool [--coordinator ADDR] ARGS...`` in a fresh interpreter and returns its output."""
    return _run_gpupool


@pytest.fixture
def gpupool_cli(cli_pool: LocalPool) -> RunCli:
    """Runs ``gpupool ARGS...`` against the module's pool."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _run_gpupool(*args, coordinator=cli_pool.coordinator_address, token=cli_pool.admin_token)

    return run
