"""Bad input gets a precise exception on the client, and the pool keeps serving everyone else."""

from __future__ import annotations

import time

import numpy as np
import pytest

import gpupool as gp
from gpupool.local import LocalPool

from .conftest import AGENT_MEMORY


def still_serving(pool: gp.Pool) -> None:
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    x = pool.asarray(a)
    np.testing.assert_array_equal((x + 1).get(), a + 1)


def test_mismatched_shapes_are_refused_before_sending(pool: gp.Pool) -> None:
    x = pool.asarray(np.ones((10, 4), np.float32))
    with pytest.raises(gp.ShapeMismatch, match=r"\(10, 4\), \(3,\)"):
        x + np.ones(3, np.float32)
    with pytest.raises(gp.ShapeMismatch):
        x + pool.asarray(np.ones((9, 4), np.float32))
    with pytest.raises(gp.ShapeMismatch, match="matmul"):
        x @ np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="do not broadcast"):  # a ValueError, as NumPy users expect
        x - np.ones((2, 4), np.float32)
    still_serving(pool)


@pytest.mark.parametrize("dtype", ["float128", "complex256", "object"])
def test_unsupported_dtypes_are_refused(pool: gp.Pool, dtype: str) -> None:
    host = np.ones((4, 4), dtype=dtype)
    with pytest.raises(gp.UnsupportedDType, match=np.dtype(dtype).name) as info:
        pool.asarray(host)
    assert isinstance(info.value, TypeError)
    x = pool.asarray(np.ones((4, 4), np.float32))
    with pytest.raises(gp.UnsupportedDType):
        x + host
    still_serving(pool)


def test_an_array_larger_than_the_pool_gets_no_capacity(pool: gp.Pool) -> None:
    host = np.zeros((3 * AGENT_MEMORY // 8 // 1024, 1024), np.float64)  # 1.5x what both agents may hold
    with pytest.raises(gp.NoCapacity) as info:
        pool.asarray(host)
    assert info.value.needed == host.nbytes
    still_serving(pool)


def test_a_result_over_the_memory_limit_is_refused_and_nothing_is_lost(pool: gp.Pool) -> None:
    rows = int(AGENT_MEMORY * 0.15) // (8 * 256)  # x takes ~15% of each agent's limit
    a = np.random.default_rng(0).standard_normal((rows * 2, 256))
    x = pool.asarray(a)
    kept = list(gp.persist(*(x + i for i in range(3))))  # ~60% of each agent's limit in use

    def fill_up() -> None:
        for _ in range(6):
            kept.append((x * 2).persist())

    with pytest.raises(gp.DeviceOutOfMemory) as info:
        fill_up()
    assert info.value.agent_id in {s.agent_id for s in x.shards}
    np.testing.assert_array_equal(x.get(), a)  # the operands are intact
    np.testing.assert_allclose(kept[1].get(), a + 1)
    kept.clear()
    still_serving(pool)


def test_an_upload_over_the_agent_limit_is_refused_with_out_of_memory(pool: gp.Pool) -> None:
    agent = next(a for a in pool.agents() if a.state == "ready")
    host = np.zeros(AGENT_MEMORY // 8 + 1024, np.float64)

    session = pool._session  # the plumbing: the raw channel to one agent, with this session's capability

    async def upload() -> None:
        await session.grant([agent.id])  # the capability this session needs on that agent
        await session.channel(agent.id, agent.endpoint).upload(session.new_buffer_id(), 0, host, session.id)

    with pytest.raises(gp.DeviceOutOfMemory, match=agent.id):
        session.run(upload(), timeout=30, what="upload")
    still_serving(pool)


def test_a_freed_array_cannot_be_used(pool: gp.Pool) -> None:
    x = pool.asarray(np.ones((6, 2), np.float32))
    x.free()
    with pytest.raises(gp.ArrayFreed):
        x + 1
    with pytest.raises(gp.ArrayFreed):
        x.get()
    x.free()  # idempotent


def test_a_call_for_a_buffer_the_agent_freed_raises_buffer_not_found(pool: gp.Pool) -> None:
    a = np.arange(20, dtype=np.int64).reshape(10, 2)
    x = pool.asarray(a)
    other = pool.asarray(a * 7)
    session = pool._session
    session.run(session.free_now(x.pieces), timeout=10, what="free")  # gone on the agents, not on the handle
    with pytest.raises(gp.BufferNotFound) as info:
        (x * 2).persist()
    assert info.value.buffer_id in {p.buffer_id for p in x.pieces}
    with pytest.raises(gp.BufferNotFound):
        x.get()
    np.testing.assert_array_equal(other.get(), a * 7)
    still_serving(pool)


def test_numpy_errors_are_raised_before_sending(pool: gp.Pool) -> None:
    x = pool.asarray(np.arange(1, 9, dtype=np.int64).reshape(4, 2))
    with pytest.raises(ValueError, match="negative"):
        x**-1
    still_serving(pool)


def test_a_program_the_agent_rejects_is_a_remote_kernel_error(pool: gp.Pool) -> None:
    from gpupool._proto.v1 import agent_pb2

    x = pool.asarray(np.ones((8, 2), np.float32))
    piece = x.pieces[0]
    bad = agent_pb2.Op(
        op="no_such_op",
        inputs=[agent_pb2.Operand(buffer=piece.buffer_id)],
        output="junk",
        expect=agent_pb2.ArrayMeta(dtype="float32", shape=[piece.stop - piece.start, 2]),
    )

    session = pool._session

    async def send() -> object:
        return await session.channel(piece.agent_id, piece.endpoint).execute(
            piece.worker, [bad], session=session.id
        )

    with pytest.raises(gp.RemoteKernelError, match="no_such_op") as info:
        session.run(send(), timeout=10, what="execute")
    assert info.value.agent_id == piece.agent_id
    np.testing.assert_array_equal(x.get(), np.ones((8, 2), np.float32))
    still_serving(pool)


def test_closing_one_session_leaves_another_sessions_data_alone(local_pool: LocalPool) -> None:
    a = np.arange(60, dtype=np.float64).reshape(20, 3)
    with local_pool.connect() as mine:
        x = mine.asarray(a)
        with local_pool.connect() as theirs:
            theirs.asarray(a * 2)
        np.testing.assert_array_equal(x.get(), a)
    with pytest.raises(gp.ArrayFreed):
        x.get()


def test_no_coordinator_is_a_connect_error_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(gp.ConnectError, match=r"127\.0\.0\.1:9"):
        gp.connect("127.0.0.1:9", token="gpt_00000000_x", timeouts=gp.Timeouts(connect=60.0))
    elapsed = time.monotonic() - started
    print(f"a refused port failed gp.connect in {elapsed * 1000:.0f} ms")
    assert elapsed < 30.0  # not the 60 s connect deadline: a refused port is not waited on
