"""The rig's owner takes the GPU back from the rig itself: ``gpupool-agent pause`` / ``resume`` / ``state``
through the agent's control socket (real agent process, real socket, the real command)."""

from __future__ import annotations

import asyncio
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


def test_a_pause_schedule_pauses_the_agent_within_its_window(system_broker_url: str, tmp_path: Path) -> None:
    prefix = new_prefix()
    agent = start_agent(
        system_broker_url, prefix, "--backend", "numpy", "--pause-schedule", "daily 00:00-24:00"
    )
    try:

        async def state() -> int:
            async with agent_stub(agent.ready["endpoint"]) as stub:
                for _ in range(100):
                    health = await stub.Health(agent_pb2.HealthRequest(), timeout=10)
                    if health.status.state == control_pb2.AGENT_STATE_DRAINING:
                        break
                    await asyncio.sleep(0.05)
                return health.status.state

        assert run(state()) == control_pb2.AGENT_STATE_DRAINING  # the whole day is a window: paused at start
    finally:
        agent.stop()
        run(clear_retained(system_broker_url, Topics(prefix).status(agent.ready["agent_id"])))


def test_a_pause_schedule_that_does_not_read_stops_the_agent_at_once() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpupool.agent",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--insecure",
            "--pause-schedule",
            "Mon-Fri 8-18",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "a pause window reads [DAYS] HH:MM-HH:MM" in done.stderr
