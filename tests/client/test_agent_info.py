"""AgentInfo from the coordinator's AgentRecord: the verification and observed-throughput figures."""

from __future__ import annotations

from gpupool._proto.v1 import control_pb2, coordinator_pb2
from gpupool.client.types import agent_info_from_record


def test_agent_info_carries_trust_and_observed_network_throughput() -> None:
    record = coordinator_pb2.AgentRecord(
        status=control_pb2.AgentStatus(agent_id="a1", name="rig", state=control_pb2.AGENT_STATE_READY),
        trust=coordinator_pb2.AgentTrust(checks=3, mismatches=2, score=0.4, quarantined=True, reason="bad"),
        network_bytes_per_second=5e7,
    )
    info = agent_info_from_record(record)
    assert (info.trust, info.checks, info.mismatches, info.quarantined) == (0.4, 3, 2, True)
    assert info.network_bytes_per_second == 5e7
    unchecked = agent_info_from_record(coordinator_pb2.AgentRecord(status=record.status))
    assert (unchecked.trust, unchecked.checks, unchecked.quarantined) == (0.5, 0, False)
    assert unchecked.network_bytes_per_second == 0.0
