"""How the operator commands report a coordinator's refusals: one line on stderr, exit code 1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from gpupool._proto.v1 import coordinator_pb2, coordinator_pb2_grpc
from gpupool.cli.main import main


class RefusingAdmin(coordinator_pb2_grpc.AdminServicer):
    """Refuses each command the way the coordinator does."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Cordon(self, request: coordinator_pb2.AdminRequest, context: grpc.ServicerContext) -> None:
        context.set_trailing_metadata((("gpupool-error", "unknown-agent"),))
        context.abort(grpc.StatusCode.NOT_FOUND, f"no agent {request.agent_id!r}")

    def Drain(self, request: coordinator_pb2.AdminRequest, context: grpc.ServicerContext) -> None:
        context.set_trailing_metadata((("gpupool-error", "broker-unavailable"),))
        context.abort(grpc.StatusCode.UNAVAILABLE, "command to abc not sent: broker down")

    def Uncordon(self, request: coordinator_pb2.AdminRequest, context: grpc.ServicerContext) -> None:
        context.set_trailing_metadata((("gpupool-error", "not-confirmed"),))
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "agent abc did not confirm uncordon within 10 s")


class SlowCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def ListAgents(
        self, request: coordinator_pb2.ListAgentsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListAgentsReply:
        self.release.wait(5)  # longer than the client's --timeout; set free when the test ends
        return coordinator_pb2.ListAgentsReply()


@pytest.fixture
def refusing_coordinator() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    admin = RefusingAdmin()
    coordinator_pb2_grpc.add_AdminServicer_to_server(admin, server)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(SlowCoordinator(admin.release), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        admin.release.set()
        server.stop(grace=None).wait(5)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["cordon", "nosuch"], "gpupool: no agent 'nosuch'"),
        (
            ["drain", "abc"],
            "the coordinator cannot reach its MQTT broker: command to abc not sent: broker down",
        ),
        (
            ["uncordon", "abc"],
            "gpupool: agent abc did not confirm uncordon within 10 s (coordinator 127.0.0.1:",
        ),
        (["--timeout", "0.2", "agents"], "did not answer in time (--timeout)"),
    ],
)
def test_refusals_are_one_line(
    refusing_coordinator: str, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--coordinator", refusing_coordinator, *argv]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err
