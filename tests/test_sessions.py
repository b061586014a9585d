"""Sessions as leases across faults: a coordinator restart, a frozen agent, a lease that runs out."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import gpupool as gp
from gpupool._proto.v1 import coordinator_pb2
from gpupool.local import LocalPool
from gpupool.security.store import StateStore


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def short_pool() -> Iterator[LocalPool]:
    """Two enrolled agents; the coordinator shows an agent offline after 2 s of silence."""
    with LocalPool(
        agents=2,
        port=0,
        backend="numpy",
        memory_limit="128MiB",
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        coordinator_args=["--min-shard-bytes", "0", "--liveness", "2"],
        agent_args=["--heartbeat", "0.3"],
    ) as local:
        yield local


def test_a_client_carries_on_across_a_coordinator_restart(short_pool: LocalPool) -> None:
    host = np.arange(4000, dtype=np.float64).reshape(1000, 4)
    with short_pool.connect() as pool:
        x = pool.asarray(host)
        session = pool.session
        short_pool.restart_coordinator(down_for=0.5)
        # The session lives in the coordinator's store, the capabilities were signed with its kept key,
        # and the agents re-register from their retained statuses: nothing for the user to do.
        np.testing.assert_allclose(float((x * 2).sum()), float((host * 2).sum()))
        y = pool.asarray(host + 1)  # Place needs the restarted coordinator to know the session
        np.testing.assert_array_equal(y.get(), host + 1)
        assert pool.session == session
        jobs = short_pool.coordinator_client().call("ListJobs", coordinator_pb2.ListJobsRequest(all=True))
        assert any(j.job_id == session and j.state == "running" for j in jobs.jobs)


def test_a_frozen_agent_is_not_waited_on_once_the_coordinator_shows_it_offline(short_pool: LocalPool) -> None:
    """Without a copy of the uploaded rows the work cannot move (tests/client/test_recovery.py has the case
    where it does): the call gives up as soon as the agent is shown offline, naming its rows."""
    host = np.arange(8000, dtype=np.float32).reshape(2000, 4)
    victim = short_pool.agents[0]
    with short_pool.connect(keep_uploads="none") as pool:
        x = pool.asarray(host)
        piece = next(s for s in x.shards if s.agent_id == victim.ready["agent_id"])
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(gp.AgentLost) as info:
                float((x + 1).sum())  # the default program deadline is 30 s
            waited = time.monotonic() - started
            print(f"gave up on the frozen agent after {waited:.1f} s")
            assert isinstance(info.value, gp.ShardsLost)
            assert info.value.agent_id == victim.ready["agent_id"]
            assert info.value.rows == (piece.start, piece.stop)
            assert f"rows {piece.start}:{piece.stop}" in str(info.value)
        finally:
            os.kill(victim.pid, signal.SIGCONT)


def test_a_restarted_agent_keeps_its_id_and_needs_no_token(short_pool: LocalPool) -> None:
    first = short_pool.agents[1]
    name, agent_id = str(first.ready["name"]), str(first.ready["agent_id"])
    short_pool.stop_agent(1)
    # The join token made for this start is revoked: the agent must not need it again.
    with StateStore.open(short_pool.credentials.coordinator_dir) as store:  # type: ignore[union-attr]
        join = next(t for t in store.list_tokens() if t.role == "agent" and t.revoked is None)
        store.revoke_token(join.token_id, now=time.time())
    again = short_pool.add_agent(name=name)
    assert again.ready["agent_id"] == agent_id  # no ghost: the same agent, back
    with short_pool.connect() as pool:
        ready = [a for a in pool.agents() if a.state == "ready"]
        live = sorted(str(child.ready["agent_id"]) for child in short_pool.live_agents())
        assert sorted(a.id for a in ready) == live
        assert all(a.enrolled for a in ready)
        x = pool.asarray(np.arange(40.0).reshape(20, 2))
        assert agent_id in {s.agent_id for s in x.shards}
        np.testing.assert_array_equal(x.get(), np.arange(40.0).reshape(20, 2))
