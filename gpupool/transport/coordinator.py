"""The one client of the coordinator's gRPC API, for the client library, the CLI, agents and LocalPool.

Blocking calls go over a sync channel made on first use; ``await``-ed ones over an asyncio channel made
on first use inside the running loop. Both carry the bearer token and dial TLS when given the pool CA.
Every call has a deadline; failures come back as gpupool exceptions (``translate_rpc_error``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import grpc

from gpupool._config import DEFAULT_COORDINATOR, coordinator_address
from gpupool._errors import ConnectError, GpupoolError, UsageError
from gpupool._proto.v1 import coordinator_pb2_grpc
from gpupool.protocol.errors import translate_rpc_error
from gpupool.security.pki import COORDINATOR_DNS_NAME
from gpupool.transport.rpc import aio_channel, bearer_metadata, is_loopback, sync_channel

__all__ = ["ADMIN_METHODS", "CoordinatorClient", "PoolCredentials"]

#: Methods of the Admin service; every other name belongs to the Coordinator service.
ADMIN_METHODS: Final = frozenset({"Drain", "Cordon", "Uncordon", "Forget", "EndJob"})


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolCredentials:
    """Where the coordinator is and how to prove who we are to it.

    Attributes:
        address: the coordinator's ``host:port``.
        token: a bearer token ("" for none: every call is then refused, with a hint).
        ca_pem: the pool CA; given, the coordinator is dialled with TLS and must present
            ``coordinator.gpupool``.
    """

    address: str = DEFAULT_COORDINATOR
    token: str = ""
    ca_pem: bytes | None = None

    @classmethod
    def from_env(
        cls, address: str | None = None, *, token: str | None = None, ca: str | bytes | None = None
    ) -> PoolCredentials:
        """Explicit values, else ``$GPUPOOL_COORDINATOR``, ``$GPUPOOL_TOKEN`` and ``$GPUPOOL_CA`` (a path).

        Raises:
            UsageError: the CA file cannot be read.
        """
        ca_value: str | bytes | None = ca if ca is not None else os.environ.get("GPUPOOL_CA") or None
        ca_pem: bytes | None
        if isinstance(ca_value, bytes):
            ca_pem = ca_value
        elif ca_value:
            try:
                ca_pem = Path(ca_value).read_bytes()
            except OSError as exc:
                raise UsageError(f"cannot read the pool CA {ca_value!r} (GPUPOOL_CA): {exc}") from exc
        else:
            ca_pem = None
        return cls(
            address=coordinator_address(address),
            token=token if token is not None else os.environ.get("GPUPOOL_TOKEN", "").strip(),
            ca_pem=ca_pem,
        )


class CoordinatorClient:
    """Calls to one coordinator, blocking (:meth:`call`) or awaited (:meth:`acall`).

    Args:
        credentials: the address, token and CA.
        timeout: the default deadline of each call, in seconds.
    """

    def __init__(self, credentials: PoolCredentials, *, timeout: float = 10.0) -> None:
        self.credentials = credentials
        self.address = credentials.address
        self.timeout = timeout
        self._metadata = bearer_metadata(credentials.token)
        self._sync: grpc.Channel | None = None
        self._sync_stubs: tuple[Any, Any] | None = None
        self._aio: grpc.aio.Channel | None = None
        self._aio_stubs: tuple[Any, Any] | None = None

    def _server_name(self) -> str:
        return COORDINATOR_DNS_NAME if self.credentials.ca_pem is not None else ""

    def _sync_method(self, method: str) -> Any:
        if self._sync_stubs is None:
            self._sync = sync_channel(
                self.address, ca_pem=self.credentials.ca_pem, server_name=self._server_name(), private=True
            )
            self._sync_stubs = (
                coordinator_pb2_grpc.CoordinatorStub(self._sync),  # type: ignore[no-untyped-call]
                coordinator_pb2_grpc.AdminStub(self._sync),  # type: ignore[no-untyped-call]
            )
        return getattr(self._sync_stubs[method in ADMIN_METHODS], method)

    def _aio_method(self, method: str) -> Any:
        if self._aio_stubs is None:
            self._aio = aio_channel(
                self.address, ca_pem=self.credentials.ca_pem, server_name=self._server_name(), private=True
            )
            self._aio_stubs = (
                coordinator_pb2_grpc.CoordinatorStub(self._aio),  # type: ignore[no-untyped-call]
                coordinator_pb2_grpc.AdminStub(self._aio),  # type: ignore[no-untyped-call]
            )
        return getattr(self._aio_stubs[method in ADMIN_METHODS], method)

    def call(
        self, method: str, request: Any, *, timeout: float | None = None, wait_for_ready: bool = False
    ) -> Any:
        """Call ``method`` (e.g. ``"ListAgents"``) and wait for its reply.

        With ``wait_for_ready`` a coordinator that is unreachable right now (restarting) is waited for
        until the deadline; without, an unreachable one fails the call at once.

        Raises:
            ConnectError, DeadlineExceeded, AuthError, GpupoolError: the call failed.
        """
        try:
            return self._sync_method(method)(
                request,
                timeout=timeout or self.timeout,
                metadata=self._metadata,
                wait_for_ready=wait_for_ready or None,
            )
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    async def acall(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline
        wait_for_ready: bool = False,
    ) -> Any:
        """:meth:`call`, awaited on the running loop."""
        try:
            return await self._aio_method(method)(
                request,
                timeout=timeout or self.timeout,
                metadata=self._metadata,
                wait_for_ready=wait_for_ready or None,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: grpc.RpcError) -> GpupoolError:
        error = translate_rpc_error(exc, peer=self.address)
        host = self.address.rsplit(":", 1)[0]
        if isinstance(error, ConnectError) and self.credentials.ca_pem is None and not is_loopback(host):
            # A plaintext client and a TLS coordinator look to each other like a dead peer.
            return ConnectError(
                self.address,
                f"{error.detail} (if the coordinator serves TLS, as it does beyond loopback, set GPUPOOL_CA "
                "to the pool CA, its <state-dir>/ca.pem)",
            )
        return error

    def close(self) -> None:
        """Close the blocking channel (the asyncio one closes with :meth:`aclose`)."""
        if self._sync is not None:
            self._sync.close()
            self._sync, self._sync_stubs = None, None

    async def aclose(self) -> None:
        """Close both channels."""
        self.close()
        if self._aio is not None:
            await self._aio.close(grace=None)
            self._aio, self._aio_stubs = None, None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
