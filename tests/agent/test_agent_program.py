"""Programs (Execute) on the NumPy backend, without a network: order, fetch, free, all-or-nothing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.program import FETCH_LIMIT, ProgramCancelled, run_program
from gpupool.protocol.errors import RpcRefusal

from .agent_helpers import buffer, constant, fetched_array, op, scalar

X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
W = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)


def registry_with(limit: int = 1 << 20, **arrays: np.ndarray) -> BufferRegistry:
    registry = BufferRegistry([limit])
    for buffer_id, array in arrays.items():
        registry.commit(
            registry.reserve(worker=0, buffer_id=buffer_id, nbytes=array.nbytes, session="s"), array
        )
    return registry


def execute(
    registry: BufferRegistry,
    *ops: agent_pb2.Op,
    fetch: tuple[str, ...] = (),
    free: tuple[str, ...] = (),
    cancelled: threading.Event | None = None,
) -> agent_pb2.ExecuteReply:
    request = agent_pb2.ExecuteRequest(worker=0, ops=ops, fetch=fetch, free=free, session="s")
    return run_program(request, backend=NumpyBackend(), registry=registry, cancelled=cancelled)


def refusal_kind(registry: BufferRegistry, *ops: agent_pb2.Op, fetch: tuple[str, ...] = ()) -> str:
    with pytest.raises(RpcRefusal) as caught:
        execute(registry, *ops, fetch=fetch)
    return caught.value.kind


def test_a_chain_runs_in_order_and_fetches() -> None:
    registry = registry_with(x=X, w=W)
    reply = execute(
        registry,
        op("matmul", [buffer("x"), buffer("w")], "xw", "float32", (4, 2)),
        op("tanh", [buffer("xw")], "t", "float32", (4, 2)),
        op("multiply", [buffer("t"), scalar(2.0)], "y", "float32", (4, 2)),
        op("add", [buffer("y"), constant(np.array([1.0, -1.0], np.float32))], "z", "float32", (4, 2)),
        op("sum", [buffer("z")], "total", "float64", ()),
        fetch=("z", "total"),
        free=("xw", "t", "y"),
    )
    want = np.tanh(X @ W) * 2 + np.array([1.0, -1.0], np.float32)
    got = {item.buffer_id: fetched_array(item) for item in reply.fetched}
    np.testing.assert_allclose(got["z"], want, rtol=1e-6)
    np.testing.assert_allclose(got["total"], want.sum(dtype=np.float64), rtol=1e-5)
    assert {"x", "w", "z", "total"} == {
        b for b in ("x", "w", "xw", "t", "y", "z", "total") if registry.contains(b)
    }
    assert reply.memory_used == registry.usage(0).used == X.nbytes + W.nbytes + want.nbytes + 8


def test_free_after_fetch_releases_existing_buffers() -> None:
    registry = registry_with(x=X)
    reply = execute(
        registry, op("negative", [buffer("x")], "n", "float32", (4, 3)), fetch=("x",), free=("x", "n")
    )
    np.testing.assert_array_equal(fetched_array(reply.fetched[0]), X)
    assert len(registry) == 0
    assert reply.memory_used == 0


def test_a_failing_program_keeps_nothing() -> None:
    registry = registry_with(x=X)
    before = registry.usage(0)
    kind = refusal_kind(
        registry,
        op("exp", [buffer("x")], "e", "float32", (4, 3)),
        op("add", [buffer("e"), constant(np.ones(5, np.float32))], "bad", "float32", (4, 3)),
    )
    assert kind == "kernel-failed"
    assert not registry.contains("e")
    assert registry.usage(0) == before
    execute(registry, op("exp", [buffer("x")], "e", "float32", (4, 3)))  # the ids are free again
    assert registry.contains("e")


def test_refusals() -> None:
    registry = registry_with(limit=X.nbytes * 2, x=X)
    assert (
        refusal_kind(registry, op("add", [buffer("x"), buffer("x")], "o", "float32", (3, 4))) == "bad-request"
    )
    assert refusal_kind(registry, op("add", [buffer("x"), buffer("gone")], "o", "float32", (4, 3))) == (
        "buffer-not-found"
    )
    assert refusal_kind(registry, op("negative", [buffer("x")], "x", "float32", (4, 3))) == "buffer-exists"
    assert (
        refusal_kind(
            registry,
            op("negative", [buffer("x")], "o", "float32", (4, 3)),
            op("negative", [buffer("x")], "o", "float32", (4, 3)),
        )
        == "buffer-exists"
    )
    assert refusal_kind(registry, op("negative", [buffer("x")], "o", "float64", (4, 3))) == "out-of-memory"
    assert refusal_kind(registry, op("fork", [buffer("x")], "o", "float32", (4, 3))) == "bad-request"
    assert refusal_kind(registry, op("add", [buffer("x")], "o", "float32", (4, 3))) == "bad-request"
    assert (
        refusal_kind(registry, op("negative", [agent_pb2.Operand()], "o", "float32", (4, 3))) == "bad-request"
    )
    assert refusal_kind(registry, fetch=("nothing",)) == "buffer-not-found"
    assert len(registry) == 1
    assert registry.usage(0).reserved == 0


def test_fetch_over_the_inline_limit_is_refused_before_running() -> None:
    registry = registry_with(limit=1 << 30)
    big = op("astype", [constant(np.zeros(1, np.float64))], "o", "float64", (1,))
    big.expect.shape[:] = [FETCH_LIMIT // 8 + 1]
    assert refusal_kind(registry, big, fetch=("o",)) == "bad-request"


def test_another_workers_buffer_is_not_found() -> None:
    registry = BufferRegistry([1 << 20, 1 << 20])
    registry.commit(registry.reserve(worker=1, buffer_id="x", nbytes=X.nbytes, session=""), X)
    with pytest.raises(RpcRefusal) as caught:
        execute(registry, op("negative", [buffer("x")], "n", "float32", (4, 3)))
    assert caught.value.kind == "buffer-not-found"


def test_a_cancelled_program_commits_nothing() -> None:
    registry = registry_with(x=X)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(ProgramCancelled):
        execute(registry, op("negative", [buffer("x")], "n", "float32", (4, 3)), cancelled=cancelled)
    assert not registry.contains("n")
    assert registry.usage(0).reserved == 0
