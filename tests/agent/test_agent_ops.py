"""The op table, with NumPy, without a network."""

from __future__ import annotations

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent import ops
from gpupool.agent.ops import Expected, apply_op, arity, constant_array, expected_result, scalar_value
from gpupool.protocol.errors import RpcRefusal

RNG = np.random.default_rng(7)
A = RNG.uniform(0.1, 0.9, (5, 3))
B = RNG.uniform(0.1, 0.9, (5, 3))


def expect(dtype: str, shape: tuple[int, ...]) -> Expected:
    dt = np.dtype(dtype)
    return Expected(dt, shape, int(np.prod(shape)) * dt.itemsize)


def reference(name: str, *operands: object) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(getattr(np, name)(*operands))


def test_table_matches_the_contract() -> None:
    assert len(ops.BINARY) == 31
    assert len(ops.UNARY) == 38
    assert ops.BINARY | ops.UNARY | ops.REDUCTIONS | {"where", "matmul", "astype"} <= ops.OPS
    assert set(ops.TABLE) == ops.OPS  # the newer families: tests/agent/test_agent_ops_more.py
    for name in ops.BINARY | ops.UNARY | ops.REDUCTIONS:
        assert callable(getattr(np, name)), name


#: Ops NumPy defines on integers only (bitwise ones, shifts): tested on these.
INTEGER_ONLY = frozenset({"bitwise_and", "bitwise_or", "bitwise_xor", "left_shift", "right_shift", "invert"})
INTS_A = np.arange(12, dtype=np.int64).reshape(4, 3) - 5
INTS_B = np.arange(12, dtype=np.int64).reshape(4, 3) % 4


@pytest.mark.parametrize("name", sorted(ops.BINARY))
def test_binary_ops_match_numpy(name: str) -> None:
    a, b = (INTS_A, INTS_B) if name in INTEGER_ONLY else (A, B)
    want = reference(name, a, b)
    got = apply_op(np, name, [a, b], expect(want.dtype.name, want.shape))
    np.testing.assert_array_equal(got, want)
    assert got.flags.c_contiguous


@pytest.mark.parametrize("name", sorted(ops.UNARY))
def test_unary_ops_match_numpy(name: str) -> None:
    operand = INTS_A if name in INTEGER_ONLY else A - 0.5  # negative: log and sqrt give nan, no warning
    want = reference(name, operand)
    got = apply_op(np, name, [operand], expect(want.dtype.name, want.shape))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(ops.REDUCTIONS))
def test_reductions_over_all_and_over_an_axis(name: str) -> None:
    whole = reference(name, A)
    got = apply_op(np, name, [A], expect(whole.dtype.name, ()))
    assert got.shape == ()
    np.testing.assert_allclose(got, whole)
    with np.errstate(all="ignore"):
        along = np.asarray(getattr(np, name)(A, axis=1))
    got = apply_op(np, name, [A], expect(along.dtype.name, along.shape), axis=1)
    np.testing.assert_allclose(got, along)


def test_where_matmul_astype() -> None:
    got = apply_op(np, "where", [A > 0.5, A, B], expect("float64", (5, 3)))
    np.testing.assert_array_equal(got, np.where(A > 0.5, A, B))
    got = apply_op(np, "matmul", [A, B.T], expect("float64", (5, 5)))
    np.testing.assert_allclose(got, A @ B.T)
    got = apply_op(np, "astype", [A * 10], expect("int32", (5, 3)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, (A * 10).astype(np.int32))


def test_result_is_cast_to_the_expected_dtype() -> None:
    ints = np.arange(6, dtype=np.int32).reshape(2, 3)
    got = apply_op(np, "sum", [ints], expect("int32", ()))  # NumPy sums int32 to int64
    assert got.dtype == np.int32
    assert int(got) == 15


def test_python_scalars_are_weak_and_typed_scalars_are_not() -> None:
    x = np.ones(4, np.float32)
    weak = apply_op(np, "multiply", [x, scalar_value(agent_pb2.Scalar(f=2.0))], expect("float32", (4,)))
    assert weak.dtype == np.float32
    typed = scalar_value(agent_pb2.Scalar(f=2.0, dtype="float64"))
    assert isinstance(typed, np.float64)
    assert np.multiply(x, typed).dtype == np.float64
    assert scalar_value(agent_pb2.Scalar(i=3)) == 3
    assert scalar_value(agent_pb2.Scalar(b=True)) is True


@pytest.mark.parametrize(
    "item",
    [
        agent_pb2.Scalar(),
        agent_pb2.Scalar(f=1.0, dtype="float128"),
        agent_pb2.Scalar(i=1 << 40, dtype="int32"),
    ],
    ids=["no-value", "unsupported-dtype", "out-of-range"],
)
def test_bad_scalars_are_bad_requests(item: agent_pb2.Scalar) -> None:
    with pytest.raises(RpcRefusal) as caught:
        scalar_value(item)
    assert caught.value.kind == "bad-request"


def test_constants() -> None:
    row = np.array([1.0, 2.0, 3.0])
    got = constant_array(
        agent_pb2.Constant(meta=agent_pb2.ArrayMeta(dtype="float64", shape=[3]), data=row.tobytes())
    )
    np.testing.assert_array_equal(got, row)
    with pytest.raises(RpcRefusal, match="bytes"):
        constant_array(
            agent_pb2.Constant(meta=agent_pb2.ArrayMeta(dtype="float64", shape=[4]), data=row.tobytes())
        )
    with pytest.raises(RpcRefusal, match="unsupported"):
        constant_array(
            agent_pb2.Constant(meta=agent_pb2.ArrayMeta(dtype="complex256", shape=[1]), data=b"\0" * 32)
        )


def test_wrong_expected_shape_is_a_bad_request() -> None:
    with pytest.raises(RpcRefusal) as caught:
        apply_op(np, "add", [A, B], expect("float64", (3, 5)))
    assert caught.value.kind == "bad-request"
    assert "(5, 3)" in caught.value.message


def test_operands_that_do_not_broadcast_fail_the_kernel() -> None:
    with pytest.raises(RpcRefusal) as caught:
        apply_op(np, "add", [A, np.ones((4, 3))], expect("float64", (5, 3)))
    assert caught.value.kind == "kernel-failed"
    with pytest.raises(RpcRefusal) as caught:
        apply_op(np, "matmul", [A, A], expect("float64", (5, 3)))
    assert caught.value.kind == "kernel-failed"
    with pytest.raises(RpcRefusal) as caught:
        apply_op(np, "sum", [A], expect("float64", (5,)), axis=4)
    assert caught.value.kind == "bad-request"  # an axis out of range is a malformed op


def test_arity_and_unknown_ops() -> None:
    assert arity("add") == 2
    assert arity("tanh") == 1
    assert arity("where") == 3
    with pytest.raises(RpcRefusal, match="unknown op"):
        arity("system")
    with pytest.raises(RpcRefusal, match="operand"):
        apply_op(np, "add", [A], expect("float64", (5, 3)))


def test_expected_result_checks_its_declaration() -> None:
    good = agent_pb2.Op(op="add", output="o", expect=agent_pb2.ArrayMeta(dtype="float32", shape=[7, 3]))
    assert expected_result(good) == Expected(np.dtype("float32"), (7, 3), 84)
    for meta in (
        agent_pb2.ArrayMeta(dtype="", shape=[1]),
        agent_pb2.ArrayMeta(dtype="datetime64", shape=[1]),
        agent_pb2.ArrayMeta(dtype="float32", shape=[-1]),
    ):
        with pytest.raises(RpcRefusal) as caught:
            expected_result(agent_pb2.Op(op="add", output="o", expect=meta))
        assert caught.value.kind == "bad-request"
