"""Signed control-plane messages, checked after the JSON round trip they make over MQTT."""

from __future__ import annotations

import math

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import (
    AgentCommand,
    AgentStatus,
    AgentTelemetry,
    GpuInfo,
    Worker,
    WorkerTelemetry,
)
from gpupool.protocol.codec import SCHEMA_VERSION, decode_json, encode_json
from gpupool.security.signing import SignedMessage, sign_message, verify_message

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def status() -> AgentStatus:
    gpu = GpuInfo(
        index=1,
        uuid="GPU-1234",
        model="GeForce GTX 1060 6GB",
        memory_total=6 << 30,
        memory_free=(6 << 30) - 123,
        compute_capability="6.1",
        pcie_generation=3,
        pcie_width=1,
        pcie_max_generation=3,
        pcie_max_width=16,
        driver_version="550.54",
    )
    return AgentStatus(
        agent_id="a1b2c3d4e5f6",
        name="rig-ünïcode ☃",
        version="0.1.0",
        endpoint="10.0.0.7:50052",
        state=control_pb2.AGENT_STATE_READY,
        backend="cupy",
        workers=[
            Worker(index=0, backend="cupy", gpu=gpu, memory_limit=5 << 30, memory_used=2**40 + 7, buffers=3),
            Worker(index=1, backend="numpy", memory_limit=1, memory_used=0, buffers=0),
        ],
        hostname="rig",
        updated=stamp(1_700_000_000, 123_456_789),
        note="NumPy on worker 1: no driver",
        started=stamp(1_699_999_000),
        certificate_fingerprint="ab" * 32,
    )


def telemetry() -> AgentTelemetry:
    return AgentTelemetry(
        agent_id="a1b2c3d4e5f6",
        time=stamp(1_700_000_001, 1),
        workers=[
            WorkerTelemetry(
                index=0,
                memory_used=1 << 33,
                memory_limit=1 << 34,
                buffers=5,
                gpu_memory_free=2**64 - 1,
                utilization_percent=87.5,
                temperature_c=61.3,
                power_w=0.1,
            ),
            WorkerTelemetry(index=1, utilization_percent=-0.0, temperature_c=1e-40, power_w=3.4e38),
        ],
        ops_executed=2**63,
        bytes_received=12,
        bytes_sent=0,
    )


def command() -> AgentCommand:
    return AgentCommand(
        command_id="cmd-1",
        kind=control_pb2.COMMAND_KIND_END_SESSION,
        reason="lease expired",
        issued=stamp(1_700_000_002, 999_999_999),
        session="job-abc",
        agent_id="a1b2c3d4e5f6",
    )


MESSAGES = [status, telemetry, command]


def round_trip(message: SignedMessage) -> SignedMessage:
    return decode_json(encode_json(message), type(message), what=type(message).__name__)


@pytest.mark.parametrize("make", MESSAGES)
def test_a_signature_survives_the_json_round_trip(make):
    message = make()
    sign_message(message, KEY)
    assert message.signature
    assert verify_message(message, KEY.public_key())
    received = round_trip(message)
    assert received == message
    assert verify_message(received, KEY.public_key())


@pytest.mark.parametrize("make", MESSAGES)
def test_signing_sets_the_schema_version_that_encode_json_would(make):
    message = make()
    assert message.schema_version == 0
    sign_message(message, KEY)
    assert message.schema_version == SCHEMA_VERSION
    encode_json(message)
    assert verify_message(message, KEY.public_key())


@pytest.mark.parametrize("make", MESSAGES)
def test_another_key_an_empty_or_a_garbage_signature_fails(make):
    message = make()
    assert not verify_message(message, KEY.public_key())  # never signed
    sign_message(message, KEY)
    assert not verify_message(message, OTHER_KEY.public_key())
    message.signature = b"\x30\x00"
    assert not verify_message(message, KEY.public_key())


@pytest.mark.parametrize("make", MESSAGES)
def test_signing_twice_replaces_the_signature(make):
    message = make()
    sign_message(message, OTHER_KEY)
    sign_message(message, KEY)
    assert verify_message(message, KEY.public_key())


def test_changing_any_field_breaks_the_signature():
    message = status()
    sign_message(message, KEY)
    changes = [
        lambda m: setattr(m, "state", control_pb2.AGENT_STATE_DRAINING),
        lambda m: setattr(m, "endpoint", "10.0.0.8:50052"),
        lambda m: setattr(m.workers[0], "memory_used", 0),
        lambda m: setattr(m.workers[0].gpu, "memory_free", 1),
        lambda m: m.workers.add(index=2),
        lambda m: m.workers.pop(),
        lambda m: setattr(m.updated, "nanos", 0),
        lambda m: setattr(m, "certificate_fingerprint", ""),
    ]
    for change in changes:
        changed = AgentStatus()
        changed.CopyFrom(message)
        change(changed)
        assert not verify_message(changed, KEY.public_key())
    assert verify_message(message, KEY.public_key())


def test_verify_does_not_change_the_message():
    message = telemetry()
    sign_message(message, KEY)
    before = message.SerializeToString()
    verify_message(message, KEY.public_key())
    assert message.SerializeToString() == before


def test_verify_never_raises_on_odd_input():
    assert not verify_message(control_pb2.GpuInfo(), KEY.public_key())  # type: ignore[arg-type]
    assert not verify_message(None, KEY.public_key())  # type: ignore[arg-type]
    signed = command()
    sign_message(signed, KEY)
    assert not verify_message(signed, None)  # type: ignore[arg-type]


SIGNED_STATUS = status()
sign_message(SIGNED_STATUS, KEY)


@given(st.binary())
def test_any_other_signature_fails(signature):
    message = AgentStatus()
    message.CopyFrom(SIGNED_STATUS)
    message.signature = signature
    assert verify_message(message, KEY.public_key()) == (signature == SIGNED_STATUS.signature)


@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_any_flipped_signature_bit_fails(position, bit):
    signature = bytearray(SIGNED_STATUS.signature)
    signature[position % len(signature)] ^= 1 << bit
    message = AgentStatus()
    message.CopyFrom(SIGNED_STATUS)
    message.signature = bytes(signature)
    assert not verify_message(message, KEY.public_key())


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
# Not up to FLT_MAX itself: protobuf's JSON printer writes it as 3.4028235e+38, which its parser then
# refuses as too large for a float (a codec limit, not a signing one; no reading comes near it).
float32 = st.floats(width=32, min_value=-(2.0**126), max_value=2.0**126) | st.sampled_from(
    [math.inf, -math.inf]
)
timestamps = st.builds(
    Timestamp,
    seconds=st.integers(min_value=-62135596800, max_value=253402300799),
    nanos=st.integers(min_value=0, max_value=999_999_999),
)
gpus = st.builds(GpuInfo, index=uint32, uuid=text, model=text, memory_total=uint64, memory_free=uint64)
workers = st.builds(
    Worker,
    index=uint32,
    backend=text,
    gpu=st.none() | gpus,
    memory_limit=uint64,
    memory_used=uint64,
    buffers=uint32,
)
statuses = st.builds(
    AgentStatus,
    agent_id=text,
    name=text,
    endpoint=text,
    state=st.sampled_from(list(control_pb2.AgentState.values())),
    workers=st.lists(workers, max_size=3),
    updated=st.none() | timestamps,
    note=text,
    certificate_fingerprint=text,
)
telemetries = st.builds(
    AgentTelemetry,
    agent_id=text,
    time=st.none() | timestamps,
    workers=st.lists(
        st.builds(
            WorkerTelemetry,
            index=uint32,
            memory_used=uint64,
            gpu_memory_free=uint64,
            utilization_percent=float32,
            temperature_c=float32,
            power_w=float32,
        ),
        max_size=3,
    ),
    ops_executed=uint64,
)
commands = st.builds(
    AgentCommand,
    command_id=text,
    kind=st.sampled_from(list(control_pb2.CommandKind.values())),
    reason=text,
    issued=st.none() | timestamps,
    session=text,
    agent_id=text,
)


@given(statuses | telemetries | commands)
def test_any_message_verifies_after_the_json_round_trip(message):
    sign_message(message, KEY)
    received = round_trip(message)
    assert verify_message(received, KEY.public_key())
    assert not verify_message(received, OTHER_KEY.public_key())


def test_a_nan_reading_survives_the_json_round_trip():
    message = telemetry()
    message.workers[0].temperature_c = math.nan
    sign_message(message, KEY)
    assert verify_message(round_trip(message), KEY.public_key())
