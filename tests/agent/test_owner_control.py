"""The rig's owner takes the GPU back from the rig itself: ``gpupool-agent pause`` / ``resume`` / ``state``
through the agent's control socket (real agent process, real socket, the real command)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from gpupool._proto.v1 import agent_pb2, control_pb2
from gpupool.protocol.topics import Topics

from .agent_helpers import agent_stub, clear_retained, new_prefix, refused, run, start_agent, upload


def owner(command: str, socket_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupool.agent", command, "--control-socket", str(socket_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pause_and_resume_from_the_rig(system_broker_url: str, tmp_path: Path) -> None:
    socket_path = tmp_path / "state" / "control.sock"
    prefix = new_prefix()
    agent = start_agent(system_broker_url, prefix, "--backend", "numpy", "--control-socket", str(socket_path))
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # the owner's alone

        async def state_and_upload() -> tuple[int, str]:
            async with agent_stub(agent.ready["endpoint"]) as stub:
                health = await stub.Health(agent_pb2.HealthRequest(), timeout=10)
                code, kind, _ = await refused(upload(stub, "x", np.ones(4, np.float32)))
                return health.status.state, kind if code != grpc.StatusCode.OK else ""

        done = owner("pause", socket_path)
        assert (done.returncode, done.stdout.strip()) == (0, "draining"), done.stderr
        state, refusal = run(state_and_upload())
        assert state == control_pb2.AGENT_STATE_DRAINING
        assert refusal == "not-accepting"
        done = owner("resume", socket_path)
        assert (done.returncode, done.stdout.strip()) == (0, "ready"), done.stderr
        assert owner("state", socket_path).stdout.strip() == "ready"

        async def uploads() -> None:
            async with agent_stub(agent.ready["endpoint"]) as stub:
                await upload(stub, "y", np.ones(4, np.float32))

        run(uploads())
    finally:
        agent.stop()
        run(clear_retained(system_broker_url, Topics(prefix).status(agent.ready["agent_id"])))
    assert not socket_path.exists()  # removed when the agent stopped


def test_pause_without_a_running_agent_says_so(tmp_path: Path) -> None:
    done = owner("pause", tmp_path / "nobody.sock")
    assert done.returncode == 1
    assert "no agent answers on its control socket" in done.stderr
