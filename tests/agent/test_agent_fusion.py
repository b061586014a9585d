"""Fused elementwise chains give exactly what op-by-op execution gives, and keep only what they must."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent import fusion
from gpupool.agent.fusion import Run, plan_runs

from .agent_helpers import buffer, constant, fetched_array, op, scalar
from .test_agent_program import execute, registry_with


def out(reply: agent_pb2.ExecuteReply, buffer_id: str) -> np.ndarray:
    return fetched_array(next(f for f in reply.fetched if f.buffer_id == buffer_id))


def chain(dtype: str, shape: tuple[int, ...]) -> list[agent_pb2.Op]:
    row = constant(np.arange(1, shape[-1] + 1, dtype=dtype)) if len(shape) > 1 else scalar(3)
    return [
        op("multiply", [buffer("x"), scalar(2)], "t1", dtype, shape),
        op("add", [buffer("t1"), row], "t2", dtype, shape),
        op("maximum", [buffer("t2"), buffer("x")], "t3", dtype, shape),
        op("square", [buffer("t3")], "t4", dtype, shape),
    ]


def run_both(
    program: list[agent_pb2.Op], x: np.ndarray, **kwargs: object
) -> tuple[agent_pb2.ExecuteReply, ...]:
    fused = execute(registry_with(limit=1 << 30, x=x), *program, **kwargs)  # type: ignore[arg-type]
    with (
        mock.patch.object(fusion, "plan_runs", return_value={}),
        mock.patch("gpupool.agent.program.plan_runs", return_value={}),
    ):
        plain = execute(registry_with(limit=1 << 30, x=x), *program, **kwargs)  # type: ignore[arg-type]
    return fused, plain


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("shape", [(100_003, 3), (70_001,), (1, 4), (0, 2)])
def test_fused_chain_equals_op_by_op(dtype: str, shape: tuple[int, ...]) -> None:
    x = (np.random.default_rng(0).standard_normal(shape) * 10).astype(dtype)
    program = chain(dtype, shape)
    fused, plain = run_both(program, x, fetch=("t4",), free=("t1", "t2", "t3", "t4"))
    np.testing.assert_array_equal(out(fused, "t4"), out(plain, "t4"))


@pytest.mark.parametrize("reduction", ["sum", "max", "min", "any", "all"])
@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_a_trailing_reduction_folds_block_partials(reduction: str, axis: int | None, dtype: str) -> None:
    shape = (300_001, 2)
    x = np.random.default_rng(1).uniform(0.5, 1.5, shape).astype(dtype)
    exact = np.square(np.maximum(x.astype(np.float64) * 2 + np.array([1, 2]), x))  # in double precision
    want = np.asarray(getattr(np, reduction)(exact.astype(dtype), axis=axis))
    program = [
        *chain(dtype, shape),
        op(reduction, [buffer("t4")], "p", want.dtype.name, want.shape, axis=axis),
    ]
    fused, plain = run_both(program, x, fetch=("p",), free=("t1", "t2", "t3", "t4", "p"))
    if reduction == "sum":
        want = np.asarray(exact.sum(axis=axis)).astype(want.dtype)
    rtol = 1e-5 if dtype == "float32" else 1e-12  # float32 sums: NumPy's own are off by ~5e-6 here
    np.testing.assert_allclose(out(fused, "p"), want, rtol=rtol)
    np.testing.assert_allclose(out(plain, "p"), want, rtol=rtol)


def test_a_trailing_product_folds_too() -> None:
    x = np.full((300_001, 2), 1.0000001)
    program = [
        op("multiply", [buffer("x"), scalar(1.0)], "t1", "float64", x.shape),
        op("positive", [buffer("t1")], "t2", "float64", x.shape),
        op("prod", [buffer("t2")], "p", "float64", ()),
    ]
    fused, plain = run_both(program, x, fetch=("p",), free=("t1", "t2", "p"))
    np.testing.assert_allclose(out(fused, "p"), np.prod(x), rtol=1e-9)
    np.testing.assert_allclose(out(fused, "p"), out(plain, "p"), rtol=1e-9)


def test_kept_and_later_used_outputs_are_written_whole() -> None:
    x = np.arange(200_000, dtype=np.float64).reshape(100_000, 2)
    program = [
        *chain("float64", x.shape),
        op("sum", [buffer("t2")], "s", "float64", (2,), axis=0),  # t2 is read after the run: whole
    ]
    registry = registry_with(limit=1 << 30, x=x)
    reply = execute(registry, *program, fetch=("s",), free=("t1", "t2", "t3"))
    t2 = x * 2 + np.array([1, 2])
    np.testing.assert_allclose(out(reply, "s"), t2.sum(axis=0))
    np.testing.assert_array_equal(registry.get("t4", worker=0).array, np.square(np.maximum(t2, x)))
    assert not registry.contains("t1")
    assert not registry.contains("t3")


def test_plan_finds_chains_and_folds_only_private_reductions() -> None:
    program = [*chain("float32", (10, 3)), op("sum", [buffer("t4")], "p", "float32", ())]
    expected = {o.output: mock.Mock(shape=tuple(o.expect.shape)) for o in program}
    free = {"t1", "t2", "t3", "t4", "p"}
    assert plan_runs(program, expected, free, {"p"}) == {0: Run(0, 4, folds=True)}
    assert plan_runs(program, expected, free - {"t4"}, {"p"}) == {0: Run(0, 4, folds=False)}
    assert plan_runs(program[:1], expected, free, set()) == {}  # one op alone gains nothing


def test_a_failing_op_in_a_fused_chain_is_refused_and_keeps_nothing() -> None:
    x = np.arange(1, 1001, dtype=np.int64).reshape(500, 2)
    program = [
        op("add", [buffer("x"), scalar(1)], "t1", "int64", (500, 2)),
        op("power", [buffer("t1"), scalar(-1)], "t2", "int64", (500, 2)),
    ]
    registry = registry_with(limit=1 << 30, x=x)
    from gpupool.protocol.errors import RpcRefusal

    with pytest.raises(RpcRefusal, match="negative") as caught:
        execute(registry, *program, fetch=("t2",), free=("t1",))
    assert caught.value.kind == "kernel-failed"
    assert not registry.contains("t1")
    assert not registry.contains("t2")
