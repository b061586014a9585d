"""Malformed messages thrown by Hypothesis at every RPC and every subscribed topic of a live, secure pool.

One pool for the module: the system Mosquitto (anonymous, so anyone may publish on the topics the
coordinator and the agents read), a coordinator, two enrolled NumPy agents serving TLS. A "bystander"
session holds an array through it all. The fuzzer has a client token of its own.

Each test sends its messages (random bytes, and messages that parse but carry random field values),
then checks that the pool is whole: every process alive, the bystander's array intact, a new client
computing, the agents holding exactly what they held before, the coordinator's memory barely grown.
Each prints how many messages it sent (``-s`` shows it). Examples are derandomized: a run is repeatable.

Bugs the fuzz found (dtype names NumPy cannot parse answered UNKNOWN; refusals naming a buffer id that
gRPC metadata cannot carry answered INTERNAL) were fixed, and keep tests of their own at the end.
"""

from __future__ import annotations

import json
import math
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gpupool as gp
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2, coordinator_pb2
from gpupool.agent.ops import OPS
from gpupool.client.array import RemoteArray
from gpupool.local import LocalPool
from gpupool.protocol.codec import encode_json
from gpupool.protocol.rawstream import DOWNLOAD_RAW, UPLOAD_RAW
from gpupool.protocol.topics import Topics
from gpupool.security.pki import agent_dns_name
from gpupool.transport.rpc import CAPABILITY_KEY, bearer_metadata, sync_channel

from .attackers import (
    CoordinatorCalls,
    MiB,
    PoolLog,
    create_token,
    mqtt,
    pool_log,
    publish_then_sync,
    refused_now,
    run,
)

AGENT_MEMORY = 64 * MiB
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [
    "bool",
    "int32",
    "int64",
    "float32",
    "float64",
    "float16",
    "complex64",
    "float128",
    "U4",
    "object",
    "<f8",
    "",
]
#: Status codes a refusal may carry. UNKNOWN (an exception the server did not expect) and
#: DEADLINE_EXCEEDED (a call that hung) are failures.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

#: How grpc.aio answers a request whose deserializer raises (it never reaches the servicer).
UNPARSED = "Unexpected <class 'google.protobuf.message.DecodeError'>"


def dtype_names(size: int) -> st.SearchStrategy[str]:
    # Any text: names NumPy cannot parse (SyntaxError, ValueError) are refused as unsupported too, as
    # test_a_dtype_name_numpy_cannot_parse_is_refused_as_a_bad_request pins.
    return st.sampled_from(DTYPES) | st.text(max_size=size)


COORDINATOR_METHODS = {
    f"/gpupool.v1.{service}/{method.name}": method.input_type
    for service in ("Coordinator", "Admin")
    for method in coordinator_pb2.DESCRIPTOR.services_by_name[service].methods
}
ADMIN_PATHS = frozenset(path for path in COORDINATOR_METHODS if path.startswith("/gpupool.v1.Admin/"))


def request_class(path: str) -> type[Message]:
    cls: type[Message] = getattr(coordinator_pb2, COORDINATOR_METHODS[path].name)
    return cls


# -- the pool, a bystander, and what "whole" means -----------------------------------------------------------


@dataclass
class Fuzzed:
    """The pool under fuzz and what it must still be afterwards."""

    local: LocalPool
    log: PoolLog
    bystander: gp.Pool
    data: np.ndarray
    x: RemoteArray
    fuzzer_token: str
    ca: bytes
    baseline_memory: dict[str, tuple[int, int]] = field(default_factory=dict)
    coordinator_rss: int = 0

    @property
    def agent_ids(self) -> list[str]:
        return [str(child.ready["agent_id"]) for child in self.local.agents]

    @property
    def endpoints(self) -> list[str]:
        return [str(child.ready["endpoint"]) for child in self.local.agents]

    def agent_memory(self) -> dict[str, tuple[int, int]]:
        """Each agent's (bytes, buffers), from its Health (no capability needed)."""
        memory = {}
        for agent_id, endpoint in zip(self.agent_ids, self.endpoints, strict=True):
            channel = sync_channel(endpoint, ca_pem=self.ca, server_name=agent_dns_name(agent_id))
            try:
                reply = agent_pb2_grpc.AgentStub(channel).Health(agent_pb2.HealthRequest(), timeout=10)  # type: ignore[no-untyped-call]
            finally:
                channel.close()
            workers = reply.status.workers
            memory[agent_id] = (sum(w.memory_used for w in workers), sum(w.buffers for w in workers))
        return memory

    def check_bystander(self) -> None:
        np.testing.assert_array_equal(self.x.get(), self.data)
        assert float(self.x.sum()) == float(self.data.sum())
        doubled = self.x * 2
        np.testing.assert_array_equal(doubled.get(), self.data * 2)
        doubled.free()

    def assert_whole(self, sent: int, what: str, outcomes: Mapping[str, int] | None = None) -> None:
        """After ``sent`` messages of ``what``: the pool serves as before, and kept nothing of them."""
        print(f"{what}: sent {sent} messages" + (f", answered {dict(outcomes)}" if outcomes else ""))
        children = [self.local.coordinator, *self.local.agents]
        dead = [child.role for child in children if child is not None and not child.alive()]
        assert not dead, f"{dead} died after {sent} messages of {what}"
        self.check_bystander()
        fresh = np.random.default_rng(sent).standard_normal((32, 8))
        with self.local.connect() as pool:
            y = pool.asarray(fresh)
            np.testing.assert_allclose((y * 3 + 1).get(), fresh * 3 + 1)
            assert len({piece.agent_id for piece in y.layout}) == 2
        deadline = time.monotonic() + 10
        while (memory := self.agent_memory()) != self.baseline_memory and time.monotonic() < deadline:
            time.sleep(0.05)  # the new client's session ends over MQTT, a moment after it disconnects
        assert memory == self.baseline_memory, f"agents kept memory after {sent} messages of {what}"
        assert self.local.coordinator is not None
        grown = psutil.Process(self.local.coordinator.pid).memory_info().rss - self.coordinator_rss
        print(f"{what}: coordinator RSS grew {grown / MiB:.1f} MiB since the pool started")
        assert grown < 48 * MiB, f"coordinator RSS grew {grown / MiB:.0f} MiB after {sent} messages of {what}"
        for state in (record.status.state for record in self.local.list_agents()):
            assert state == control_pb2.AGENT_STATE_READY, f"an agent is not ready after {sent} messages"


@pytest.fixture(scope="module")
def fuzzed(system_broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    with (
        pool_log(tmp_path_factory.mktemp("fuzz") / "pool.log") as log,
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            backend="numpy",
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            memory_limit=str(AGENT_MEMORY),
            coordinator_args=["--min-shard-bytes", "0"],
            agent_args=["--heartbeat", "0.5"],
            stderr=log.stream,
        ) as local,
        local.connect() as bystander,
    ):
        assert local.credentials is not None
        data = np.arange(48 * 16, dtype=np.float64).reshape(48, 16)
        token, _ = create_token(local.credentials.coordinator_dir, role="client", name="fuzzer")
        fuzzed = Fuzzed(
            local=local,
            log=log,
            bystander=bystander,
            data=data,
            x=bystander.asarray(data),
            fuzzer_token=token,
            ca=local.credentials.ca_path.read_bytes(),
        )
        fuzzed.check_bystander()  # warm every path once before the baselines
        with local.connect() as warm:
            warm.asarray(data).get()
        time.sleep(0.5)  # let the warm-up session's END_SESSION land
        fuzzed.baseline_memory = fuzzed.agent_memory()
        assert local.coordinator is not None
        fuzzed.coordinator_rss = psutil.Process(local.coordinator.pid).memory_info().rss
        yield fuzzed


# -- strategies: protobuf messages with random field values --------------------------------------------------

_INTS: Mapping[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

Overrides = Mapping[str, st.SearchStrategy[Any]]


def _field_values(descriptor: FieldDescriptor, overrides: Overrides, depth: int) -> st.SearchStrategy[Any]:
    if descriptor.name in overrides:
        return overrides[descriptor.name]
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=24)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in _INTS:
        low, high = _INTS[kind]
        return st.integers(-3, 8).filter(lambda n: low <= n) | st.integers(low, high)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([value.number for value in descriptor.enum_type.values]) | st.integers(-2, 99)
    if descriptor.message_type.full_name == "google.protobuf.Timestamp":
        return st.builds(
            lambda seconds, nanos: {"seconds": seconds, "nanos": nanos},
            st.integers(0, 253402300799),
            st.integers(0, 999_999_999),
        )
    if depth <= 0:
        return st.just({})
    return message_fields(descriptor.message_type, overrides, depth - 1)


def message_fields(descriptor: Any, overrides: Overrides, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """Random values for some of the message's fields, as a dict (nested messages as dicts).

    ``overrides`` gives the strategy of a field by name (of one element, for a repeated field).
    """
    optional = {}
    for item in descriptor.fields:
        values = _field_values(item, overrides, depth)
        optional[item.name] = st.lists(values, max_size=4) if item.is_repeated else values
    return st.fixed_dictionaries({}, optional=optional)


def _fill(message: Message, values: Mapping[str, Any]) -> Message:
    for name, value in values.items():
        item = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if item.type == FieldDescriptor.TYPE_MESSAGE:
            for each in value if item.is_repeated else [value]:
                _fill(target.add() if item.is_repeated else target, each)
            if not item.is_repeated and not value:
                target.SetInParent()
        elif item.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def messages(cls: type[Message], overrides: Overrides = {}, depth: int = 3) -> st.SearchStrategy[Message]:  # noqa: B006 - read only
    """Messages of ``cls`` with random values in random fields (``overrides`` by field name)."""
    return message_fields(cls.DESCRIPTOR, overrides, depth).map(lambda values: _fill(cls(), values))


ascii_tokens = st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=300)


# -- sending, and what an answer may be ----------------------------------------------------------------------


@dataclass
class Sent:
    """How many messages went out, and how they were answered."""

    count: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def answered(self, outcome: grpc.StatusCode | None, details: str = "") -> None:
        self.count += 1
        name = "OK" if outcome is None else outcome.name
        if outcome == grpc.StatusCode.UNKNOWN and details.startswith(UNPARSED):
            name = "UNPARSED"  # grpc.aio's own answer when the request's deserializer raises
        self.outcomes[name] += 1
        assert name == "UNPARSED" or outcome is None or outcome in REFUSALS, (
            f"message {self.count}: {name}: {details}"
        )

    def call(self, invoke: Callable[[], Any]) -> None:
        try:
            result = invoke()
            if not isinstance(result, bytes | Message | None):
                for _ in result:  # a server stream: read it to its end
                    pass
        except grpc.RpcError as exc:
            self.answered(exc.code(), exc.details() or "")  # type: ignore[attr-defined]
        else:
            self.answered(None)


def metadata(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(pair for pair in pairs if pair[1])


# -- (a) the coordinator -------------------------------------------------------------------------------------


def names_an_agent(fuzzed: Fuzzed, query: str) -> bool:
    """Whether an admin request naming ``query`` would act on a real agent (the fuzz must not drain them)."""
    names = [f"agent-{i}" for i in range(len(fuzzed.agent_ids))]
    return bool(query) and (query in names or any(a.startswith(query) for a in fuzzed.agent_ids))


def test_random_bytes_to_every_coordinator_rpc(fuzzed: Fuzzed) -> None:
    local = fuzzed.local
    assert local.credentials is not None
    tokens = {
        "none": "",
        "fuzzer": fuzzed.fuzzer_token,
        "admin": local.admin_token,
        "join": local.credentials.join_token,
        "garbage": "gpt_0000_not-a-token",
    }
    sent = Sent()
    channel = grpc.insecure_channel(local.coordinator_address)

    @settings(FUZZ, max_examples=800)
    @given(
        path=st.sampled_from(sorted(COORDINATOR_METHODS)),
        who=st.sampled_from(sorted(tokens)),
        data=st.binary(),
    )
    def send(path: str, who: str, data: bytes) -> None:
        if who == "admin" and path in ADMIN_PATHS:
            try:  # bytes that parse as a request naming a real agent would really drain it
                parsed = request_class(path).FromString(data)
            except Exception:
                pass
            else:
                assume(not names_an_agent(fuzzed, getattr(parsed, "agent_id", "")))
        call = channel.unary_unary(path)
        sent.call(lambda: call(data, timeout=10, metadata=bearer_metadata(tokens[who])))

    try:
        send()
    finally:
        channel.close()
    assert sent.count >= 600, f"only {sent.count} messages sent"
    fuzzed.assert_whole(sent.count, "random bytes to the coordinator", sent.outcomes)


def test_random_fields_to_every_coordinator_rpc(fuzzed: Fuzzed) -> None:
    local = fuzzed.local
    assert local.credentials is not None
    sent = Sent()
    own = CoordinatorCalls(local.coordinator_address, fuzzed.fuzzer_token)
    sessions = [own.connect("fuzzer").session]
    channel = grpc.insecure_channel(local.coordinator_address)
    safe_text = st.text(max_size=24).map(lambda text: "zz" + text)  # never an agent id (hex) or name

    def overrides(who: str, path: str) -> dict[str, st.SearchStrategy[Any]]:
        admin_acts = who == "admin"
        session = st.sampled_from(sessions[-1:] + ([] if admin_acts else [fuzzed.bystander.session]))
        agent = st.sampled_from(fuzzed.agent_ids) | st.text(max_size=24)
        return {
            "session": session | st.text(max_size=24),
            "job_id": st.sampled_from(sessions[-1:]) | st.text(max_size=24),
            "agent_id": safe_text if admin_acts and path in ADMIN_PATHS else agent,
            "agent_ids": agent,  # repeated fields: the strategy of one element
            "exclude_agents": agent,
            "dtype": dtype_names(8),
            "shape": st.integers(-2, 4096) | st.integers(-(2**63), 2**63 - 1),
        }

    @settings(FUZZ, max_examples=1200)
    @given(
        path=st.sampled_from(sorted(COORDINATOR_METHODS)),
        who=st.sampled_from(["admin", "fuzzer", "fuzzer", "fuzzer", "join"]),
        data=st.data(),
    )
    def send(path: str, who: str, data: st.DataObject) -> None:
        token = {
            "admin": local.admin_token,
            "fuzzer": fuzzed.fuzzer_token,
            "join": local.credentials.join_token,
        }[who]
        request = data.draw(messages(request_class(path), overrides(who, path)))
        call = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString())
        sent.call(lambda: call(request, timeout=10, metadata=bearer_metadata(token)))
        if path.endswith(("/Disconnect", "/EndJob")):
            sessions.append(own.connect("fuzzer").session)  # the fuzzer may have ended its own
            sent.count += 1

    try:
        send()
    finally:
        channel.close()
        own.close()
    assert sent.count >= 1000, f"only {sent.count} messages sent"
    fuzzed.assert_whole(sent.count, "random fields to the coordinator", sent.outcomes)


# -- (a) the agents ------------------------------------------------------------------------------------------

AGENT_UNARY = ["/gpupool.v1.Agent/Execute", "/gpupool.v1.Agent/Free", "/gpupool.v1.Agent/Health"]
AGENT_SERVER_STREAMS = ["/gpupool.v1.Agent/Download", DOWNLOAD_RAW]
AGENT_CLIENT_STREAMS = ["/gpupool.v1.Agent/Upload", UPLOAD_RAW]


@dataclass
class AgentTargets:
    """Channels to both agents and the fuzzer's session's capabilities on them."""

    channels: list[grpc.Channel]
    capabilities: list[str]
    session: str

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@pytest.fixture(scope="module")
def agent_targets(fuzzed: Fuzzed) -> Iterator[AgentTargets]:
    with CoordinatorCalls(fuzzed.local.coordinator_address, fuzzed.fuzzer_token) as own:
        session = own.connect("fuzzer").session
        granted = own.grant(session, fuzzed.agent_ids)
        targets = AgentTargets(
            channels=[
                sync_channel(endpoint, ca_pem=fuzzed.ca, server_name=agent_dns_name(agent_id))
                for agent_id, endpoint in zip(fuzzed.agent_ids, fuzzed.endpoints, strict=True)
            ],
            capabilities=[granted[agent_id] for agent_id in fuzzed.agent_ids],
            session=session,
        )
        try:
            yield targets
        finally:
            free_fuzzer_buffers(targets)
            targets.close()
            own.call("Disconnect", coordinator_pb2.DisconnectRequest(session=session))


def capability_choice(targets: AgentTargets, agent: int, choice: str, garbage: str) -> str:
    return {
        "none": "",
        "own": targets.capabilities[agent],
        "other-agent": targets.capabilities[1 - agent],
        "garbage": garbage,
    }[choice]


def free_fuzzer_buffers(targets: AgentTargets) -> None:
    """Free what the fuzzer's session left on the agents. A session whose lease ran out while the module ran
    (it sends no heartbeat) has been ended, and its buffers freed, by the agents already."""
    for channel, capability in zip(targets.channels, targets.capabilities, strict=True):
        free = channel.unary_unary("/gpupool.v1.Agent/Free")
        try:
            free(
                agent_pb2.FreeRequest().SerializeToString(),
                timeout=10,
                metadata=((CAPABILITY_KEY, capability),),
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED or "has ended" not in str(exc.details()):
                raise


def test_random_bytes_to_every_agent_rpc(fuzzed: Fuzzed, agent_targets: AgentTargets) -> None:
    sent = Sent()

    @settings(FUZZ, max_examples=800)
    @given(
        agent=st.integers(0, 1),
        path=st.sampled_from(AGENT_UNARY + AGENT_SERVER_STREAMS + AGENT_CLIENT_STREAMS),
        capability=st.sampled_from(["none", "own", "own", "other-agent", "garbage"]),
        garbage=ascii_tokens,
        frames=st.lists(st.binary(max_size=256), min_size=1, max_size=4),
    )
    def send(agent: int, path: str, capability: str, garbage: str, frames: list[bytes]) -> None:
        channel = agent_targets.channels[agent]
        meta = metadata((CAPABILITY_KEY, capability_choice(agent_targets, agent, capability, garbage)))
        if path in AGENT_UNARY:
            unary = channel.unary_unary(path)
            sent.call(lambda: unary(frames[0], timeout=10, metadata=meta))
        elif path in AGENT_SERVER_STREAMS:
            server_stream = channel.unary_stream(path)
            sent.call(lambda: server_stream(frames[0], timeout=10, metadata=meta))
        else:
            client_stream = channel.stream_unary(path)
            sent.call(lambda: client_stream(iter(frames), timeout=10, metadata=meta))

    try:
        send()
    finally:
        free_fuzzer_buffers(agent_targets)
    assert sent.count >= 600, f"only {sent.count} messages sent"
    fuzzed.assert_whole(sent.count, "random bytes to the agents", sent.outcomes)


def array_metas() -> st.SearchStrategy[agent_pb2.ArrayMeta]:
    shapes = st.lists(st.integers(-2, 12) | st.integers(-(2**63), 2**63 - 1), max_size=4)
    return st.builds(
        lambda d, s: agent_pb2.ArrayMeta(dtype=d, shape=s),
        dtype_names(6),
        shapes,
    )


def buffer_names(session: str) -> st.SearchStrategy[str]:
    # Any text: ids gRPC metadata cannot carry are percent-encoded in refusals (see
    # test_a_refusal_naming_an_odd_buffer_id_keeps_its_status_code).
    return st.sampled_from(["a", "b", "out", "out2", "", f"{session}/a", "../a"]) | st.text(max_size=12)


def mostly(common: list[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of ``common`` (repeats weigh more), or now and then a draw from ``rare``."""
    return st.sampled_from([*((True, value) for value in common), (False, None)]).flatmap(
        lambda pick: st.just(pick[1]) if pick[0] else rare
    )


def owners(sessions: list[str]) -> st.SearchStrategy[str]:
    """A request's session field: mostly empty (the capability's), else the caller's, another's, noise."""
    return mostly(["", "", "", "", "", "", *sessions], st.text(max_size=8))


def workers() -> st.SearchStrategy[int]:
    return mostly([0, 0, 0, 0, 0, 0, 0, 0, 1], st.integers(0, 2**32 - 1))


def expectations() -> st.SearchStrategy[agent_pb2.ArrayMeta]:
    """What an op declares it makes: often what ops on "a" and "b" (8x4) do make, else anything."""
    likely = [
        agent_pb2.ArrayMeta(dtype=d, shape=s) for d in ("float32", "float64", "bool") for s in ([8, 4], [])
    ]
    return st.sampled_from(likely) | array_metas()


def constants() -> st.SearchStrategy[agent_pb2.Constant]:
    """Inline constants: consistent ones (small real arrays), and ones whose data and meta disagree."""
    consistent = st.builds(
        lambda dtype, shape, seed: np.random.default_rng(seed).integers(-5, 5, size=shape).astype(dtype),
        st.sampled_from(["bool", "int32", "int64", "float32", "float64"]),
        st.lists(st.integers(0, 4), max_size=3).map(tuple),
        st.integers(0, 1000),
    ).map(
        lambda a: agent_pb2.Constant(
            meta=agent_pb2.ArrayMeta(dtype=str(a.dtype), shape=list(a.shape)), data=a.tobytes()
        )
    )
    inconsistent = st.builds(
        lambda meta, data: agent_pb2.Constant(meta=meta, data=data), array_metas(), st.binary(max_size=64)
    )
    return consistent | inconsistent


def operands(session: str) -> st.SearchStrategy[agent_pb2.Operand]:
    scalars = st.one_of(
        st.floats().map(lambda f: agent_pb2.Scalar(f=f)),
        st.integers(-(2**63), 2**63 - 1).map(lambda i: agent_pb2.Scalar(i=i)),
        st.booleans().map(lambda b: agent_pb2.Scalar(b=b)),
        st.just(agent_pb2.Scalar()),
    )
    scalars = st.builds(lambda s, d: (s.__setattr__("dtype", d), s)[1], scalars, st.sampled_from(DTYPES))
    return st.one_of(
        buffer_names(session).map(lambda b: agent_pb2.Operand(buffer=b)),
        scalars.map(lambda s: agent_pb2.Operand(scalar=s)),
        constants().map(lambda c: agent_pb2.Operand(constant=c)),
        st.just(agent_pb2.Operand()),
    )


def programs(session: str, sessions: list[str]) -> st.SearchStrategy[agent_pb2.ExecuteRequest]:
    ops = st.builds(
        lambda name, inputs, output, expect, axis: agent_pb2.Op(
            op=name,
            inputs=inputs,
            output=output,
            expect=expect,
            has_axis=axis is not None,
            axis=axis or 0,
        ),
        st.sampled_from(sorted(OPS)) | st.text(max_size=8),
        st.lists(operands(session), max_size=3),
        buffer_names(session),
        expectations(),
        st.none() | st.integers(-3, 3) | st.integers(-(2**31), 2**31 - 1),
    )
    return st.builds(
        lambda worker, ops, fetch, free, owner: agent_pb2.ExecuteRequest(
            worker=worker, ops=ops, fetch=fetch, free=free, session=owner
        ),
        workers(),
        st.lists(ops, min_size=1, max_size=4) | st.lists(ops, max_size=4),
        st.lists(buffer_names(session), max_size=3),
        st.lists(buffer_names(session), max_size=2),
        owners(sessions),
    )


def uploads(
    session: str, sessions: list[str]
) -> st.SearchStrategy[tuple[agent_pb2.UploadHeader, list[bytes]]]:
    def chunks_for(meta: agent_pb2.ArrayMeta) -> st.SearchStrategy[list[bytes]]:
        itemsize = {"bool": 1, "int32": 4, "int64": 8, "float32": 4, "float64": 8}.get(meta.dtype, 0)
        nbytes = math.prod(meta.shape) * itemsize if all(n >= 0 for n in meta.shape) else -1
        exact = [st.just([b"\x01" * nbytes])] if 0 <= nbytes <= 4096 else []
        return st.one_of(*exact, st.lists(st.binary(max_size=512), max_size=3))

    headers = st.builds(
        lambda buffer_id, worker, meta, owner: agent_pb2.UploadHeader(
            buffer_id=buffer_id, worker=worker, meta=meta, session=owner
        ),
        buffer_names(session),
        workers(),
        array_metas(),
        owners(sessions),
    )
    return headers.flatmap(lambda header: st.tuples(st.just(header), chunks_for(header.meta)))


def test_semi_valid_messages_to_every_agent_rpc(fuzzed: Fuzzed, agent_targets: AgentTargets) -> None:
    sent = Sent()
    session = agent_targets.session
    sessions = [session, fuzzed.bystander.session]
    rows = np.arange(32, dtype=np.float32).reshape(8, 4)
    for channel, capability in zip(agent_targets.channels, agent_targets.capabilities, strict=True):
        for name, array in (("a", rows), ("b", rows.astype(np.float64))):  # operands for the programs
            header = agent_pb2.UploadHeader(
                buffer_id=name, meta=agent_pb2.ArrayMeta(dtype=str(array.dtype), shape=[8, 4])
            )
            upload = channel.stream_unary(UPLOAD_RAW)
            upload(
                iter([header.SerializeToString(), array.tobytes()]),
                timeout=10,
                metadata=((CAPABILITY_KEY, capability),),
            )

    @settings(FUZZ, max_examples=1200)
    @given(
        agent=st.integers(0, 1),
        capability=st.sampled_from(["own"] * 8 + ["none", "other-agent"]),
        method=st.sampled_from(
            ["Execute", "Execute", "Execute", "Upload", "UploadRaw", "Download", "DownloadRaw", "Free"]
        ),
        data=st.data(),
    )
    def send(agent: int, capability: str, method: str, data: st.DataObject) -> None:
        channel = agent_targets.channels[agent]
        meta = metadata((CAPABILITY_KEY, capability_choice(agent_targets, agent, capability, "")))
        path = f"/gpupool.v1.Agent/{method}"
        if method == "Execute":
            request = data.draw(programs(session, sessions)).SerializeToString()
            execute = channel.unary_unary(path)
            sent.call(lambda: execute(request, timeout=10, metadata=meta))
        elif method == "Free":
            request = data.draw(
                st.builds(
                    lambda ids, owner: agent_pb2.FreeRequest(buffer_ids=ids, session=owner),
                    st.lists(buffer_names(session), max_size=3),
                    owners(sessions),
                )
            ).SerializeToString()
            free = channel.unary_unary(path)
            sent.call(lambda: free(request, timeout=10, metadata=meta))
        elif method in ("Download", "DownloadRaw"):
            request = data.draw(
                st.builds(
                    lambda buffer_id, chunk: agent_pb2.DownloadRequest(
                        buffer_id=buffer_id, chunk_bytes=chunk
                    ),
                    buffer_names(session),
                    st.integers(0, 2**32 - 1),
                )
            ).SerializeToString()
            download = channel.unary_stream(DOWNLOAD_RAW if method == "DownloadRaw" else path)
            sent.call(lambda: download(request, timeout=10, metadata=meta))
        else:
            header, chunks = data.draw(uploads(session, sessions))
            if method == "UploadRaw":
                frames = [header.SerializeToString(), *chunks]
                upload = channel.stream_unary(UPLOAD_RAW)
            else:
                frames = [agent_pb2.UploadRequest(header=header).SerializeToString()]
                frames += [agent_pb2.UploadRequest(chunk=c).SerializeToString() for c in chunks]
                upload = channel.stream_unary(path)
            sent.call(lambda: upload(iter(frames), timeout=10, metadata=meta))

    try:
        send()
    finally:
        free_fuzzer_buffers(agent_targets)
    assert sent.count >= 1000, f"only {sent.count} messages sent"
    assert sent.outcomes["OK"] >= 50, f"too few messages got through to be a test: {dict(sent.outcomes)}"
    fuzzed.assert_whole(sent.count, "semi-valid messages to the agents", sent.outcomes)


@pytest.mark.parametrize("buffer_id", ["caf\u00e9", "line\nbreak"])
def test_a_refusal_naming_an_odd_buffer_id_keeps_its_status_code(
    fuzzed: Fuzzed, agent_targets: AgentTargets, buffer_id: str
) -> None:
    download = agent_targets.channels[0].unary_stream(DOWNLOAD_RAW)
    request = agent_pb2.DownloadRequest(buffer_id=buffer_id).SerializeToString()
    capability = ((CAPABILITY_KEY, agent_targets.capabilities[0]),)
    refusal = refused_now(lambda: list(download(request, timeout=10, metadata=capability)))
    assert (refusal.code, refusal.kind) == (grpc.StatusCode.NOT_FOUND, "buffer-not-found"), refusal


@pytest.mark.parametrize("dtype", ["01", "(9999999999,9999999999)f8"])
@pytest.mark.parametrize("where", ["agent", "coordinator"])
def test_a_dtype_name_numpy_cannot_parse_is_refused_as_a_bad_request(
    fuzzed: Fuzzed, agent_targets: AgentTargets, dtype: str, where: str
) -> None:
    meta = agent_pb2.ArrayMeta(dtype=dtype, shape=[4])
    with CoordinatorCalls(fuzzed.local.coordinator_address, fuzzed.fuzzer_token) as owner:
        if where == "agent":
            header = agent_pb2.UploadHeader(buffer_id="odd", meta=meta).SerializeToString()
            upload = agent_targets.channels[0].stream_unary(UPLOAD_RAW)
            capability = ((CAPABILITY_KEY, agent_targets.capabilities[0]),)
            refusal = refused_now(lambda: upload(iter([header]), timeout=10, metadata=capability))
        else:
            session = owner.connect("fuzzer").session
            refusal = owner.refusal("Place", coordinator_pb2.PlaceRequest(session=session, meta=meta))
    assert (refusal.code, refusal.kind) == (grpc.StatusCode.INVALID_ARGUMENT, "bad-request"), refusal


# -- (b) every subscribed topic ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
STATUS_KEYS = ["schemaVersion", "agentId", "state", "endpoint", "workers", "signature", "updated", "started"]
STATUS_KEYS += ["certificateFingerprint", "time", "kind", "session", "commandId", "memoryUsed", "index"]


def payloads(agent_ids: list[str]) -> st.SearchStrategy[bytes]:
    def encoded(cls: type[Message]) -> st.SearchStrategy[bytes]:
        return messages(cls, {"agent_id": st.sampled_from(agent_ids) | st.text(max_size=16)}).map(encode_json)

    return st.one_of(
        st.binary(max_size=512),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.dictionaries(st.sampled_from(STATUS_KEYS), json_values, max_size=6).map(
            lambda d: json.dumps(d).encode()
        ),
        encoded(control_pb2.AgentStatus),
        encoded(control_pb2.AgentTelemetry),
        encoded(control_pb2.AgentCommand),
    )


#: Agent ids for topics: any text a topic level may hold (Mosquitto disconnects a client that publishes
#: on a topic with wildcards, control characters or non-characters, as MQTT allows it to).
topic_ids = st.text(
    alphabet=st.characters(blacklist_characters="/+#", blacklist_categories=("Cs", "Cc", "Cn")),
    min_size=1,
    max_size=20,
)


def test_random_payloads_on_every_subscribed_topic(fuzzed: Fuzzed) -> None:
    local = fuzzed.local
    topics = Topics(local.topic_prefix)
    batch: list[tuple[str, bytes, bool]] = []

    @settings(FUZZ, max_examples=1500)
    @given(
        agent=st.sampled_from(fuzzed.agent_ids) | topic_ids,
        channel=st.sampled_from(["status", "telemetry", "commands"]),
        data=st.data(),
    )
    def collect(agent: str, channel: str, data: st.DataObject) -> None:
        payload = data.draw(payloads(fuzzed.agent_ids))
        batch.append((f"{topics.root}/{agent}/{channel}", payload, False))

    collect()
    commands = Counter(topic for topic, _, _ in batch if topic.endswith("/commands"))

    async def publish() -> None:
        async with mqtt(local.broker_url) as client:
            await publish_then_sync(client, topics.root, fuzzed.log, batch, within=30)

    run(publish(), timeout=60)
    # Every command an agent got was refused (none of them carries the coordinator's signature), and
    # said so in its log, one line per kind of refusal a minute: a flood does not bury the log.
    for agent_id in fuzzed.agent_ids:
        topic = topics.commands(agent_id)
        deadline = time.monotonic() + 15
        while not (ignored := fuzzed.log.matching("gpupool-agent", f"ignoring a command on {topic}:")):
            assert time.monotonic() < deadline, f"agent {agent_id} logged none of {commands[topic]} commands"
            time.sleep(0.05)
        assert 1 <= len(ignored) <= commands[topic]
    dropped = len(fuzzed.log.matching(" coordinator ", "dropped a payload for agent"))
    print(
        f"{len(batch)} payloads: {sum(commands.values())} commands; "
        f"{dropped} drop lines in the coordinator's log"
    )
    assert len(batch) >= 1200, f"only {len(batch)} messages sent"
    fuzzed.assert_whole(len(batch), "random payloads on the topics")
