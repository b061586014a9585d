"""The session's heartbeat carries the throughput its transfers measured per agent (no network: a fake
coordinator client records the Renew requests)."""

from __future__ import annotations

import asyncio
from typing import Any

from gpupool._proto.v1 import coordinator_pb2
from gpupool.client.lease import LeaseKeeper, ObservedTransfers, TransferMeter

MiB = 1 << 20


class RecordingCoordinator:
    """Answers Renew, keeps every request, and closes the keeper after ``beats`` of them."""

    def __init__(self, beats: int) -> None:
        self.renewals: list[coordinator_pb2.RenewRequest] = []
        self.keeper: LeaseKeeper | None = None
        self._beats = beats

    async def acall(self, method: str, request: Any, **_: object) -> Any:
        assert method == "Renew"
        self.renewals.append(request)
        if len(self.renewals) == self._beats and self.keeper is not None:
            self.keeper.close()
        return coordinator_pb2.RenewReply(lease_seconds=0.3)


def test_a_transfer_meter_sums_per_agent_until_drained() -> None:
    meter = TransferMeter()
    meter.add("bbb", 4 * MiB, 0.5)
    meter.add("aaa", 1 * MiB, 0.25)
    meter.add("bbb", 2 * MiB, 0.25)
    assert meter.drain() == [
        ObservedTransfers(agent_id="aaa", nbytes=1 * MiB, seconds=0.25),
        ObservedTransfers(agent_id="bbb", nbytes=6 * MiB, seconds=0.75),
    ]
    assert meter.drain() == []


def test_each_heartbeat_reports_what_the_meter_measured_since_the_last() -> None:
    rpc = RecordingCoordinator(beats=2)
    meter = TransferMeter()
    meter.add("aaa", 8 * MiB, 0.5)
    meter.add("bbb", 0, 0.0)  # nothing measured: not sent
    keeper = LeaseKeeper(
        rpc,  # type: ignore[arg-type]
        session="job-1",
        lease=0.3,
        on_offline=lambda offline: None,
        observed=meter.drain,
    )
    rpc.keeper = keeper
    asyncio.run(asyncio.wait_for(keeper.run(), 10.0))
    first, second = rpc.renewals
    assert first.session == "job-1"
    assert [(o.agent_id, o.bytes, o.seconds) for o in first.observed] == [("aaa", 8 * MiB, 0.5)]
    assert list(second.observed) == []  # drained by the first beat


def test_without_a_provider_the_heartbeat_carries_no_figures() -> None:
    rpc = RecordingCoordinator(beats=1)
    keeper = LeaseKeeper(rpc, session="job-1", lease=0.3, on_offline=lambda offline: None)  # type: ignore[arg-type]
    rpc.keeper = keeper
    asyncio.run(asyncio.wait_for(keeper.run(), 10.0))
    assert len(rpc.renewals) == 1
    assert list(rpc.renewals[0].observed) == []
