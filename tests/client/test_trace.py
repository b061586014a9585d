"""Tracing functions into programs (gpupool/client/trace.py), run by the agent's own program runner
(gpupool/agent/program.py on its NumPy backend, in this process) and compared with NumPy running the same
function on the same arrays; and every construct that cannot be traced, refused with words that say so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpupool as gp
from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.program import run_program
from gpupool.client.trace import MAX_INLINE_BYTES, Trace, TracingError, rename, trace
from gpupool.protocol.codec import array_from_bytes


class Data:
    """Stands for a replicated data set in a trace: its array is bound as a resident buffer."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def bound(value: Any) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    return (value.array.shape, value.array.dtype) if isinstance(value, Data) else None


def run_traced(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` traced, then run by the agent's program runner; the results as a task gets them."""
    traced = trace(fn, args, kwargs, bound=bound)
    registry = BufferRegistry([1 << 30])
    data = [a for a in (*args, *kwargs.values()) if isinstance(a, Data)]
    for name, item in zip(traced.inputs, data, strict=True):
        reservation = registry.reserve(worker=0, buffer_id=name, nbytes=item.array.nbytes, session="s")
        registry.commit(reservation, item.array)
    reply = execute(traced, registry)
    return rebuild(traced, reply)


def execute(traced: Trace, registry: BufferRegistry) -> dict[str, np.ndarray]:
    ops = rename(traced.ops, lambda name: name if name.startswith("in") else f"run.{name}")
    created = [n for op in ops for n in ([op.output] if op.output else list(op.outputs))]
    fetch = [name if name.startswith("in") else f"run.{name}" for name in traced.fetch]
    request = agent_pb2.ExecuteRequest(ops=ops, fetch=fetch, free=created, session="s")
    reply = run_program(request, backend=NumpyBackend(), registry=registry)
    assert registry.usage(0).used == sum(int(registry.get(n).nbytes) for n in traced.inputs)  # nothing kept
    return {f.buffer_id.removeprefix("run."): array_from_bytes(f.data, f.meta) for f in reply.fetched}


def rebuild(traced: Trace, fetched: dict[str, np.ndarray]) -> Any:
    def walk(node: Any) -> Any:
        kind, content = node
        if kind == "fetch":
            array = fetched[content]
            return array[()] if array.ndim == 0 else array
        if kind == "value":
            return content
        if kind == "dict":
            return {k: walk(v) for k, v in content.items()}
        items = [walk(v) for v in content]
        return tuple(items) if kind == "tuple" else items

    return walk(traced.results)


def reference(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*(a.array if isinstance(a, Data) else a for a in args))


def same(got: Any, want: Any) -> None:
    if isinstance(want, tuple | list):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            same(g, w)
        return
    want = np.asarray(want)
    got = np.asarray(got)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 8)).astype(np.float32)
W = RNG.standard_normal(8).astype(np.float32)


def softmax(x: Any) -> Any:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def logistic_step(x: Any, w: Any, lr: float) -> Any:
    p = 1 / (1 + np.exp(-(x @ w)))
    y = (x[:, 0] > 0).astype(np.float32)
    return w - lr * (x.T @ (p - y)) / x.shape[0], (p - y).mean()


def standardise(x: Any) -> Any:
    return (x - x.mean(axis=0)) / x.std(axis=0, ddof=1), x.var(axis=0)


CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
    "softmax": (softmax, (Data(X),)),
    "logistic step, inline weights": (logistic_step, (Data(X), W, 0.5)),
    "standardise": (standardise, (Data(X),)),
    "where, clip, abs": (lambda x: np.where(x > 0, np.clip(x, -0.5, 0.5), abs(x) * 2), (Data(X),)),
    "reshape, transpose, slices": (
        lambda x: (x.reshape(16, 32).T[3:9, ::2], x[5], x[:, 2:4].ravel()),
        (Data(X),),
    ),
    "reductions": (
        lambda x: (
            x.sum(),
            x.max(axis=0),
            np.mean(x, axis=(0, 1), keepdims=True),
            x.argmax(axis=1),
            (x > 0).all(),
        ),
        (Data(X),),
    ),
    "scalars and dtypes": (
        lambda x, s: ((x * s).astype(np.float64) + np.float32(2), x // 1, x**2),
        (Data(X), 3),
    ),
    "host array argument and a dict": (lambda x, w: {"y": x @ w, "n": 7}, (Data(X), W)),
    "like": (
        lambda x: (np.zeros_like(x) + np.ones_like(x, dtype=np.int32), np.full_like(x, 2.5)),
        (Data(X),),
    ),
    "gp namespace": (lambda x: gp.exp(x) + gp.sum(x, axis=0) * gp.tanh(x), (Data(X),)),
    "sorts and running totals": (
        lambda x: (np.sort(x, axis=0), np.argsort(x[:, 0]), x.cumsum(axis=1), np.cumprod(x[:4], axis=None)),
        (Data(X),),
    ),
    "concatenate, stack, take": (
        lambda x, idx: (
            np.concatenate([x[:2], x[5:9] * 2], axis=0),
            np.stack([x[0], x[1]], axis=1),
            np.hstack([x[:, :2], x[:, 6:]]),
            np.vstack([x[0], x[3]]),
            x[idx],
            np.take(x, idx, axis=1),
            np.concatenate([x[0], x[1]], axis=None),
        ),
        (Data(X), np.array([3, 0, 7, 7])),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_traced_function_computes_what_numpy_does(name: str) -> None:
    fn, args = CASES[name]
    gp_reference = np.exp(X) + np.sum(X, axis=0) * np.tanh(X)  # "gp namespace" in NumPy's own names
    want = gp_reference if name == "gp namespace" else reference(fn, *args)
    got = run_traced(fn, *args)
    if isinstance(want, dict):
        same(got["y"], want["y"])
        assert got["n"] == 7
    else:
        same(got, want)


def test_fori_loop_runs_on_the_agent_as_one_op() -> None:
    def train(x: Any, lr: float, steps: int) -> Any:
        def step(i: Any, carry: Any) -> Any:
            w, _loss = carry
            err = x @ w - 1.0
            return w - lr * (x.T @ err) / x.shape[0], (err * err).mean() + (i * 0).astype(np.float32)

        return gp.fori_loop(steps, step, (np.zeros(8, np.float32), np.float32(0)))

    traced = trace(train, (Data(X), 0.05, 30), {}, bound=bound)
    assert [op.op for op in traced.ops].count("fori_loop") == 1
    w, loss = run_traced(train, Data(X), 0.05, 30)
    want_w, want_loss = np.zeros(8, np.float32), np.float32(0)
    for _ in range(30):
        err = X @ want_w - 1.0
        want_w, want_loss = want_w - 0.05 * (X.T @ err) / 64, (err * err).mean()
    np.testing.assert_allclose(w, want_w, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert loss.dtype == np.float32


def test_nested_loops_zero_trips_and_the_loop_outside_a_trace() -> None:
    def nested(x: Any) -> Any:
        def outer(i: Any, acc: Any) -> Any:
            return gp.fori_loop(3, lambda j, a: a + x[0], acc) * 0.5

        return gp.fori_loop(4, outer, np.zeros(8, np.float32)), gp.fori_loop(0, lambda i, a: a + 1, x[1])

    got, untouched = run_traced(nested, Data(X))
    want = np.zeros(8, np.float32)
    for _ in range(4):
        want = (want + 3 * X[0]) * 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(untouched, X[1])
    # without a trace, a plain Python loop
    assert gp.fori_loop(5, lambda i, a: a + i, 10) == 20


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=1, max_dims=3, max_side=5),
    dtypes=st.tuples(*[st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.bool_])] * 2),
    op=st.sampled_from(["add", "multiply", "maximum", "greater", "subtract"]),
    axis=st.one_of(st.none(), st.integers(-1, 0)),
    keepdims=st.booleans(),
)
def test_broadcasting_promotion_and_reductions_match_numpy(
    shapes: Any, dtypes: Any, op: str, axis: int | None, keepdims: bool
) -> None:
    a = (np.arange(math.prod(shapes.input_shapes[0])).reshape(shapes.input_shapes[0]) % 7).astype(dtypes[0])
    b = (np.arange(math.prod(shapes.input_shapes[1])).reshape(shapes.input_shapes[1]) % 5).astype(dtypes[1])
    if op == "subtract" and np.bool_ in dtypes:
        op = "add"

    def fn(x: Any, y: Any) -> Any:
        z = getattr(np, op)(x, y) + 1
        return z.sum(axis=axis, keepdims=keepdims), z * 2.5

    same(run_traced(fn, Data(a), Data(b)), fn(a, b))


# -- what cannot be traced ----------------------------------------------------------------------------------


def refused(fn: Callable[..., Any], *args: Any) -> str:
    with pytest.raises(TracingError) as caught:
        trace(fn, args, {}, bound=bound)
    return str(caught.value)


def test_data_dependent_python_is_refused_with_what_to_write_instead() -> None:
    x = Data(X)
    assert "gp.where" in refused(lambda x: x if x.sum() > 0 else -x, x)
    assert "float()" in refused(lambda x: float(x.sum()), x)
    assert "int()" in refused(lambda x: int(x.max()), x)
    assert "np.asarray" in refused(lambda x: np.asarray(x) + 1, x)
    assert "iterating" in refused(lambda x: [row for row in x], x)
    assert ".item()" in refused(lambda x: x.sum().item(), x)
    assert "np.linalg" in refused(lambda x: np.linalg.svd(x), x) or "svd" in refused(
        lambda x: np.linalg.svd(x), x
    )
    assert "assignment" in refused(lambda x: x.__setitem__(0, 1), x)
    assert "indexing" in refused(lambda x: x[x > 0], x)
    assert "in place" in refused(lambda x: x.sort(), x)
    assert "returned a" in refused(lambda x: object(), x)


def test_loops_must_keep_their_carry_and_values_stay_in_their_body() -> None:
    x = Data(X)
    message = refused(lambda x: gp.fori_loop(3, lambda i, w: w + i, x[0]), x)  # int64 counter promotes
    assert "changes carry 0 from float32[8] to float64[8]" in message
    assert "astype" in message
    assert "returned 2 values" in refused(lambda x: gp.fori_loop(2, lambda i, c: (c, c), x[0]), x)
    escaped: list[Any] = []

    def leak(x: Any) -> Any:
        gp.fori_loop(2, lambda i, c: escaped.append(c * 2) or c, x[0])
        return escaped[0]

    assert "loop body" in refused(leak, x)


def test_inline_data_is_bounded() -> None:
    big = np.zeros(MAX_INLINE_BYTES // 8 + 1)
    assert "pool.replicate" in refused(lambda b: b + 1, big)


def test_random_draws_inside_a_task_are_ops_of_its_program() -> None:
    def init(x: Any, seed: int) -> Any:
        rng = gp.random.default_rng(seed)
        w = rng.standard_normal((8, 3), dtype=np.float32) * 0.1
        return x @ w, rng.random(), rng.uniform(-1, 1, (4,))

    traced = trace(init, (Data(X), 7), {}, bound=bound)
    assert {"random_normal", "random_uniform"} <= {op.op for op in traced.ops}
    y, u, v = run_traced(init, Data(X), 7)
    y2, u2, _ = run_traced(init, Data(X), 7)
    assert y.shape == (64, 3)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y2)  # the same seed, the same numbers
    assert 0 <= u < 1
    assert u == u2
    assert ((v >= -1) & (v < 1)).all()
    assert not np.array_equal(run_traced(init, Data(X), 8)[0], y)
