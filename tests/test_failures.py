"""Rigs vanish and brokers restart: the registry follows, through last wills and reconnects."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest

import gpupool as gp
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
