"""An attacker's tools, for the security tests: raw gRPC and MQTT, forged credentials, fake agents.

Everything here goes over the wire as an outsider would (a leaked client token, a rig's stolen MQTT
password, a listener on the network); nothing reaches into a running process. Each wait has a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import aiomqtt
import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._config import CHUNK_BYTES, parse_broker_url
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2, coordinator_pb2, coordinator_pb2_grpc
from gpupool.protocol.codec import array_from_bytes, decode_json, encode_json, iter_chunks, meta_of
from gpupool.protocol.errors import ERROR_KEY
from gpupool.protocol.rawstream import ACCEPTED, DOWNLOAD_RAW, UPLOAD_RAW
from gpupool.security.capability import issue_capability
from gpupool.security.pki import PoolAuthority, agent_dns_name, load_private_key, new_key_and_csr
from gpupool.security.store import StateStore
from gpupool.security.tokens import Role
from gpupool.transport.coordinator import ADMIN_METHODS
from gpupool.transport.rpc import CAPABILITY_KEY, CHANNEL_OPTIONS, aio_channel, bearer_metadata

MiB = 1 << 20
T = TypeVar("T")
M = TypeVar("M", bound=Message)


# -- waiting, with deadlines ---------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test's async body with an overall deadline."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def wait_for(probe: Callable[[], T], *, within: float, what: str, interval: float = 0.05) -> T:
    """Call ``probe`` until it returns something truthy (returned), for at most ``within`` seconds.

    Raises:
        AssertionError: it never did; the message says what was awaited and the last value seen.
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within:g} s (last seen: {value!r})")
        time.sleep(interval)


async def await_for(
    probe: Callable[[], Awaitable[T]], *, within: float, what: str, interval: float = 0.05
) -> T:
    """:func:`wait_for` for an async probe."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within:g} s (last seen: {value!r})")
        await asyncio.sleep(interval)


# -- refusals ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """How a call was refused: its status code, ``gpupool-error`` kind and details."""

    code: grpc.StatusCode
    kind: str
    details: str


def refusal_of(exc: grpc.RpcError) -> Refusal:
    """The refusal a failed call (sync or async) carries."""
    assert isinstance(exc, grpc.Call | grpc.aio.AioRpcError), exc
    meta = {str(k): str(v) for k, v in (exc.trailing_metadata() or ())}
    return Refusal(exc.code(), meta.get(ERROR_KEY, ""), exc.details() or "")


async def refused(call: Awaitable[Any]) -> Refusal:
    """Await a call that must fail; its refusal."""
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        return refusal_of(exc)
    raise AssertionError(f"the call succeeded ({result!r:.200}); a refusal was expected")


def refused_now(call: Callable[[], Any]) -> Refusal:
    """Make a blocking call that must fail; its refusal."""
    try:
        result = call()
    except grpc.RpcError as exc:
        return refusal_of(exc)
    raise AssertionError(f"the call succeeded ({result!r:.200}); a refusal was expected")


# -- tokens and capabilities, as an operator's state dir holds them ------------------------------------------


def create_token(coordinator_dir: Path, *, role: Role, name: str) -> tuple[str, str]:
    """A new token of ``role`` in the coordinator's store, as ``gpupool token create`` makes: (token, id)."""
    with StateStore.open(coordinator_dir) as store:
        token, record = store.create_token(role=role, name=name, ttl=None, now=time.time())
    return token, record.token_id


def revoke_token(coordinator_dir: Path, token_id: str) -> None:
    """Revoke a token in the coordinator's store (what ``gpupool token revoke`` does)."""
    with StateStore.open(coordinator_dir) as store:
        store.revoke_token(token_id, now=time.time())


def capability_key(coordinator_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The coordinator's capability signing key, read from its state dir."""
    return load_private_key((coordinator_dir / "capability.key").read_bytes())


def expired_capability(coordinator_dir: Path, *, session: str, agent_id: str) -> str:
    """A capability genuinely signed by the coordinator's key that expired an hour ago."""
    token, expires = issue_capability(
        capability_key(coordinator_dir), session=session, agent_id=agent_id, ttl=60, now=time.time() - 3600
    )
    assert expires < time.time()
    return token


def foreign_capability(*, session: str, agent_id: str) -> str:
    """A well-formed capability for (session, agent) signed with a key of the attacker's own."""
    key = ec.generate_private_key(ec.SECP256R1())
    token, _ = issue_capability(key, session=session, agent_id=agent_id, ttl=600, now=time.time())
    return token


# -- certificates --------------------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def own_ca_certificate(dns_name: str) -> tuple[bytes, bytes, bytes]:
    """A CA of the attacker's own and a server certificate it signed for ``dns_name``: (ca, cert, key)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpupool pool CA")])  # a look-alike
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    encoding = serialization.Encoding.PEM
    return ca.public_bytes(encoding), certificate.public_bytes(encoding), _pem_key(key)


def pool_certificate(coordinator_dir: Path, agent_id: str) -> tuple[bytes, bytes]:
    """A genuine pool-CA certificate for agent ``agent_id`` (as an enrolled rig holds one): (cert, key)."""
    key_pem, csr_pem = new_key_and_csr(agent_id)
    certificate = PoolAuthority.load_or_create(coordinator_dir).sign_agent_csr(csr_pem, agent_id=agent_id)
    return certificate, key_pem


# -- the coordinator, raw ------------------------------------------------------------------------------------


class CoordinatorCalls:
    """Blocking calls to a coordinator with any token (or none), returning replies or raising grpc errors.

    Args:
        address: the coordinator's ``host:port`` (plaintext: it listens on loopback).
        token: the bearer token to show; "" for none.
    """

    def __init__(self, address: str, token: str = "") -> None:
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = coordinator_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self.metadata = bearer_metadata(token)

    def call(self, method: str, request: Message, *, timeout: float = 15.0) -> Any:
        """Call ``method`` of the Coordinator or Admin service."""
        stub = self._admin if method in ADMIN_METHODS else self._coordinator
        return getattr(stub, method)(request, timeout=timeout, metadata=self.metadata)

    def refusal(self, method: str, request: Message, *, timeout: float = 15.0) -> Refusal:
        """Call ``method``, which must be refused; the refusal."""
        return refused_now(lambda: self.call(method, request, timeout=timeout))

    def connect(self, client: str = "attacker@nowhere") -> coordinator_pb2.ConnectReply:
        """A session of this token's own."""
        reply: coordinator_pb2.ConnectReply = self.call(
            "Connect", coordinator_pb2.ConnectRequest(client=client)
        )
        return reply

    def grant(self, session: str, agent_ids: Sequence[str]) -> dict[str, str]:
        """Capabilities of ``session`` on these agents, by agent id."""
        reply = self.call("Grant", coordinator_pb2.GrantRequest(session=session, agent_ids=list(agent_ids)))
        return {capability.agent_id: capability.token for capability in reply.capabilities}

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> CoordinatorCalls:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- an enrolled agent, raw ----------------------------------------------------------------------------------


class AgentCalls:
    """Calls to one enrolled agent over TLS checked against its id, showing the capability we choose.

    Create it inside the running loop that uses it.

    Args:
        endpoint: the agent's ``host:port``.
        agent_id: the id its certificate must name.
        ca_pem: the pool CA.
        capability: shown as ``gpupool-capability`` metadata; "" shows none.
    """

    def __init__(self, endpoint: str, agent_id: str, ca_pem: bytes, capability: str = "") -> None:
        self.endpoint = endpoint
        self.agent_id = agent_id
        self.channel = aio_channel(endpoint, ca_pem=ca_pem, server_name=agent_dns_name(agent_id))
        self.stub = agent_pb2_grpc.AgentStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata: tuple[tuple[str, str], ...] = ((CAPABILITY_KEY, capability),) if capability else ()
        self.upload_raw_call = self.channel.stream_unary(UPLOAD_RAW, None, None)
        self.download_raw_call = self.channel.unary_stream(DOWNLOAD_RAW, None, None)

    async def __aenter__(self) -> AgentCalls:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.channel.close(grace=None)

    async def upload(
        self, buffer_id: str, array: np.ndarray, *, session: str = "", worker: int = 0
    ) -> agent_pb2.UploadReply:
        """Upload ``array`` as ``buffer_id`` with the protobuf ``Upload``."""
        header = agent_pb2.UploadHeader(
            buffer_id=buffer_id, worker=worker, meta=meta_of(array.dtype, array.shape), session=session
        )

        async def requests() -> AsyncIterator[agent_pb2.UploadRequest]:
            yield agent_pb2.UploadRequest(header=header)
            for chunk in iter_chunks(array):
                yield agent_pb2.UploadRequest(chunk=bytes(chunk))

        reply: agent_pb2.UploadReply = await self.stub.Upload(requests(), timeout=30, metadata=self.metadata)
        return reply

    async def upload_raw(
        self, buffer_id: str, array: np.ndarray, *, session: str = "", worker: int = 0
    ) -> agent_pb2.UploadReply:
        """Upload ``array`` as ``buffer_id`` with ``UploadRaw``, waiting for the agent's go-ahead before the
        data (as gpupool's client does): a refusal then arrives as itself, not as the INTERNAL of a write the
        refusal cut off (grpc/grpc#36066)."""
        header = agent_pb2.UploadHeader(
            buffer_id=buffer_id, worker=worker, meta=meta_of(array.dtype, array.shape), session=session
        )
        call = self.upload_raw_call(None, timeout=30, metadata=self.metadata)
        try:
            await call.write(header.SerializeToString())
            if ACCEPTED not in tuple(await call.initial_metadata() or ()):
                await call  # refused: this raises the agent's status
            for chunk in iter_chunks(array):
                await call.write(bytes(chunk))
            await call.done_writing()
        except asyncio.InvalidStateError:
            pass  # the agent ended the call: awaiting it below raises its status
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INTERNAL:
                raise
            await call  # a write lost the race with the agent's refusal: the call carries the refusal
            raise
        return agent_pb2.UploadReply.FromString(await call)

    async def download(self, buffer_id: str) -> np.ndarray:
        """Fetch a buffer with the protobuf ``Download``."""
        call = self.stub.Download(
            agent_pb2.DownloadRequest(buffer_id=buffer_id), timeout=30, metadata=self.metadata
        )
        meta, data = None, bytearray()
        async for message in call:
            if message.WhichOneof("kind") == "meta":
                meta = message.meta
            else:
                data += message.chunk
        assert meta is not None, "no meta in the download"
        return array_from_bytes(bytes(data), meta).copy()

    async def download_raw(self, buffer_id: str) -> np.ndarray:
        """Fetch a buffer with ``DownloadRaw``."""
        request = agent_pb2.DownloadRequest(buffer_id=buffer_id, chunk_bytes=CHUNK_BYTES)
        call = self.download_raw_call(request.SerializeToString(), timeout=30, metadata=self.metadata)
        meta, data = None, bytearray()
        async for message in call:
            if meta is None:
                meta = agent_pb2.ArrayMeta.FromString(message)
            else:
                data += message
        assert meta is not None, "no meta in the download"
        return array_from_bytes(bytes(data), meta).copy()

    async def execute(self, request: agent_pb2.ExecuteRequest) -> agent_pb2.ExecuteReply:
        """Run a program."""
        reply: agent_pb2.ExecuteReply = await self.stub.Execute(request, timeout=30, metadata=self.metadata)
        return reply

    async def free(self, request: agent_pb2.FreeRequest) -> agent_pb2.FreeReply:
        """Free buffers."""
        reply: agent_pb2.FreeReply = await self.stub.Free(request, timeout=30, metadata=self.metadata)
        return reply

    async def health(self) -> control_pb2.AgentStatus:
        """The agent's status (Health needs no capability)."""
        reply: agent_pb2.HealthReply = await self.stub.Health(agent_pb2.HealthRequest(), timeout=10)
        return reply.status

    async def memory(self) -> tuple[int, int]:
        """``(bytes used, buffers)`` over the agent's workers, as it reports them now."""
        status = await self.health()
        return sum(w.memory_used for w in status.workers), sum(w.buffers for w in status.workers)


def every_data_call(agent: AgentCalls, buffer_id: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of each data-plane method that needs a capability, naming ``buffer_id`` (not yet made)."""
    row = np.arange(4, dtype=np.float32)
    program = agent_pb2.ExecuteRequest(
        ops=[
            agent_pb2.Op(
                op="negative",
                inputs=[agent_pb2.Operand(buffer=buffer_id)],
                output=f"{buffer_id}.neg",
                expect=agent_pb2.ArrayMeta(dtype="float32", shape=[4]),
            )
        ],
        fetch=[f"{buffer_id}.neg"],
    )
    return {
        "Upload": lambda: agent.upload(f"{buffer_id}.up", row),
        "UploadRaw": lambda: agent.upload_raw(f"{buffer_id}.raw", row),
        "Download": lambda: agent.download(buffer_id),
        "DownloadRaw": lambda: agent.download_raw(buffer_id),
        "Execute": lambda: agent.execute(program),
        "Free": lambda: agent.free(agent_pb2.FreeRequest(buffer_ids=[buffer_id])),
        "FreeSession": lambda: agent.free(agent_pb2.FreeRequest()),
    }


# -- a fake agent and a tarpit: where a hijacked endpoint would send clients ---------------------------------


class FakeAgent(agent_pb2_grpc.AgentServicer):
    """Answers like an agent, with made-up data, and counts every call that reaches it."""

    def __init__(self) -> None:
        self.calls = 0

    async def Execute(self, request: agent_pb2.ExecuteRequest, context: Any) -> agent_pb2.ExecuteReply:
        self.calls += 1
        data = np.full(4, 666.0, np.float32)
        return agent_pb2.ExecuteReply(
            fetched=[
                agent_pb2.Fetched(buffer_id=b, meta=meta_of(data.dtype, data.shape), data=data.tobytes())
                for b in request.fetch
            ]
        )

    async def Health(self, request: agent_pb2.HealthRequest, context: Any) -> agent_pb2.HealthReply:
        self.calls += 1
        return agent_pb2.HealthReply(status=control_pb2.AgentStatus(agent_id="fake"))


@asynccontextmanager
async def fake_agent(certificate_pem: bytes, key_pem: bytes) -> AsyncIterator[tuple[str, FakeAgent]]:
    """A :class:`FakeAgent` serving TLS with this certificate on a loopback port: (endpoint, servicer)."""
    servicer = FakeAgent()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, certificate_pem)]))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


class Tarpit:
    """A TCP listener that counts the connections made to it and the bytes sent (a forged endpoint)."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.endpoint = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self.connections = 0
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="tarpit", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            reader = threading.Thread(target=self._read, args=(connection,), daemon=True)
            self._threads.append(reader)
            reader.start()

    def _read(self, connection: socket.socket) -> None:
        connection.settimeout(0.1)
        with connection:
            while not self._stop.is_set():
                try:
                    data = connection.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.bytes_received += len(data)

    def close(self) -> None:
        """Stop listening (bounded: every thread polls the stop flag every 0.1 s)."""
        self._stop.set()
        self._socket.close()
        for thread in self._threads:
            thread.join(2)

    def __enter__(self) -> Tarpit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- MQTT ----------------------------------------------------------------------------------------------------


@asynccontextmanager
async def mqtt(
    broker_url: str, *, username: str | None = None, password: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    """An MQTT client of the broker, logged in as ``username`` if given (anonymous otherwise)."""
    address = parse_broker_url(broker_url)
    async with aiomqtt.Client(
        address.host,
        address.port,
        username=username,
        password=password,
        identifier=f"attacker-{uuid.uuid4().hex[:8]}",
        timeout=10,
    ) as client:
        yield client


async def next_message(
    client: aiomqtt.Client,
    topic: str,
    message_type: type[M],
    predicate: Callable[[M], bool] = lambda _: True,
    *,
    within: float = 10.0,
) -> tuple[bytes, M]:
    """The first message on exactly ``topic`` that decodes and satisfies ``predicate``: (payload, decoded)."""
    async with asyncio.timeout(within):
        async for message in client.messages:
            if message.topic.value != topic or not isinstance(message.payload, bytes | bytearray):
                continue
            if not message.payload:
                continue
            decoded = decode_json(bytes(message.payload), message_type, what=topic)
            if predicate(decoded):
                return bytes(message.payload), decoded
    raise AssertionError("unreachable")


async def capture(
    broker_url: str,
    topic: str,
    message_type: type[M],
    predicate: Callable[[M], bool] = lambda _: True,
    *,
    within: float = 10.0,
    username: str | None = None,
    password: str | None = None,
) -> tuple[bytes, M]:
    """Eavesdrop: subscribe to ``topic`` and return the first matching message (a retained one first)."""
    async with mqtt(broker_url, username=username, password=password) as client:
        await client.subscribe(topic, qos=1)
        return await next_message(client, topic, message_type, predicate, within=within)


def timestamp(seconds: float | None = None) -> Timestamp:
    """A protobuf timestamp (now by default)."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() if seconds is None else seconds) * 1e9))
    return stamp


def forged_status(agent_id: str, endpoint: str, *, memory: int = 64 << 30) -> control_pb2.AgentStatus:
    """A plausible, unsigned READY status offering ``memory`` bytes at ``endpoint``."""
    return control_pb2.AgentStatus(
        schema_version=1,
        agent_id=agent_id,
        name="totally-legit-rig",
        version="0.1.0",
        endpoint=endpoint,
        state=control_pb2.AGENT_STATE_READY,
        backend="numpy",
        workers=[control_pb2.Worker(index=0, backend="numpy", memory_limit=memory)],
        hostname="rig",
        updated=timestamp(),
        started=timestamp(),
    )


def payload(message: Message) -> bytes:
    """A control-plane message as it travels."""
    return encode_json(message)


# -- the pool's logs -----------------------------------------------------------------------------------------


class PoolLog:
    """The children's stderr, collected in one file (give :attr:`stream` to ``LocalPool(stderr=...)``).

    Args:
        path: the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stream: IO[bytes] = path.open("wb")

    def lines(self) -> list[str]:
        """Every line written so far."""
        return self.path.read_text(errors="replace").splitlines()

    def matching(self, *texts: str) -> list[str]:
        """The lines that contain every one of ``texts``."""
        return [line for line in self.lines() if all(text in line for text in texts)]

    def wait_for(self, *texts: str, within: float = 10.0) -> list[str]:
        """Wait until some line contains every one of ``texts``; the lines that do."""
        return wait_for(lambda: self.matching(*texts), within=within, what=f"a log line with {texts}")

    def dropped(self, agent_id: str, reason: str) -> list[str]:
        """The coordinator's lines saying it dropped a payload of ``agent_id`` for ``reason``."""
        return self.matching(" coordinator ", f"dropped a payload for agent {agent_id}: {reason}")

    def close(self) -> None:
        """Close the file."""
        self.stream.close()


@contextmanager
def pool_log(path: Path) -> Iterator[PoolLog]:
    """A :class:`PoolLog` closed on exit."""
    log = PoolLog(path)
    try:
        yield log
    finally:
        log.close()


async def publish_then_sync(
    client: aiomqtt.Client,
    root: str,
    log: PoolLog,
    messages: Sequence[tuple[str, bytes, bool]],
    *,
    as_agent: str = "",
    within: float = 10.0,
) -> None:
    """Publish ``(topic, payload, retain)`` messages, then wait until the coordinator has read all of them.

    The proof is a last message the coordinator always drops with a log line of its own: a status for
    a fresh, never-enrolled agent id, or (``as_agent``: a client that may publish only that agent's
    topics) that agent's telemetry naming a fresh id. One client's messages reach the coordinator in
    order, so once that line is logged the ones before it were handled.
    """
    for topic, data, retain in messages:
        await client.publish(topic, data, qos=1, retain=retain)
    sentinel = f"sentinel{uuid.uuid4().hex[:8]}"
    if as_agent:
        telemetry = control_pb2.AgentTelemetry(schema_version=1, agent_id=sentinel)
        await client.publish(f"{root}/{as_agent}/telemetry", payload(telemetry), qos=1)
        expected = (as_agent, f"telemetry names agent {sentinel!r}")
    else:
        status = forged_status(sentinel, "127.0.0.1:9")
        await client.publish(f"{root}/{sentinel}/status", payload(status), qos=1)
        expected = (sentinel, "not an enrolled agent of this pool")
    deadline = time.monotonic() + within
    while not log.dropped(*expected):
        if time.monotonic() >= deadline:
            raise AssertionError(f"the coordinator did not read the messages within {within:g} s")
        await asyncio.sleep(0.05)
