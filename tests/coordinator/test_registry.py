"""The registry as pure state: statuses and telemetry in, events and free memory out."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._errors import PlacementError
from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import AgentStatus, AgentTelemetry, Worker, WorkerTelemetry
from gpupool.coordinator.registry import (
    AgentForgotten,
    AgentRegistered,
    AgentRestarted,
    AgentStateChanged,
    AgentWentOffline,
    Registry,
    state_name,
)
from gpupool.placement import RowShard, WorkerCapacity

READY = control_pb2.AGENT_STATE_READY
CORDONED = control_pb2.AGENT_STATE_CORDONED
DRAINING = control_pb2.AGENT_STATE_DRAINING
OFFLINE = control_pb2.AGENT_STATE_OFFLINE


def stamp(seconds: float) -> Timestamp:
    result = Timestamp()
    result.FromNanoseconds(int(seconds * 1e9))
    return result


def status(
    agent_id: str = "a1b2c3",
    *,
    name: str = "rig",
    state: int = READY,
    used: tuple[int, ...] = (0,),
    limit: int = 1000,
    updated: float = 100.0,
    started: float = 50.0,
) -> AgentStatus:
    return AgentStatus(
        agent_id=agent_id,
        name=name,
        endpoint=f"10.0.0.1:{5000 + len(agent_id)}",
        state=state,  # type: ignore[arg-type]
        workers=[Worker(index=i, memory_limit=limit, memory_used=u) for i, u in enumerate(used)],
        updated=stamp(updated),
        started=stamp(started),
    )


def telemetry(
    agent_id: str = "a1b2c3", *, used: tuple[int, ...] = (0,), limit: int = 1000, time: float
) -> AgentTelemetry:
    return AgentTelemetry(
        agent_id=agent_id,
        time=stamp(time),
        workers=[WorkerTelemetry(index=i, memory_limit=limit, memory_used=u) for i, u in enumerate(used)],
    )


def free(registry: Registry) -> dict[tuple[str, int], int]:
    return {(w.agent_id, w.worker): w.free_bytes for w in registry.ready_workers()}


def test_first_status_registers_the_agent_and_its_workers():
    registry = Registry()
    assert registry.apply_status(status(used=(100, 300)), now=1.0) == [
        AgentRegistered("a1b2c3", "rig", READY)
    ]
    assert free(registry) == {("a1b2c3", 0): 900, ("a1b2c3", 1): 700}
    assert registry.ready_workers() == [
        WorkerCapacity("a1b2c3", "10.0.0.1:5006", 0, 900),
        WorkerCapacity("a1b2c3", "10.0.0.1:5006", 1, 700),
    ]
    entry = registry.get("a1b2c3")
    assert entry is not None
    assert (entry.name, entry.state, entry.last_seen) == ("rig", READY, 1.0)


def test_the_same_status_again_changes_nothing():
    registry = Registry()
    registry.apply_status(status(), now=1.0)
    assert registry.apply_status(status(), now=2.0) == []
    assert registry.get("a1b2c3").last_seen == 2.0  # type: ignore[union-attr]


def test_state_changes_are_events_and_offline_is_its_own():
    registry = Registry()
    registry.apply_status(status(), now=1.0)
    assert registry.apply_status(status(state=CORDONED), now=2.0) == [
        AgentStateChanged("a1b2c3", "rig", READY, CORDONED)
    ]
    assert registry.apply_status(status(state=OFFLINE, updated=1.0), now=3.0) == [
        AgentWentOffline("a1b2c3", "rig", CORDONED)
    ]
    assert registry.apply_status(status(state=READY), now=4.0) == [
        AgentStateChanged("a1b2c3", "rig", OFFLINE, READY)
    ]


def test_only_ready_agents_offer_workers():
    registry = Registry()
    registry.apply_status(status("r"), now=0)
    registry.apply_status(status("c", state=CORDONED), now=0)
    registry.apply_status(status("d", state=DRAINING), now=0)
    registry.apply_status(status("o", state=OFFLINE), now=0)
    assert [w.agent_id for w in registry.ready_workers()] == ["r"]
    assert registry.ready_workers(exclude=["r"]) == []
    assert registry.count_by_state() == {"ready": 1, "cordoned": 1, "draining": 1, "offline": 1}


def test_placed_bytes_count_until_the_next_report():
    registry = Registry()
    registry.apply_status(status(used=(100, 0)), now=0)
    registry.reserve([RowShard("a1b2c3", "", 0, 0, 10), RowShard("a1b2c3", "", 1, 10, 15)], row_bytes=20)
    assert free(registry) == {("a1b2c3", 0): 700, ("a1b2c3", 1): 900}
    # Telemetry reports what the agent holds now: the placed bytes are in it, so they count once.
    registry.apply_telemetry(telemetry(used=(300, 100), time=101.0), now=1)
    assert free(registry) == {("a1b2c3", 0): 700, ("a1b2c3", 1): 900}
    registry.apply_telemetry(telemetry(used=(0, 0), time=102.0), now=2)
    assert free(registry) == {("a1b2c3", 0): 1000, ("a1b2c3", 1): 1000}


def test_an_older_report_does_not_override_a_newer_one():
    registry = Registry()
    registry.apply_status(status(used=(100,), updated=100.0), now=0)
    registry.apply_telemetry(telemetry(used=(600,), time=110.0), now=1)
    # The retained status comes again after a reconnect: its memory figures are older than the telemetry.
    registry.apply_status(status(used=(100,), updated=100.0), now=2)
    assert free(registry) == {("a1b2c3", 0): 400}
    registry.apply_status(status(used=(200,), updated=120.0), now=3)
    assert free(registry) == {("a1b2c3", 0): 800}


def test_telemetry_keeps_the_latest_and_is_dropped_for_unknown_agents():
    registry = Registry()
    assert registry.apply_telemetry(telemetry("nobody", time=1.0), now=0) == []
    assert registry.get("nobody") is None
    registry.apply_status(status(), now=0)
    registry.apply_telemetry(telemetry(used=(5,), time=101.0), now=7)
    entry = registry.get("a1b2c3")
    assert entry is not None
    assert entry.telemetry is not None
    assert entry.telemetry.workers[0].memory_used == 5
    assert entry.last_seen == 7


def test_a_new_start_time_means_a_restart_that_resets_memory():
    registry = Registry()
    registry.apply_status(status(updated=100.0), now=0)
    registry.reserve([RowShard("a1b2c3", "", 0, 0, 5)], row_bytes=100)
    registry.apply_telemetry(telemetry(used=(500,), time=200.0), now=1)
    events = registry.apply_status(status(used=(0,), started=300.0, updated=150.0), now=2)
    assert events == [AgentRestarted("a1b2c3", "rig")]
    assert free(registry) == {("a1b2c3", 0): 1000}
    assert registry.get("a1b2c3").telemetry is None  # type: ignore[union-attr]


def test_workers_follow_the_latest_status():
    registry = Registry()
    registry.apply_status(status(used=(0, 0, 0)), now=0)
    registry.apply_status(status(used=(0,), updated=101.0), now=1)
    assert list(free(registry)) == [("a1b2c3", 0)]


def test_an_agent_without_an_endpoint_gets_no_placements():
    registry = Registry()
    registry.apply_status(
        AgentStatus(agent_id="x", state=READY, workers=[Worker(index=0, memory_limit=10)]), now=0
    )
    assert registry.ready_workers() == []


def test_forget_drops_the_agent():
    registry = Registry()
    registry.apply_status(status(), now=0)
    assert registry.forget("a1b2c3") == [AgentForgotten("a1b2c3")]
    assert registry.forget("a1b2c3") == []
    assert len(registry) == 0


def test_resolve_by_id_prefix_or_name():
    registry = Registry()
    registry.apply_status(status("abc111", name="alpha"), now=0)
    registry.apply_status(status("abc222", name="beta"), now=0)
    registry.apply_status(status("def333", name="abc"), now=0)
    assert registry.resolve("abc111").agent_id == "abc111"
    assert registry.resolve("abc2").agent_id == "abc222"
    assert registry.resolve("beta").agent_id == "abc222"
    assert registry.resolve("abc").agent_id == "def333"  # a unique name wins over an ambiguous prefix
    with pytest.raises(
        PlacementError, match=r"ambiguous: 2 agents match by id prefix: abc111 \(alpha\), abc222"
    ):
        registry.resolve("ab")
    with pytest.raises(PlacementError, match="no agent 'zzz'"):
        registry.resolve("zzz")
    with pytest.raises(PlacementError, match="no agent named"):
        registry.resolve("")


def test_resolve_refuses_a_name_two_agents_share():
    registry = Registry()
    registry.apply_status(status("a1", name="twin"), now=0)
    registry.apply_status(status("b2", name="twin"), now=0)
    with pytest.raises(PlacementError, match="ambiguous: 2 agents match by name"):
        registry.resolve("twin")


def test_agents_are_listed_by_name():
    registry = Registry()
    registry.apply_status(status("1", name="zulu"), now=0)
    registry.apply_status(status("2", name="alpha"), now=0)
    assert [a.name for a in registry.agents()] == ["alpha", "zulu"]


def test_state_names():
    assert [state_name(s) for s in (READY, CORDONED, DRAINING, OFFLINE, 0, 99)] == [
        "ready",
        "cordoned",
        "draining",
        "offline",
        "unspecified",
        "state-99",
    ]


def test_agents_not_heard_from_since_a_time_are_marked_offline():
    registry = Registry()
    registry.apply_status(status("old", name="old"), now=1.0)
    registry.apply_status(status("new", name="new"), now=1.0)
    registry.apply_status(status("gone", name="gone", state=OFFLINE), now=1.0)
    registry.apply_telemetry(telemetry("new", time=200.0), now=5.0)
    assert registry.expire_unseen(3.0, note="silent") == [AgentWentOffline("old", "old", READY)]
    entry = registry.get("old")
    assert entry is not None
    assert (entry.state, entry.status.note) == (OFFLINE, "silent")
    assert registry.get("new").state == READY  # type: ignore[union-attr]
    assert registry.apply_status(status("old", name="old"), now=6.0) == [
        AgentStateChanged("old", "old", OFFLINE, READY)
    ]


def test_ready_workers_are_laid_out_by_agent_id_and_follow_every_change():
    registry = Registry()
    for agent in ("c", "a", "b"):
        registry.apply_status(status(agent, used=(0, 100)), now=0)
    assert [(w.agent_id, w.worker) for w in registry.ready_workers()] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)
    ]  # fmt: skip
    registry.apply_status(status("b", state=CORDONED, used=(0, 100)), now=1)
    assert [w.agent_id for w in registry.ready_workers()] == ["a", "a", "c", "c"]
    registry.apply_status(status("c", used=(0,), updated=101.0), now=2)  # one worker fewer
    assert [(w.agent_id, w.worker) for w in registry.ready_workers()] == [("a", 0), ("a", 1), ("c", 0)]
    registry.forget("a")
    registry.apply_status(status("d", used=(50,)), now=3)
    assert registry.ready_workers(exclude=["c"]) == [WorkerCapacity("d", "10.0.0.1:5001", 0, 950)]
    registry.apply_telemetry(telemetry("d", used=(300,), time=200.0), now=4)  # free memory is live
    assert free(registry) == {("c", 0): 1000, ("d", 0): 700}
    assert registry.expire_unseen(3.5, note="silent") == [
        AgentWentOffline("c", "rig", READY),
        AgentWentOffline("b", "rig", CORDONED),
    ]
    assert [w.agent_id for w in registry.ready_workers()] == ["d"]


def test_a_split_of_the_ready_workers_is_reserved_on_them():
    registry = Registry()
    registry.apply_status(status("a", used=(0, 0)), now=0)
    registry.apply_status(status("b", used=(500,)), now=0)
    ready = registry.ready()
    assert (ready.agent_ids, ready.workers, ready.free) == (("a", "a", "b"), (0, 1, 0), [1000, 1000, 500])
    registry.reserve_split(ready, [(0, 0, 3), (2, 3, 4)], row_bytes=100)
    assert free(registry) == {("a", 0): 700, ("a", 1): 1000, ("b", 0): 400}


def test_the_listing_follows_names_and_arrivals():
    registry = Registry()
    registry.apply_status(status("1", name="mike"), now=0)
    registry.apply_status(status("2", name="alpha"), now=0)
    assert [a.agent_id for a in registry.agents()] == ["2", "1"]
    registry.apply_status(status("1", name="able"), now=1)
    registry.apply_status(status("3", name="zulu"), now=1)
    assert [a.agent_id for a in registry.agents()] == ["1", "2", "3"]
    registry.forget("2")
    assert [a.agent_id for a in registry.agents()] == ["1", "3"]


# -- measured speed and temperature -----------------------------------------------------------------------


def test_ready_workers_carry_their_measured_speed() -> None:
    registry = Registry()
    fast = status("fast01")
    fast.workers[0].gemm_f32_gflops = 400.0
    slow = status("slow0001")
    slow.workers[0].gemm_f32_gflops = 100.0
    registry.apply_status(fast, now=1.0)
    registry.apply_status(slow, now=1.0)
    ready = registry.ready()
    assert dict(zip(ready.agent_ids, ready.speed, strict=True)) == {"fast01": 400.0, "slow0001": 100.0}


def test_float16_arrays_are_sized_by_the_float16_figures_where_every_worker_has_one() -> None:
    registry = Registry()
    tensor = status("tensor01")  # a card whose float16 is 4x its float32 (tensor cores)
    tensor.workers[0].gemm_f32_gflops = 100.0
    tensor.workers[0].gemm_f16_gflops = 400.0
    plain = status("plain001")  # one whose float16 is no faster
    plain.workers[0].gemm_f32_gflops = 100.0
    plain.workers[0].gemm_f16_gflops = 100.0
    registry.apply_status(tensor, now=1.0)
    registry.apply_status(plain, now=1.0)
    ready = registry.ready()
    by_agent = dict(zip(ready.agent_ids, ready.speed_for("float16"), strict=True))
    assert by_agent == {"tensor01": 400.0, "plain001": 100.0}
    assert list(ready.speed_for("float32")) == list(ready.speed)
    older = Registry()  # a worker without a float16 figure (an older agent): float32 figures for all
    plain.workers[0].gemm_f16_gflops = 0.0
    older.apply_status(tensor, now=1.0)
    older.apply_status(plain, now=1.0)
    assert list(older.ready().speed_for("float16")) == list(older.ready().speed)


def test_a_worker_hotter_than_its_limit_takes_no_rows_until_it_cools() -> None:
    registry = Registry()
    hot = status("hot001", used=(0, 0))
    for worker in hot.workers:
        worker.temperature_limit_c = 80.0
    registry.apply_status(hot, now=1.0)
    registry.apply_status(status("cool01"), now=1.0)
    report = telemetry("hot001", used=(0, 0), time=101.0)
    report.workers[1].temperature_c = 91.0
    registry.apply_telemetry(report, now=2.0)
    assert sorted(free(registry)) == [("cool01", 0), ("hot001", 0)]
    report.workers[1].temperature_c = 70.0
    report.time.CopyFrom(stamp(102.0))
    registry.apply_telemetry(report, now=3.0)
    assert sorted(free(registry)) == [("cool01", 0), ("hot001", 0), ("hot001", 1)]


def test_every_worker_hot_means_no_ready_workers() -> None:
    registry = Registry()
    hot = status("hot001")
    hot.workers[0].temperature_limit_c = 80.0
    registry.apply_status(hot, now=1.0)
    report = telemetry("hot001", time=101.0)
    report.workers[0].temperature_c = 95.0
    registry.apply_telemetry(report, now=2.0)
    assert len(registry.ready()) == 0


def test_a_quarantined_agent_takes_no_rows_until_taken_back() -> None:
    registry = Registry()
    registry.set_quarantined("bad001", True)  # a quarantine loaded before the agent's status arrives
    registry.apply_status(status("bad001"), now=1.0)
    registry.apply_status(status("good01"), now=1.0)
    assert registry.is_quarantined("bad001")
    assert registry.quarantined_ready() == 1
    assert sorted(free(registry)) == [("good01", 0)]
    assert registry.ready(exclude=["good01"]).agent_ids == ()
    registry.apply_status(status("bad001", state=CORDONED, updated=101.0), now=2.0)
    assert registry.quarantined_ready() == 0  # counted among the ready ones only
    registry.apply_status(status("bad001", updated=102.0), now=3.0)
    registry.set_quarantined("bad001", False)
    assert sorted(free(registry)) == [("bad001", 0), ("good01", 0)]
    assert registry.count_by_state() == {"ready": 2}  # the agent's own state is untouched throughout
