"""``x.T`` of a row-sharded 2-D array: a pending transpose that ``@`` turns into per-shard ``tmatmul``.

Transposing moves the sharded axis, so ``x.T`` is kept as a :class:`Transposed` view of ``x``. ``x.T @ y``
(and ``x.T @ x``) with ``y`` a remote array runs ``tmatmul`` on each shard of ``x`` (``y`` is moved to
``x``'s layout first, agent to agent, if it is laid out otherwise). Small partial products are fetched
and summed here: the result is a NumPy array. Partials larger than :data:`TREE_BYTES` stay on the agents
and are added by a tree of agents (:func:`gpupool.client.rowmoves.sum_tree`): the result is then a remote
array of one shard. ``x @ y.T`` is :func:`gpupool.client.crossaxis.matmul_transposed`. Anything else done
with the view runs on the transposed remote array, made once by moving rows agent to agent.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from gpupool.client import crossaxis
from gpupool.client.coverage import count, run_on_host
from gpupool.client.dispatch import Unsupported
from gpupool.client.graph import ArraySpec, GraphArray, ProgramBuilder, make_op, run_programs
from gpupool.client.layout import layout_key
from gpupool.client.operands import buffer_operand
from gpupool.client.rowmoves import reshard, sum_tree

__all__ = ["TREE_BYTES", "Transposed", "tmatmul"]

#: Partial products larger than this are added on the agents (a tree), not fetched to the client.
TREE_BYTES: Final = 4 << 20


def tmatmul(x: GraphArray, y: GraphArray) -> Any:
    """``x.T @ y`` for a 2-D ``x`` and a 1-D or 2-D ``y`` of the same rows: one ``tmatmul`` per non-empty
    shard of ``x``; partials summed here (a NumPy array), or by a tree of agents when each is larger than
    :data:`TREE_BYTES` (a remote array of one shard).

    Raises:
        ValueError: the row counts differ (NumPy's matmul message).
    """
    x.check()
    y.check()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"matmul: mismatch in its core dimension: {x.shape[::-1]} @ {y.shape}")
    if layout_key(y.layout) != layout_key(x.layout):
        session = x.session
        targets = [p.with_buffer(session.new_buffer_id()) for p in x.layout]
        y = y._make(  # type: ignore[attr-defined]
            ArraySpec(session=session, shape=y.shape, dtype=y.dtype, layout=reshard(y, targets))
        )
    dtype = np.matmul(np.zeros((1, 1), x.dtype), np.zeros((1,) * y.ndim, y.dtype)).dtype
    shape = (x.shape[1], *y.shape[1:])
    session = x.session
    tree = math.prod(shape) * dtype.itemsize > TREE_BYTES
    programs = []
    for index, piece in enumerate(x.layout):
        rows = piece.stop - piece.start
        if not rows:
            continue
        builder = ProgramBuilder(session, index, piece)
        inputs = [buffer_operand(builder.emit(x)), buffer_operand(builder.emit(y))]
        out = session.new_buffer_id()
        builder.program.ops.append(make_op("tmatmul", inputs, out, dtype, shape))
        if tree:
            builder.program.creates.append(piece.with_buffer(out))
        else:
            builder.program.fetch.append(out)
            builder.program.free.append(out)
        builder.program.work_flops += 2 * rows * math.prod(shape)
        programs.append(builder.program)
    if tree and len(programs) > 1:
        run_programs(session, programs, what="tmatmul")
        partials = [program.creates[-1] for program in programs]
        total = sum_tree(session, partials, shape, dtype)  # rows [0, shape[0]) on one worker
        return x._make(  # type: ignore[attr-defined]
            ArraySpec(session=session, shape=shape, dtype=dtype, layout=(total,))
        )
    if tree:
        for program in programs:  # one shard: its product is the result, fetched
            out = program.creates.pop().buffer_id
            program.fetch.append(out)
            program.free.append(out)
    result = np.zeros(shape, dtype)
    for fetched, program in zip(run_programs(session, programs, what="tmatmul"), programs, strict=True):
        result += fetched[program.fetch[-1]]
    return result


class Transposed(np.lib.mixins.NDArrayOperatorsMixin):
    """The transpose of a row-sharded 2-D remote array ``base``, not yet computed (see the module)."""

    __slots__ = ("_made", "base")
    __array_priority__ = 101.0

    def __init__(self, base: GraphArray) -> None:
        self.base = base
        self._made: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The transposed shape."""
        return self.base.shape[::-1]

    @property
    def dtype(self) -> np.dtype[Any]:
        """The base's dtype."""
        return self.base.dtype

    @property
    def ndim(self) -> int:
        """Number of dimensions (2)."""
        return self.base.ndim

    @property
    def T(self) -> GraphArray:
        """The base array."""
        return self.base

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<gpupool.Transposed of {self.base!r}>"

    def get(self) -> np.ndarray:
        """The transposed array on the host (the base downloaded, transposed here)."""
        return np.ascontiguousarray(self.base.get().T)

    def remote(self) -> Any:
        """The transposed array in the pool, made once (rows moved agent to agent); the host copy, with the
        fallback warning, where the pool cannot (an empty array)."""
        made = self._made
        if made is None:
            try:
                made = self.base._make(crossaxis.transpose_rows(self.base, (1, 0)))  # type: ignore[attr-defined]
            except Unsupported:
                made = run_on_host("transpose", np.transpose, (self.base,), {})
            self._made = made
        return made

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.get()
        return host if dtype is None else host.astype(dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.remote(), name)

    def __getitem__(self, key: Any) -> Any:
        return self.remote()[key]

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if ufunc is np.matmul and method == "__call__" and not kwargs and self._pairs(*inputs):
            count("matmul", "pool")
            return tmatmul(self.base, inputs[1])
        if ufunc is np.matmul and method == "__call__" and not kwargs and self._follows(*inputs):
            count("matmul", "pool")
            return inputs[0]._make(crossaxis.matmul_transposed(inputs[0], self.base))
        values = [v.remote() if isinstance(v, Transposed) else v for v in inputs]
        return getattr(ufunc, method)(*values, **kwargs)

    def _pairs(self, *inputs: Any) -> bool:
        """Whether ``inputs`` are this view and a 1-D or 2-D remote array of its base's pool and rows
        (``tmatmul``'s case)."""
        if len(inputs) != 2 or inputs[0] is not self or not isinstance(inputs[1], GraphArray):
            return False
        right = inputs[1]
        return right.session is self.base.session and right.ndim in (1, 2) and len(right.shape) > 0

    def _follows(self, *inputs: Any) -> bool:
        """Whether ``inputs`` are a 2-D remote array of its base's pool and this view (``x @ y.T``)."""
        if len(inputs) != 2 or inputs[1] is not self or not isinstance(inputs[0], GraphArray):
            return False
        return inputs[0].session is self.base.session and inputs[0].ndim == 2

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.dot and not kwargs and self._pairs(*args):
            count("dot", "pool")
            return tmatmul(self.base, args[1])

        def remote(value: Any) -> Any:
            if isinstance(value, Transposed):
                return value.remote()
            if isinstance(value, list | tuple):
                return type(value)(remote(v) for v in value)
            return value

        return func(*remote(tuple(args)), **remote(dict(kwargs)))
