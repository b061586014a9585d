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
        # As root, Mosquitto drops to the user mosquitto, who may not write the test's private directory:
        # persistence would fail ("Permission denied") and the restart would bring back nothing.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n{user}"
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

    def stop(self) -> None:
        """SIGTERM: a clean stop, which publishes the last will of every client still connected."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
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


def test_a_broker_stopped_cleanly_sends_every_last_will_yet_live_agents_stay_ready(tmp_path: Path) -> None:
    """A persistent broker stopped with SIGTERM publishes the last will (OFFLINE) of every agent connected
    to it, live ones too. The coordinator asks each agent over gRPC (Health, with TLS: they are enrolled)
    before it believes a will; both answer, so both stay ready, and new arrays are placed on both and
    computed during the outage, which lasts longer than the liveness window (silence does not count while
    the coordinator cannot reach the broker). The broker comes back with the wills retained; the agents
    reconnect and report again, and no agent was ever shown offline."""
    broker = PersistentMosquitto(tmp_path, free_port())
    broker.start()
    log_path = tmp_path / "pool.log"
    try:
        with (
            log_path.open("wb") as log,
            LocalPool(
                agents=2,
                port=0,
                backend="numpy",
                broker_url=broker.url,
                topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
                coordinator_args=["--min-shard-bytes", "0", "--liveness", "2"],
                agent_args=["--heartbeat", "0.5"],
                stderr=log,
            ) as local,
            local.connect() as pool,
        ):

            def lines(*texts: str) -> list[str]:
                text = log_path.read_text(errors="replace")
                return [line for line in text.splitlines() if all(t in line for t in texts)]

            names = {str(child.ready["name"]) for child in local.agents}
            a = np.arange(4000.0).reshape(2000, 2)
            x = pool.asarray(a)
            broker.stop()
            kept = (" coordinator ", "an OFFLINE status came over MQTT", "kept ready")
            wait_until(lambda: len(lines(*kept)) == 2, 15, "both wills received and refuted by a probe")
            print(*lines(*kept), sep="\n")
            assert states(pool) == dict.fromkeys(names, "ready")
            y = pool.asarray(a + 1)  # placement goes on: both agents are still ready
            named = {agent.id: agent.name for agent in pool.agents()}
            assert {named[shard.agent_id] for shard in y.shards} == names
            np.testing.assert_array_equal((x + y).get(), 2 * a + 1)
            time.sleep(2.5)  # longer than the liveness window, with the coordinator cut off from the broker
            assert states(pool) == dict.fromkeys(names, "ready")
            broker.start()
            wait_until(
                lambda: all(r.seconds_since_seen < 1.0 for r in local.list_agents(include_offline=True)),
                20,
                "both agents reporting through the restarted broker",
            )
            time.sleep(2.5)  # a liveness window after the reconnect: nobody went quiet
            assert states(pool) == dict.fromkeys(names, "ready")
            z = pool.asarray(a * 3)
            assert len({s.agent_id for s in z.shards}) == 2
            np.testing.assert_array_equal((x + z).get(), 4 * a)
            assert not lines(" coordinator ", "went offline"), lines(" coordinator ", "went offline")
    finally:
        broker.crash()
