"""The operator commands as a user runs them: ``gpupool`` in a subprocess against a real pool."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from gpupool._proto.v1 import control_pb2, coordinator_pb2
from gpupool.cli.admin import PoolSummary, agents_table
from gpupool.local import LocalPool

RunCli = Callable[..., subprocess.CompletedProcess[str]]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def states(gpupool_cli: RunCli) -> dict[str, str]:
    records = json.loads(ok(gpupool_cli("agents", "--json", "--all")))
    return {r["status"]["name"]: r["status"]["state"] for r in records}


def test_agents_prints_a_table_of_the_ready_agents(gpupool_cli: RunCli, cli_pool: LocalPool) -> None:
    lines = ok(gpupool_cli("agents")).splitlines()
    assert lines[0].split() == [
        "NAME",
        "ID",
        "STATE",
        "BACKEND",
        "WORKERS",
        "MEMORY",
        "GFLOP/S",
        "NET",
        "TRUST",
        "ENDPOINT",
        "OPTIONS",
        "LAST",
        "SEEN",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"agent-0", "agent-1"}
    for agent in cli_pool.agents:
        row = rows[agent.ready["name"]]
        assert agent.ready["agent_id"] in row
        assert agent.ready["endpoint"] in row
        assert " ready " in row
        assert " numpy " in row
        assert "64 MiB" in row  # the memory limit
        assert " bulk:" in row  # its bulk byte path's port
        assert "python" not in row  # not started with --allow-python
        speed = re.search(r"/ 64 MiB\s+([\d,]+)\s", row)  # after the memory: the measured GFLOP/s
        assert speed is not None, row
        assert float(speed.group(1).replace(",", "")) > 0, row


def test_agents_shows_trust_quarantine_and_observed_network_throughput() -> None:
    def record(agent_id: str, name: str) -> coordinator_pb2.AgentRecord:
        return coordinator_pb2.AgentRecord(
            status=control_pb2.AgentStatus(
                agent_id=agent_id, name=name, state=control_pb2.AGENT_STATE_READY, endpoint="10.0.0.1:1"
            ),
            seconds_since_seen=1.0,
        )

    good, bad, new = record("a1", "rig-good"), record("b2", "rig-bad"), record("c3", "rig-new")
    good.trust.CopyFrom(coordinator_pb2.AgentTrust(checks=8, mismatches=0, score=0.9))
    good.network_bytes_per_second = 112.4e6
    bad.trust.CopyFrom(
        coordinator_pb2.AgentTrust(
            checks=3, mismatches=2, score=0.4, quarantined=True, reason="2 of 3 verified results disagreed"
        )
    )
    bad.network_bytes_per_second = 2.5e6
    lines = agents_table([good, bad, new]).splitlines()
    header = lines[0]
    net, trust = header.index("NET"), header.index("TRUST")
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows["rig-good"][net:trust].strip() == "112 MB/s"
    assert rows["rig-good"][trust:].startswith("0.90 (8/8 ok)")
    assert " ready " in rows["rig-good"]
    assert rows["rig-bad"][net:trust].strip() == "2.5 MB/s"
    assert rows["rig-bad"][trust:].startswith("0.40 (1/3 ok)")
    assert " quarantined " in rows["rig-bad"]
    assert rows["rig-new"][net:].split()[:2] == ["-", "-"]  # nothing observed, never checked
    assert lines[4:] == [
        "rig-bad (b2) is quarantined: 2 of 3 verified results disagreed; `gpupool uncordon b2` takes it back"
    ]
    # gpupool status counts it apart from the ready ones.
    summary = PoolSummary.of("127.0.0.1:1", [good, bad, new], [])
    assert summary.agents == {"ready": 2, "cordoned": 0, "draining": 0, "quarantined": 1, "offline": 0}
    assert PoolSummary.of("127.0.0.1:1", [good], []).agents == {
        "ready": 1,
        "cordoned": 0,
        "draining": 0,
        "offline": 0,
    }


def test_agents_json_is_the_records_as_protobuf_json(gpupool_cli: RunCli, cli_pool: LocalPool) -> None:
    records = json.loads(ok(gpupool_cli("agents", "--json")))
    assert isinstance(records, list)
    by_id = {r["status"]["agentId"]: r for r in records}
    assert set(by_id) == {a.ready["agent_id"] for a in cli_pool.agents}
    for agent in cli_pool.agents:
        status = by_id[agent.ready["agent_id"]]["status"]
        assert status["state"] == "AGENT_STATE_READY"
        assert status["name"] == agent.ready["name"]
        assert status["endpoint"] == agent.ready["endpoint"]
        assert status["backend"] == "numpy"


@pytest.fixture
def restore_ready(gpupool_cli: RunCli) -> Iterator[None]:
    """Leave every agent READY for the next test, whatever this one did."""
    yield
    for name in ("agent-0", "agent-1"):
        gpupool_cli("uncordon", name)


@pytest.mark.usefixtures("restore_ready")
def test_cordon_and_uncordon_by_name(gpupool_cli: RunCli) -> None:
    out = ok(gpupool_cli("cordon", "agent-0", "--reason", "maintenance"))
    assert "agent-0" in out
    assert "cordoned" in out
    assert states(gpupool_cli) == {"agent-0": "AGENT_STATE_CORDONED", "agent-1": "AGENT_STATE_READY"}
    assert " cordoned " in next(line for line in ok(gpupool_cli("agents")).splitlines() if "agent-0" in line)

    out = ok(gpupool_cli("uncordon", "agent-0"))
    assert "agent-0" in out
    assert "ready" in out
    assert states(gpupool_cli) == {"agent-0": "AGENT_STATE_READY", "agent-1": "AGENT_STATE_READY"}


@pytest.mark.usefixtures("restore_ready")
def test_drain_by_id(gpupool_cli: RunCli, cli_pool: LocalPool) -> None:
    agent_id = cli_pool.agents[1].ready["agent_id"]
    out = ok(gpupool_cli("drain", agent_id))
    assert agent_id in out
    assert "draining" in out
    assert states(gpupool_cli)["agent-1"] == "AGENT_STATE_DRAINING"
    summary = ok(gpupool_cli("status"))
    assert "1 ready, 0 cordoned, 1 draining, 0 offline" in summary


def test_status_summarises_the_pool(gpupool_cli: RunCli, cli_pool: LocalPool) -> None:
    out = ok(gpupool_cli("status"))
    assert f"coordinator  {cli_pool.coordinator_address}" in out
    assert "2 ready, 0 cordoned, 0 draining, 0 offline" in out
    assert "2 (2 numpy)" in out
    assert "of 128 MiB" in out
    summary = json.loads(ok(gpupool_cli("status", "--json")))
    assert summary["agents"] == {"ready": 2, "cordoned": 0, "draining": 0, "offline": 0}
    assert summary["memory_limit"] == 128 << 20


def test_jobs_lists_client_sessions(gpupool_cli: RunCli, cli_pool: LocalPool) -> None:
    with cli_pool.connect(client="tester@cli-test") as pool:
        session = pool.session
        rows = [line for line in ok(gpupool_cli("jobs")).splitlines() if session in line]
        assert len(rows) == 1
        assert "tester@cli-test" in rows[0]
        assert "running" in rows[0]
        jobs = json.loads(ok(gpupool_cli("jobs", "--json")))
        assert any(j["jobId"] == session and j["client"] == "tester@cli-test" for j in jobs)
    row = next(line for line in ok(gpupool_cli("jobs")).splitlines() if session in line)
    assert "ended" in row
    assert "disconnected" in row


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpupool: ")
    for word in words:
        assert word in lines[0]


def test_an_unknown_agent_is_a_clear_error(gpupool_cli: RunCli) -> None:
    assert_one_line_error(gpupool_cli("cordon", "no-such-agent"), "no-such-agent")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("command", [["agents"], ["status"], ["jobs"], ["drain", "agent-0"]])
def test_an_unreachable_coordinator_is_one_clear_line(command: list[str], run_gpupool: RunCli) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = run_gpupool(*command, coordinator=address)
    assert_one_line_error(result, f"cannot reach the coordinator at {address}", "gpupool up")
    assert result.stdout == ""


def test_the_coordinator_address_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, run_gpupool: RunCli
) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("GPUPOOL_COORDINATOR", address)
    assert_one_line_error(run_gpupool("agents"), address)


def test_version_and_help(run_gpupool: RunCli) -> None:
    assert ok(run_gpupool("--version")).startswith("gpupool ")
    usage = ok(run_gpupool("--help"))
    for command in ("up", "demo", "status", "agents", "drain", "cordon", "uncordon", "jobs", "coordinator"):
        assert command in usage
    no_command = run_gpupool()
    assert no_command.returncode == 2
    assert "usage: gpupool" in no_command.stderr


def test_coordinator_forwards_its_arguments(run_gpupool: RunCli) -> None:
    out = ok(run_gpupool("coordinator", "--help"))
    assert "--broker" in out
    assert "--listen" in out
