"""The lineage book and its rebuild plans, as pure functions: no network (issue 9, item 2).

Each plan is checked by running it: the ops it emits are executed by the agent's own program runner
(``gpupool.agent.program.run_program`` over NumPy), so "the rebuilt buffer holds the value it had" is
shown, not assumed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.ops import apply_op, expected_result, scalar_value
from gpupool.client.graph import make_op
from gpupool.client.layout import Piece
from gpupool.client.lineage import LINEAGE_LIMIT, Book, Unrebuildable
from gpupool.client.operands import buffer_operand, scalar_operand

A = Piece(agent_id="a", endpoint="a:1", worker=0, start=0, stop=4, buffer_id="")
B = Piece(agent_id="b", endpoint="b:1", worker=0, start=0, stop=4, buffer_id="")
F32 = np.dtype(np.float32)


def op(name: str, inputs: list[agent_pb2.Operand], out: str, shape: tuple[int, ...] = (4, 2)) -> agent_pb2.Op:
    return make_op(name, inputs, out, F32, shape)


def fresh() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"tmp{next(counter)}"


def evaluate(plan_ops: list[agent_pb2.Op], store: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run elementwise ops over a store of NumPy arrays with the agent's own op table."""
    for message in plan_ops:
        operands = [
            store[o.buffer] if o.WhichOneof("kind") == "buffer" else scalar_value(o.scalar)
            for o in message.inputs
        ]
        store[message.output] = apply_op(np, message.op, operands, expected_result(message))
    return store


def test_a_chain_is_rebuilt_from_the_uploaded_rows_under_the_lost_ids() -> None:
    book = Book("host")
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    book.uploaded(A.with_buffer("x"), x)
    ops = [
        op("multiply", [buffer_operand("x"), scalar_operand(2.0)], "t1"),
        op("add", [buffer_operand("t1"), scalar_operand(1.0)], "y"),
        op("tanh", [buffer_operand("y")], "z"),
    ]
    book.ran(A, ops, kept=["y", "z"], freed=["t1"])
    x[:] = -1  # the user's array changes after the upload: the kept copy does not
    assert sorted(book.on(A.place)) == ["x", "y", "z"]
    plan = book.plan(["z"], fresh())  # only z lost (x and y freed since, say)
    assert [name for name, _ in plan.uploads] == ["tmp0"]
    assert [o.op for o in plan.ops] == ["multiply", "add", "tanh"]
    assert plan.ops[-1].output == "z"
    assert "z" not in plan.free
    assert set(plan.free) == {"tmp0", "tmp1", "tmp2"}
    store = evaluate(plan.ops, {name: rows for name, rows in plan.uploads})
    original = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_allclose(store["z"], np.tanh(original * 2 + 1), rtol=1e-6)


def test_buffers_lost_together_are_made_once_and_a_present_one_is_read() -> None:
    book = Book("host")
    book.uploaded(A.with_buffer("x"), np.ones((4, 2), np.float32))
    book.uploaded(B.with_buffer("w"), np.full((4, 2), 3, np.float32))
    book.ran(A, [op("add", [buffer_operand("x"), scalar_operand(1.0)], "y")], kept=["y"], freed=[])
    book.ran(A, [op("multiply", [buffer_operand("y"), buffer_operand("y")], "z")], kept=["z"], freed=[])
    plan = book.plan(["x", "y", "z"], fresh())
    assert [name for name, _ in plan.uploads] == ["x"]
    assert [o.output for o in plan.ops] == ["y", "z"]
    assert plan.free == []
    store = evaluate(plan.ops, {name: rows for name, rows in plan.uploads})
    np.testing.assert_array_equal(store["z"], np.full((4, 2), 4, np.float32))
    # Only z lost, on a worker that holds y already: nothing uploaded, one op.
    plan = book.plan(["z"], fresh(), present=["y"])
    assert plan.uploads == []
    assert [o.op for o in plan.ops] == ["multiply"]


def test_the_book_forgets_freed_buffers_but_keeps_their_recipes_for_what_was_made_of_them() -> None:
    book = Book("host")
    book.uploaded(A.with_buffer("x"), np.ones((4, 2), np.float32))
    book.ran(A, [op("negative", [buffer_operand("x")], "y")], kept=["y"], freed=[])
    book.forget(["x"])
    assert book.on(A.place) == ["y"]
    plan = book.plan(["y"], fresh())
    store = evaluate(plan.ops, {name: rows for name, rows in plan.uploads})
    np.testing.assert_array_equal(store["y"], -np.ones((4, 2), np.float32))


def test_what_cannot_be_rebuilt_says_why() -> None:
    book = Book("none")
    book.uploaded(A.with_buffer("x"), np.ones((4, 2), np.float32))
    book.ran(A, [op("negative", [buffer_operand("x")], "y")], kept=["y"], freed=[])
    with pytest.raises(Unrebuildable, match="keep_uploads='none'") as info:
        book.plan(["y"], fresh())
    assert info.value.buffer_id == "y"
    book.made_elsewhere(A.with_buffer("m"), "it was moved from another agent's rows")
    with pytest.raises(Unrebuildable, match="moved from another"):
        book.plan(["m"], fresh())
    with pytest.raises(Unrebuildable, match="no record"):
        book.plan(["nowhere"], fresh())
    # An op reading a buffer the book never saw.
    book.ran(A, [op("negative", [buffer_operand("ghost")], "g")], kept=["g"], freed=[])
    with pytest.raises(Unrebuildable, match="ghost"):
        book.plan(["g"], fresh())


def test_a_chain_longer_than_the_limit_is_not_rebuilt() -> None:
    book = Book("host")
    book.uploaded(A.with_buffer("b0"), np.zeros((4, 2), np.float32))
    for step in range(LINEAGE_LIMIT + 1):
        ops = [op("add", [buffer_operand(f"b{step}"), scalar_operand(1.0)], f"b{step + 1}")]
        book.ran(A, ops, kept=[f"b{step + 1}"], freed=[f"b{step}"])
    with pytest.raises(Unrebuildable, match="longer than"):
        book.plan([f"b{LINEAGE_LIMIT + 1}"], fresh())


def test_moving_points_the_book_at_the_new_place() -> None:
    book = Book("host")
    book.uploaded(A.with_buffer("x"), np.ones((4, 2), np.float32))
    book.move(["x"], B)
    assert book.on(A.place) == []
    assert book.on(B.place) == ["x"]
    assert book.piece("x") == B.with_buffer("x")


def test_a_keep_mode_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="keep must be one of"):
        Book("disk")  # type: ignore[arg-type]


def test_a_partial_plan_leaves_out_what_cannot_be_rebuilt_and_makes_the_rest() -> None:
    book = Book("host")
    book.uploaded(A.with_buffer("x"), np.ones((4, 2), np.float32))
    book.made_elsewhere(A.with_buffer("m"), "it was made by moving rows between agents")
    book.ran(A, [op("negative", [buffer_operand("m")], "n")], kept=["n"], freed=[])
    book.ran(A, [op("negative", [buffer_operand("x")], "y")], kept=["y"], freed=[])
    plan = book.plan(["x", "m", "n", "y", "nowhere"], fresh(), partial=True)
    assert set(plan.dead) == {"m", "n", "nowhere"}
    assert "moving rows" in plan.dead["n"]
    store = evaluate(plan.ops, {name: rows for name, rows in plan.uploads})
    np.testing.assert_array_equal(store["y"], -np.ones((4, 2), np.float32))
