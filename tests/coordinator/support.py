"""Helpers for the coordinator's tests: a small gRPC client, polling with a deadline, bounded asyncio.run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gpupool._process import Child
from gpupool._proto.v1 import coordinator_pb2 as pb
from gpupool._proto.v1 import coordinator_pb2_grpc
from gpupool.protocol.errors import translate_rpc_error
from gpupool.transport.rpc import bearer_metadata

T = TypeVar("T")


class CoordinatorClient:
    """The coordinator's two services over one channel; failures raise gpupool's exceptions.

    Args:
        address: the coordinator's ``host:port``.
        token: the bearer token every call carries ("" for none).
    """

    def __init__(self, address: str, token: str = "") -> None:
        self.address = address
        self.token = token
        self._channel = grpc.aio.insecure_channel(address)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self.admin = coordinator_pb2_grpc.AdminStub(self._channel)

    @classmethod
    def of(cls, coordinator: Child, token: str | None = None) -> CoordinatorClient:
        """A client of a coordinator the fixture started, with its admin token unless ``token`` is given."""
        return cls(
            str(coordinator.ready["listen"]), str(coordinator.ready["token"]) if token is None else token
        )

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def call(self, method: Callable[..., Awaitable[T]], request: Any, deadline: float = 15.0) -> T:
        """Call ``method(request)`` with a deadline, translating a failure as the client library does."""
        try:
            return await method(request, timeout=deadline, metadata=bearer_metadata(self.token))
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(exc, peer=self.address) from exc

    async def agents(self, include_offline: bool = False) -> dict[str, pb.AgentRecord]:
        reply = await self.call(
            self.coordinator.ListAgents, pb.ListAgentsRequest(include_offline=include_offline)
        )
        return {record.status.agent_id: record for record in reply.agents}

    async def connect(self, client: str = "tester@test") -> str:
        reply = await self.call(
            self.coordinator.Connect, pb.ConnectRequest(client=client, client_version="test")
        )
        return reply.session

    async def place(
        self, session: str, dtype: str, shape: tuple[int, ...], exclude: tuple[str, ...] = ()
    ) -> list[tuple[str, int, int, int]]:
        request = pb.PlaceRequest(session=session, exclude_agents=list(exclude))
        request.meta.dtype = dtype
        request.meta.shape.extend(shape)
        reply = await self.call(self.coordinator.Place, request)
        return [(s.agent_id, s.worker, s.start, s.stop) for s in reply.shards]


async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float, what: str) -> T:
    """Poll ``check`` until it returns something other than None or False; fail after ``within`` s."""
    deadline = time.monotonic() + within
    last: object = None
    while True:
        last = await check()
        if last is not None and last is not False:
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s (last: {last!r})")
        await asyncio.sleep(0.05)


def run(coroutine: Awaitable[T], timeout: float = 45.0) -> T:
    """Run a test's async body with an overall deadline."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())
