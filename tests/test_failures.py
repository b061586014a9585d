"""Rigs vanish and brokers restart: the registry follows, through last wills and reconnects."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import gpupool as gp
from gpupool.broker import find_mosquitto, free_port, wait_for_port
from gpupool.local import LocalPool


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def states(pool: gp.Pool) -> dict[str, str]:
    return {a.name: a.state for a in pool.agents(include_offline=True)}


@pytest.mark.parametrize("broker", ["system", "embedded"])
def test_a_killed_agent_is_shown_offline_through_its_last_will(broker: str, system_broker_url: str) -> None:
    url = system_broker_url if broker == "system" else None
    with (
        LocalPool(
            agents=2,
            broker_url=url,
            port=0,
            backend="numpy",
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            coordinator_args=["--min-shard-bytes", "0"],
        ) as local,
        local.connect() as pool,
    ):
        assert set(states(pool).values()) == {"ready"}
        victim = local.agents[0].ready["name"]
        local.kill_agent(0)  # SIGKILL: no clean disconnect, so only the last will can tell
        wait_until(lambda: states(pool).get(victim) == "offline", 10, f"{victim} offline")
        assert [a.name for a in pool.agents()] == [
            local.agents[1].ready["name"]
        ]  # offline ones hidden by default
        x = pool.asarray(np.arange(12.0).reshape(6, 2))  # placement skips the dead agent
        assert {s.agent_id for s in x.shards} == {local.agents[1].ready["agent_id"]}
        np.testing.assert_array_equal((x * 2).get(), np.arange(12.0).reshape(6, 2) * 2)


@pytest.mark.parametrize("broker_kind", ["mosquitto", "amqtt"])
def test_agents_are_back_in_the_registry_after_a_broker_restart(broker_kind: str) -> None:
    has_mosquitto = shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")
    if broker_kind == "mosquitto" and not has_mosquitto:
        pytest.skip("needs mosquitto (scripts/test installs it where it can)")
    with (
        LocalPool(
            agents=2,
            port=0,
            backend="numpy",
            broker_kind=broker_kind,
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            coordinator_args=["--min-shard-bytes", "0"],
        ) as local,
        local.connect() as pool,
    ):
        a = np.arange(40.0).reshape(20, 2)
        x = pool.asarray(a)
        local.restart_broker()  # a non-persistent broker: every retained status is gone with it
        names = {child.ready["name"] for child in local.agents}
        wait_until(
            lambda: {k for k, v in states(pool).items() if v == "ready"} == names,
            30,
            "both agents ready again",
        )
        np.testing.assert_array_equal((x + 1).get(), a + 1)  # the data plane never noticed
        y = pool.asarray(a)
        assert len({s.agent_id for s in y.shards}) == 2


class PersistentMosquitto:
    """A Mosquitto that keeps retained messages across restarts (``persistence true``, saved every second),
    on ``port``; crash() kills it (SIGKILL: no last wills sent), start() loads what it saved."""

    def __init__(self, directory: Path, port: int) -> None:
        program = find_mosquitto()
        if program is None:
            pytest.skip("needs mosquitto (scripts/test installs it where it can)")
        self.program = program
        self.port = port
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {directory}/\nautosave_interval 1\nlog_dest stderr\nlog_type error\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([self.program, "-c", str(self.config)], stdin=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 20)

    def crash(self) -> None:
        if self.process is not None and self.process.poll() is None:
            time.sleep(1.5)  # past an autosave, so the database holds every status retained so far
            self.process.kill()
            self.process.wait(20)


def test_a_broker_outage_spares_the_data_plane_and_its_restart_does_not_revive_a_dead_agent(
    tmp_path: Path,
) -> None:
    """A persistent broker crashes; meanwhile work on the pool carries on (agents and clients talk gRPC),
    and one agent is SIGKILLed. The broker comes back with every retained status, the dead agent's READY
    among them (its last will never fired: the broker was down): the coordinator shows it offline within
    its liveness window, and new arrays go to the live agent only."""
    broker = PersistentMosquitto(tmp_path, free_port())
    broker.start()
    try:
        with (
            LocalPool(
                agents=2,
                port=0,
                backend="numpy",
                broker_url=broker.url,
                topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
                coordinator_args=["--min-shard-bytes", "0", "--liveness", "3"],
            ) as local,
            local.connect() as pool,
        ):
            a = np.arange(4000.0).reshape(2000, 2)
            x = pool.asarray(a)
            broker.crash()
            # The data plane does not need the broker: ops, new arrays and reads go on.
            np.testing.assert_array_equal((x * 2 + 1).get(), a * 2 + 1)
            z = pool.asarray(a[:10])
            np.testing.assert_array_equal(z.get(), a[:10])
            dead = local.agents[1].ready["name"]
            live = local.agents[0].ready["name"]
            local.kill_agent(1)
            broker.start()
            wait_until(lambda: states(pool).get(dead) == "offline", 30, f"{dead} shown offline")
            wait_until(lambda: states(pool).get(live) == "ready", 30, f"{live} ready again")
            # Shown offline by the coordinator, not by a last will: the broker replayed its READY status.
            notes = {agent.name: agent.note for agent in pool.agents(include_offline=True)}
            assert notes[dead].startswith("coordinator: "), notes  # its silence, not its will
            y = pool.asarray(a)
            names = {agent.id: agent.name for agent in pool.agents(include_offline=True)}
            assert {names[shard.agent_id] for shard in y.shards} == {live}
            np.testing.assert_array_equal((y + 1).get(), a + 1)
    finally:
        broker.crash()
