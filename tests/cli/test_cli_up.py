"""``gpupool up`` as a user runs it: a pool in the foreground, stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from gpupool.cli.up import READY_LINE

RunCli = Callable[..., subprocess.CompletedProcess[str]]


def read_until_ready(process: subprocess.Popen[bytes], timeout: float) -> str:
    """``gpupool up``'s stdout up to and including its ready line."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while READY_LINE.encode() not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or process.poll() is not None:
                raise AssertionError(
                    f"gpupool up was not ready (exit {process.poll()}); it printed:\n{seen.decode()}"
                )
            if selector.select(min(left, 0.5)):
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"gpupool up closed its stdout; it printed:\n{seen.decode()}")
                seen += chunk
    return seen.decode()


@pytest.fixture
def up_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``gpupool up --agents 2 --port 0``, embedded broker; killed with its children if a test fails."""
    log = (tmp_path / "up.stderr").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpupool.cli.main",
            "up",
            "--agents",
            "2",
            "--port",
            "0",
            "--backend",
            "numpy",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()
        log.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_a_pool_until_interrupted(
    up_process: subprocess.Popen[bytes], stop_signal: signal.Signals, run_gpupool: RunCli, tmp_path: Path
) -> None:
    banner = read_until_ready(up_process, timeout=60)
    match = re.search(r"coordinator\s+(127\.0\.0\.1:\d+)", banner)
    assert match, banner
    address = match[1]
    assert re.search(r"broker\s+mqtt://127\.0\.0\.1:\d+\s+\((mosquitto|amqtt), embedded\)", banner), banner
    # The credentials: printed as an export line, and written to client.env and admin.env (mode 0600).
    state = tmp_path / "state"
    exported = re.search(rf"export GPUPOOL_COORDINATOR={re.escape(address)} GPUPOOL_TOKEN=(gpt_\S+)", banner)
    assert exported, banner
    env_files = {name: (state / name).read_text() for name in ("client.env", "admin.env")}
    assert f"export GPUPOOL_TOKEN={exported[1]}\n" in env_files["client.env"]
    admin = re.search(r"GPUPOOL_TOKEN=(\S+)", env_files["admin.env"])
    assert admin
    assert admin[1] != exported[1]
    for name in ("client.env", "admin.env"):
        assert (state / name).stat().st_mode & 0o777 == 0o600
    assert "agents enrolled with the pool CA" in banner

    refused = run_gpupool("agents", coordinator=address)  # no token: refused, with what to do
    assert refused.returncode == 1
    assert "GPUPOOL_TOKEN" in refused.stderr
    assert "client.env" in refused.stderr
    listed = run_gpupool("agents", "--json", coordinator=address, token=exported[1])
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert sorted(r["status"]["name"] for r in records) == ["agent-0", "agent-1"]
    assert {r["status"]["state"] for r in records} == {"AGENT_STATE_READY"}
    for record in records:
        assert record["status"]["agentId"] in banner
        assert record["status"]["endpoint"] in banner

    # A client token cannot steer the pool; the admin token can.
    cordon = run_gpupool("cordon", "agent-0", coordinator=address, token=exported[1])
    assert cordon.returncode == 1
    assert "needs a token of role admin" in cordon.stderr
    cordon = run_gpupool("cordon", "agent-0", coordinator=address, token=admin[1])
    assert cordon.returncode == 0, cordon.stderr

    children = psutil.Process(up_process.pid).children(recursive=True)
    assert len(children) >= 4  # broker, coordinator, two agents
    up_process.send_signal(stop_signal)
    assert up_process.wait(60) == 0
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"


def test_up_refuses_a_bad_broker_url(run_gpupool: RunCli) -> None:
    result = run_gpupool("up", "--broker", "http://example.org")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "scheme must be mqtt" in result.stderr
