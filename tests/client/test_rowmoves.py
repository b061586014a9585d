"""Operations across the sharded axis with rows moved agent to agent, on a real pool of three enrolled agents
(TLS, capabilities): reshape, transpose/swapaxes, concatenate, sort/argsort along axis 0, ``xs @ ys.T`` and
``x.T @ y`` with a tree of agents, each against NumPy, on uneven and empty shards.

Warnings are errors here (pyproject), so a HostFallbackWarning fails a test: each of these runs on the pool.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

import gpupool as gp
from gpupool._errors import RemoteError
from gpupool.client import rowmoves
from gpupool.client.array import RemoteArray
from gpupool.client.layout import Piece
from gpupool.local import LocalPool

AGENT_MEMORY = 96 << 20


@pytest.fixture(scope="module")
def local3(system_broker_url: str) -> Iterator[LocalPool]:
    """Three secure agents (the default), NumPy backend."""
    with LocalPool(
        agents=3,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(AGENT_MEMORY),
        coordinator_args=["--min-shard-bytes", "0"],
    ) as local:
        yield local


@pytest.fixture(scope="module")
def pool(local3: LocalPool) -> Iterator[gp.Pool]:
    with local3.connect() as session:
        yield session


def remote(value: object) -> RemoteArray:
    assert isinstance(value, RemoteArray), f"expected a remote array, got {type(value).__name__}"
    return value


def agents_of(array: RemoteArray) -> set[str]:
    return {piece.agent_id for piece in array.layout}


# -- reshape -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [[5, 0, 7], [12], [1, 1, 10], [0, 12, 0]])
@pytest.mark.parametrize("new_shape", [(8, 9), (-1,), (36, 2), (2, 3, 12), (72, 1)])
def test_reshape_across_axis_0(pool: gp.Pool, rows: list[int], new_shape: tuple[int, ...]) -> None:
    data = np.arange(72, dtype=np.float64).reshape(12, 6) * 1.5
    x = pool.asarray(data, rows=rows)
    result = remote(np.reshape(x, new_shape))
    np.testing.assert_array_equal(result.get(), data.reshape(new_shape))
    np.testing.assert_array_equal(remote(x.reshape(new_shape)).get(), data.reshape(new_shape))


def test_reshape_of_a_pending_1d_array(pool: gp.Pool) -> None:
    data = np.arange(30, dtype=np.int64)
    x = pool.asarray(data, rows=[7, 0, 23])
    result = remote((x * 3 + 1).reshape(5, 6))
    np.testing.assert_array_equal(result.get(), (data * 3 + 1).reshape(5, 6))
    np.testing.assert_array_equal((result + 1).get(), (data * 3 + 1).reshape(5, 6) + 1)


# -- transpose and swapaxes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [[3, 0, 4], [7], [1, 6]])
def test_transpose_of_a_2d_array(pool: gp.Pool, rows: list[int]) -> None:
    data = np.arange(35, dtype=np.float32).reshape(7, 5)
    x = pool.asarray(data, rows=rows)
    np.testing.assert_array_equal(remote(np.transpose(x)).get(), data.T)
    np.testing.assert_array_equal(remote(x.T + 1).get(), data.T + 1)  # the view, used: made remote
    np.testing.assert_array_equal(x.T.get(), data.T)
    assert remote(x.T.sum(axis=1)).shape == (5,)


def test_transpose_and_swapaxes_of_a_3d_array(pool: gp.Pool) -> None:
    data = np.arange(4 * 3 * 2, dtype=np.int32).reshape(4, 3, 2)
    x = pool.asarray(data, rows=[1, 0, 3])
    for axes in [(1, 0, 2), (2, 1, 0), (1, 2, 0), None]:
        np.testing.assert_array_equal(remote(np.transpose(x, axes)).get(), np.transpose(data, axes))
    np.testing.assert_array_equal(remote(np.swapaxes(x, 0, 2)).get(), np.swapaxes(data, 0, 2))
    np.testing.assert_array_equal(remote(x.swapaxes(1, 0)).get(), data.swapaxes(1, 0))


# -- concatenate along axis 0 --------------------------------------------------------------------------------


def test_concatenate_arrays_laid_out_differently(pool: gp.Pool) -> None:
    a_data = np.arange(10, dtype=np.float32).reshape(5, 2)
    b_data = np.arange(14, dtype=np.float64).reshape(7, 2) - 3
    a = pool.asarray(a_data, rows=[2, 0, 3])
    b = pool.asarray(b_data)
    c = pool.asarray(np.ones((1, 2), np.float64), rows=[1])
    result = remote(np.concatenate([a, b, c]))
    expected = np.concatenate([a_data, b_data, np.ones((1, 2))])
    assert result.dtype == expected.dtype
    np.testing.assert_array_equal(result.get(), expected)
    np.testing.assert_array_equal(remote(result * 2).get(), expected * 2)
    single = remote(np.concatenate([a]))
    np.testing.assert_array_equal(single.get(), a_data)


def test_hstack_of_1d_arrays_and_an_empty_one(pool: gp.Pool) -> None:
    a = pool.asarray(np.arange(4.0), rows=[0, 4])
    b = pool.asarray(np.arange(3.0) + 10, rows=[1, 1, 1])
    empty = pool.asarray(np.zeros(0), rows=[0])
    np.testing.assert_array_equal(remote(np.hstack([a, empty, b])).get(), [0, 1, 2, 3, 10, 11, 12])


# -- sort and argsort along axis 0 ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [[4, 0, 6], [10], [1, 9]])
def test_sort_and_argsort_of_1d_arrays(pool: gp.Pool, rows: list[int]) -> None:
    data = np.random.default_rng(1).permutation(10).astype(np.float64) * 1.25
    x = pool.asarray(data, rows=rows)
    ordered = remote(np.sort(x))
    np.testing.assert_array_equal(ordered.get(), np.sort(data))
    assert [(p.agent_id, p.start, p.stop) for p in ordered.layout] == [
        (p.agent_id, p.start, p.stop) for p in x.layout
    ]
    np.testing.assert_array_equal(remote(np.argsort(x)).get(), np.argsort(data))
    np.testing.assert_array_equal(remote(x - np.sort(x)).get(), data - np.sort(data))


@pytest.mark.parametrize(
    "data",
    [
        np.array([3.0, np.nan, 1.0, 3.0, -np.inf, 2.0, 3.0, np.inf, np.nan, 0.0]),
        np.array([5, 5, 5, 5, 5, 5, 5, 5, 5, 5], dtype=np.int32),
        np.random.default_rng(7).integers(0, 50, 5000),
        np.array([True, False, True, False, False, True, True, False, True, False]),
    ],
    ids=["nan-inf-ties", "all-equal", "5000-ints", "bools"],
)
def test_sample_sort_with_ties_nan_and_uneven_shards(pool: gp.Pool, data: np.ndarray) -> None:
    n = len(data)
    x = pool.asarray(data, rows=[n // 3, 0, n - n // 3 - 1, 1])  # four shards over three agents
    np.testing.assert_array_equal(remote(np.sort(x)).get(), np.sort(data))
    np.testing.assert_array_equal(remote(np.argsort(x)).get(), np.argsort(data, kind="stable"))


def test_sort_and_argsort_of_2d_arrays_along_axis_0(pool: gp.Pool) -> None:
    data = np.random.default_rng(2).permutation(30).reshape(10, 3).astype(np.int64)
    x = pool.asarray(data, rows=[3, 0, 7])
    np.testing.assert_array_equal(remote(np.sort(x, axis=0)).get(), np.sort(data, axis=0))
    np.testing.assert_array_equal(remote(np.argsort(x, axis=0)).get(), np.argsort(data, axis=0))
    np.testing.assert_array_equal(remote(np.sort(x, axis=-2)).get(), np.sort(data, axis=-2))


# -- xs @ ys.T and x.T @ y -----------------------------------------------------------------------------------


def test_xs_matmul_ys_transposed(pool: gp.Pool) -> None:
    rng = np.random.default_rng(3)
    x_data, y_data = rng.standard_normal((9, 4)), rng.standard_normal((6, 4))
    x = pool.asarray(x_data, rows=[4, 5, 0])
    y = pool.asarray(y_data, rows=[1, 0, 5])
    np.testing.assert_allclose(remote(x @ y.T).get(), x_data @ y_data.T)
    np.testing.assert_allclose(remote(np.matmul(x, y.T)).get(), x_data @ y_data.T)
    np.testing.assert_allclose(remote(np.dot(x, y.T)).get(), x_data @ y_data.T)
    np.testing.assert_allclose(remote(x @ x.T).get(), x_data @ x_data.T)
    with pytest.raises(ValueError, match="mismatch"):
        x @ pool.asarray(rng.standard_normal((6, 3))).T


def test_x_transposed_matmul_y_laid_out_differently(pool: gp.Pool) -> None:
    rng = np.random.default_rng(4)
    x_data, y_data = rng.standard_normal((11, 3)), rng.standard_normal((11, 2))
    x = pool.asarray(x_data, rows=[5, 0, 6])
    y = pool.asarray(y_data, rows=[11])
    result = x.T @ y  # small: partials summed on the client
    assert isinstance(result, np.ndarray)
    np.testing.assert_allclose(result, x_data.T @ y_data)


def test_large_gram_partials_are_added_by_a_tree_of_agents(pool: gp.Pool) -> None:
    rng = np.random.default_rng(5)
    columns = 1100  # a 1100 x 1100 float32 partial is 4.6 MiB: over TREE_BYTES
    data = rng.standard_normal((24, columns)).astype(np.float32)
    x = pool.asarray(data, rows=[8, 0, 7, 9])
    gram = remote(x.T @ x)
    assert gram.shape == (columns, columns)
    assert len(gram.layout) == 1
    np.testing.assert_allclose(gram.get(), data.T @ data, rtol=1e-4, atol=1e-4)
    other = rng.standard_normal((24, 1000)).astype(np.float32)
    y = pool.asarray(other, rows=[12, 12])
    np.testing.assert_allclose(remote(x.T @ y).get(), data.T @ other, rtol=1e-4, atol=1e-4)


# -- the primitives ------------------------------------------------------------------------------------------


def test_reshard_keeps_rows_that_stay_and_moves_the_rest(pool: gp.Pool) -> None:
    data = np.arange(40, dtype=np.float64).reshape(10, 4)
    x = pool.asarray(data, rows=[4, 3, 3])
    agents = [p.agent_id for p in x.layout]
    session = x.session
    # rows 0-5 to the first agent (4 stay, 2 move), 6-9 to the third (3 stay, 1 moves)
    first, third = x.layout[0], x.layout[2]
    targets = [
        Piece(agent_id=agents[0], endpoint=first.endpoint, worker=first.worker, start=0, stop=6,
              buffer_id=session.new_buffer_id()),
        Piece(agent_id=agents[2], endpoint=third.endpoint, worker=third.worker, start=6, stop=10,
              buffer_id=session.new_buffer_id()),
    ]  # fmt: skip
    moved = rowmoves.reshard(x, targets)
    copy = RemoteArray(session, x.shape, x.dtype, moved)
    np.testing.assert_array_equal(copy.get(), data)
    assert agents_of(copy) == {agents[0], agents[2]}


def test_a_pull_from_a_hung_or_killed_agent_fails_naming_it(system_broker_url: str) -> None:
    """A source agent that stops answering (SIGSTOP) or is killed while a pull reads it: the pull ends with
    an error naming that agent, not a hang (a stalled source after the stall limit; a dead one after the
    destination's bounded retries)."""
    with (
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            backend="numpy",
            memory_limit=str(96 << 20),
            coordinator_args=["--min-shard-bytes", "0"],
            agent_args=["--stall-timeout", "1"],
        ) as local,
        local.connect() as pool,
    ):
        data = np.ones((6144, 2048), np.float32)  # 48 MiB, all on one agent
        x = pool.asarray(data, rows=[6144, 0])
        source, other = x.layout
        index = next(i for i, child in enumerate(local.agents) if child.ready["agent_id"] == source.agent_id)
        process = local.agents[index].process

        def pull_in_background() -> tuple[threading.Thread, list[BaseException]]:
            errors: list[BaseException] = []
            target = Piece(
                agent_id=other.agent_id,
                endpoint=other.endpoint,
                worker=other.worker,
                start=0,
                stop=6144,
                buffer_id=x.session.new_buffer_id(),
            )

            def pull() -> None:
                try:
                    rowmoves.reshard(x, [target])
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=pull)
            thread.start()
            return thread, errors

        process.send_signal(signal.SIGSTOP)  # hung: connections open, nothing answers
        try:
            thread, errors = pull_in_background()
            thread.join(timeout=60)
            assert not thread.is_alive(), "the pull from a hung agent hung"
        finally:
            process.send_signal(signal.SIGCONT)
        (error,) = errors
        assert isinstance(error, RemoteError), repr(error)
        assert f"pull from agent {source.agent_id}" in str(error)

        thread, errors = pull_in_background()
        time.sleep(0.1)  # the pull under way, or about to be: either way it must fail cleanly
        local.kill_agent(index)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the pull from a killed agent hung"
        if not errors:
            pytest.skip("the pull finished before the agent was killed")
        (error,) = errors
        assert isinstance(error, RemoteError), repr(error)
        assert f"pull from agent {source.agent_id}" in str(error)


def test_moves_work_on_an_insecure_pool(system_broker_url: str) -> None:
    with (
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            backend="numpy",
            memory_limit=str(64 << 20),
            coordinator_args=["--min-shard-bytes", "0"],
            secure=False,
        ) as local,
        local.connect() as pool,
    ):
        data = np.arange(24, dtype=np.float64).reshape(6, 4)
        x = pool.asarray(data, rows=[2, 4])
        y = pool.asarray(data[:5] + 1, rows=[5, 0])
        np.testing.assert_array_equal(remote(np.transpose(x)).get(), data.T)
        np.testing.assert_array_equal(
            remote(np.concatenate([x, y])).get(), np.concatenate([data, data[:5] + 1])
        )
        np.testing.assert_allclose(remote(x @ y.T).get(), data @ (data[:5] + 1).T)
        np.testing.assert_array_equal(remote(x.reshape(4, 6)).get(), data.reshape(4, 6))


def test_elementwise_work_between_arrays_laid_out_differently_moves_rows_agent_to_agent(
    pool: gp.Pool,
) -> None:
    a_data = np.arange(10, dtype=np.float64)
    b_data = np.arange(10, dtype=np.float64) * 10
    a = pool.asarray(a_data, rows=[2, 3, 5])
    b = pool.asarray(b_data, rows=[7, 0, 3])
    total = remote(a + b)
    assert [(p.start, p.stop) for p in total.layout] == [(0, 2), (2, 5), (5, 10)]  # a's layout
    np.testing.assert_array_equal(total.get(), a_data + b_data)
    np.testing.assert_array_equal(remote(np.sort(b) - a).get(), np.sort(b_data) - a_data)
