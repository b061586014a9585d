"""The newer ops in programs: run_program all or nothing, fusion of clip/round/where, cost estimates, and a
real agent process over gRPC."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest

from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2
from gpupool.agent.fusion import Run, _reduces_rows, plan_runs
from gpupool.agent.program import SMALL_ELEMENTS, estimate_work, is_small
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    agent_stub,
    buffer,
    clear_retained,
    constant,
    fetched_array,
    new_prefix,
    op,
    refused,
    run,
    scalar,
    start_agent,
    upload,
)
from .test_agent_fusion import out, run_both
from .test_agent_program import execute, registry_with

X = np.random.default_rng(4).standard_normal((10, 4))


def fetched(reply: agent_pb2.ExecuteReply) -> dict[str, np.ndarray]:
    return {item.buffer_id: fetched_array(item) for item in reply.fetched}


def program_of_new_ops(prefix: str = "") -> tuple[list[agent_pb2.Op], dict[str, Any]]:
    """A program over resident ``x`` (X) using each family, and what each output must be."""
    p = prefix
    x = buffer(p + "x")
    indices = np.array([9, 0, -1], np.int64)
    ops = [
        op("moments", [x], p + "m", "float64", (3, 4), axes=[0]),
        op("argmax_partial", [x], p + "am", "float64", (2,)),
        op("var", [x], p + "v", "float64", (1, 4), params=[1], axes=[0], keepdims=True),
        op("sort", [x], p + "s", "float64", (10, 4), params=[1]),
        op("slice", [x], p + "sl", "float64", (3, 2), params=[8, 1, -3, 1, 4, 2]),
        op("take", [x, constant(indices)], p + "tk", "float64", (3, 4), params=[0]),
        op("cumsum", [x], p + "cs", "float64", (10, 4), params=[0]),
        op("tmatmul", [x, x], p + "g", "float64", (4, 4)),
        op("random_normal", [scalar(0.0), scalar(1.0)], p + "r", "float32", (10, 4), params=[5, 3]),
        op("arange", [scalar(1), scalar(2)], p + "a", "int64", (6,), params=[4]),
        op("full", [scalar(1.5)], p + "f", "float64", (2, 4)),
        op("concatenate", [x, buffer(p + "f")], p + "c", "float64", (12, 4), params=[0]),
        op("clip", [x, scalar(-0.5), scalar(0.5)], p + "cl", "float64", (10, 4)),
        op("round", [buffer(p + "cl")], p + "rd", "float64", (10, 4), params=[1]),
        op("transpose", [x], p + "t", "float64", (4, 10)),
    ]
    mean = X.mean(axis=0)
    want = {
        "m": np.stack([np.full(4, 10.0), mean, ((X - mean) ** 2).sum(axis=0)]),
        "am": np.array([X.max(), float(X.argmax())]),
        "v": np.var(X, axis=0, ddof=1, keepdims=True),
        "s": np.sort(X, axis=1),
        "sl": X[8:1:-3, 1:4:2],
        "tk": X[indices],
        "cs": np.cumsum(X, axis=0),
        "g": X.T @ X,
        "a": np.arange(1, 41, 2)[4:10],
        "c": np.concatenate([X, np.full((2, 4), 1.5)]),
        "rd": np.round(np.clip(X, -0.5, 0.5), 1),
        "t": X.T,
    }
    return ops, want


def check_results(got: dict[str, np.ndarray], want: dict[str, Any], prefix: str = "") -> None:
    for name, value in want.items():
        np.testing.assert_allclose(got[prefix + name], value, rtol=1e-12, atol=1e-12, err_msg=name)
    random = got[prefix + "r"]
    assert random.dtype == np.float32
    assert random.shape == (10, 4)
    assert len(np.unique(random)) == 40


def test_a_program_of_new_ops_runs_and_fetches() -> None:
    ops, want = program_of_new_ops()
    registry = registry_with(x=X)
    names = [o.output for o in ops]
    reply = execute(registry, *ops, fetch=tuple(names), free=tuple(n for n in names if n != "r"))
    check_results(fetched(reply), want)
    assert registry.contains("r")
    assert not registry.contains("m")
    again = execute(registry_with(x=X), *ops, fetch=("r",))
    np.testing.assert_array_equal(fetched(again)["r"], fetched(reply)["r"])  # the same seed and stream


@pytest.mark.parametrize(
    "bad",
    [
        op("exp", [buffer("x")], "b", "float64", (10, 4), params=[1]),
        op("exp", [buffer("x")], "b", "float64", (10, 4), axes=[0]),
        op("sum", [buffer("x")], "b", "float64", (4,), axes=[0], axis=0),
        op("transpose", [buffer("x")], "b", "float64", (4, 10), keepdims=True),
        op("concatenate", [], "b", "float64", (0,)),
        op("slice", [buffer("x")], "b", "float64", (10, 4), params=[0, 10, 0]),
        op("slice", [buffer("x")], "b", "float64", (10, 4), params=[0, 11, 1]),
        op("reshape", [buffer("x")], "b", "float64", (41,), params=[41]),
        op("var", [buffer("x")], "b", "float64", (), params=[-1]),
        op("argmin", [buffer("x")], "b", "int64", (), axes=[0, 1]),
        op("partition", [buffer("x")], "b", "float64", (10, 4), params=[0, 10]),
        op("random_uniform", [scalar(0.0), scalar(1.0)], "b", "float64", (3,), params=[-5, 0]),
        op("arange", [scalar(0), scalar(1)], "b", "int64", (2, 2), params=[0]),
    ],
    ids=lambda o: f"{o.op}-{list(o.params)}-{list(o.axes)}",
)
def test_malformed_params_are_refused_and_nothing_is_kept(bad: agent_pb2.Op) -> None:
    registry = registry_with(x=X)
    before = registry.usage(0)
    with pytest.raises(RpcRefusal) as caught:
        execute(registry, op("exp", [buffer("x")], "e", "float64", (10, 4)), bad, fetch=("e",))
    assert caught.value.kind == "bad-request", caught.value.message
    assert not registry.contains("e")
    assert not registry.contains("b")
    assert registry.usage(0) == before


# -- fusion ----------------------------------------------------------------------------------------------


def elementwise_more(shape: tuple[int, ...]) -> list[agent_pb2.Op]:
    row = constant(np.linspace(0.5, 2.0, shape[-1]))
    return [
        op("multiply", [buffer("x"), scalar(3.0)], "t1", "float64", shape),
        op("clip", [buffer("t1"), scalar(-1.0), row], "t2", "float64", shape),
        op("round", [buffer("t2")], "t3", "float64", shape, params=[1]),
        op("greater", [buffer("t3"), scalar(0.0)], "t4", "bool", shape),
        op("where", [buffer("t4"), buffer("t3"), buffer("x")], "t5", "float64", shape),
    ]


@pytest.mark.parametrize("shape", [(100_003, 3), (70_001,), (1, 4), (0, 2)])
def test_clip_round_and_where_fuse_by_row_blocks_exactly(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).standard_normal(shape)
    program = elementwise_more(shape)
    expected = {o.output: mock.Mock(shape=tuple(o.expect.shape)) for o in program}
    assert plan_runs(program, expected, {"t1", "t2", "t3", "t4"}, {"t5"}) == {0: Run(0, 5, folds=False)}
    fused, plain = run_both(program, x, fetch=("t5",), free=("t1", "t2", "t3", "t4", "t5"))
    np.testing.assert_array_equal(out(fused, "t5"), out(plain, "t5"))
    t3 = np.round(np.clip(x * 3.0, -1.0, np.linspace(0.5, 2.0, shape[-1])), 1)
    np.testing.assert_array_equal(out(fused, "t5"), np.where(t3 > 0, t3, x))


@pytest.mark.parametrize(("axes", "keepdims"), [([0], True), ([-2], False), ([0, 1], True), ([], True)])
def test_a_trailing_sum_over_axes_folds(axes: list[int], keepdims: bool) -> None:
    shape = (300_001, 3)
    x = np.random.default_rng(1).standard_normal(shape)
    want = np.sum(np.where(*_t4_t3(x), x), axis=tuple(axes) or None, keepdims=keepdims)
    program = [
        *elementwise_more(shape),
        op("sum", [buffer("t5")], "s", "float64", want.shape, axes=axes, keepdims=keepdims),
    ]
    expected = {o.output: mock.Mock(shape=tuple(o.expect.shape)) for o in program}
    free = {"t1", "t2", "t3", "t4", "t5", "s"}
    assert plan_runs(program, expected, free, {"s"}) == {0: Run(0, 5, folds=True)}
    fused, plain = run_both(program, x, fetch=("s",), free=tuple(free))
    np.testing.assert_allclose(out(fused, "s"), want, rtol=1e-9)
    np.testing.assert_allclose(out(plain, "s"), want, rtol=1e-9)


def _t4_t3(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t3 = np.round(np.clip(x * 3.0, -1.0, np.linspace(0.5, 2.0, x.shape[-1])), 1)
    return t3 > 0, t3


def test_only_reductions_over_rows_or_everything_fold() -> None:
    def folds(**fields: Any) -> bool:
        return _reduces_rows(agent_pb2.Op(op="sum", **fields), 2)

    assert folds()
    assert folds(has_axis=True, axis=0)
    assert folds(has_axis=True, axis=-2)
    assert folds(axes=[0])
    assert folds(axes=[1, 0], keepdims=True)
    assert folds(axes=[-2], keepdims=True)
    assert not folds(has_axis=True, axis=1)
    assert not folds(axes=[1])
    assert not folds(axes=[-1])
    assert not folds(axes=[2])
    assert not folds(axes=[0, 0])
    assert not folds(axes=[0], has_axis=True)
    assert not folds(params=[1])
    program = [
        op("multiply", [buffer("x"), scalar(2.0)], "t", "float64", (10, 3)),
        op("sum", [buffer("t")], "s", "float64", (10,), axes=[1]),
    ]
    expected = {o.output: mock.Mock(shape=tuple(o.expect.shape)) for o in program}
    assert plan_runs(program, expected, {"t", "s"}, {"s"}) == {}
    program[1] = op("var", [buffer("t")], "s", "float64", ())  # not foldable from block partials
    assert plan_runs(program, expected, {"t", "s"}, {"s"}) == {}


# -- cost ------------------------------------------------------------------------------------------------


def test_estimate_work_counts_sorts_as_n_log_n_and_tmatmul_as_2mnk() -> None:
    sizes = {"x": 1000 * 64 * 8, "y": 1000 * 16 * 8}  # float64 (1000, 64) and (1000, 16), resident
    request = agent_pb2.ExecuteRequest(
        ops=[
            op("tmatmul", [buffer("x"), buffer("y")], "g", "float64", (64, 16)),
            op("sort", [buffer("x")], "s", "float64", (1000, 64), params=[0]),
            op("exp", [buffer("x")], "e", "float64", (1000, 64)),
        ]
    )
    _, flops = estimate_work(request, lambda buffer_id: sizes.get(buffer_id, 0))
    n = 1000 * 64
    assert flops == 2 * 1000 * 64 * 16 + n * n.bit_length() + n


def test_is_small_leaves_contractions_and_large_sorts_to_the_threads() -> None:
    def small(*ops: agent_pb2.Op, sizes: dict[str, int]) -> bool:
        return is_small(agent_pb2.ExecuteRequest(ops=ops), lambda buffer_id: sizes.get(buffer_id, 0))

    tiny = {"x": 4 * 8, "y": 4 * 8}
    assert not small(op("tmatmul", [buffer("x"), buffer("y")], "g", "float64", (1, 1)), sizes=tiny)
    assert small(op("sort", [buffer("x")], "s", "float64", (4,)), sizes=tiny)
    count = SMALL_ELEMENTS // 4
    sizes = {"x": count * 8}
    assert small(op("exp", [buffer("x")], "e", "float64", (count,)), sizes=sizes)
    assert not small(op("sort", [buffer("x")], "s", "float64", (count,)), sizes=sizes)
    assert small(
        op("random_normal", [scalar(0.0), scalar(1.0)], "r", "float64", (100,), params=[1, 0]), sizes={}
    )


# -- a real agent ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(system_broker_url: str) -> Iterator[Child]:
    prefix = new_prefix()
    child = start_agent(system_broker_url, prefix, "--backend", "numpy")
    yield child
    child.stop()
    run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


def test_new_ops_through_a_real_agent_process(agent: Child) -> None:
    session = "t" + uuid.uuid4().hex[:8]
    p = session + "."

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            await upload(stub, p + "x", X, session=session)
            ops, want = program_of_new_ops(p)
            names = [o.output for o in ops]
            request = agent_pb2.ExecuteRequest(ops=ops, fetch=names, free=names, session=session)
            reply = await stub.Execute(request, timeout=30)
            check_results(fetched(reply), want, p)
            bad = op("slice", [buffer(p + "x")], p + "b", "float64", (10, 4), params=[0, 10, 0])
            _code, kind, details = await refused(
                stub.Execute(agent_pb2.ExecuteRequest(ops=[ops[0], bad], session=session), timeout=30)
            )
            assert kind == "bad-request", details
            assert "step" in details
            status = await stub.Health(agent_pb2.HealthRequest(), timeout=10)
            assert status.status.workers[0].memory_used == X.nbytes  # only x: nothing kept

    run(body())
