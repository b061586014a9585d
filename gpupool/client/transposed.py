"""``x.T`` of a row-sharded 2-D array: a pending transpose that ``@`` turns into per-shard ``tmatmul``.

Transposing moves the sharded axis, so ``x.T`` is kept as a :class:`Transposed` view of ``x``. ``x.T @ y``
(and ``x.T @ x``) with ``y`` a remote array laid out as ``x`` runs ``tmatmul`` on each shard, and the small
partial products are summed on the client: the result is a NumPy array. Anything else done with the view
runs on its host copy (``numpy.transpose`` falls back with the one-time warning).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gpupool.client.coverage import count, run_on_host
from gpupool.client.graph import GraphArray, ProgramBuilder, make_op, run_programs
from gpupool.client.layout import layout_key
from gpupool.client.operands import buffer_operand

__all__ = ["Transposed", "tmatmul"]


def tmatmul(x: GraphArray, y: GraphArray) -> np.ndarray:
    """``x.T @ y`` for a 2-D ``x`` and a 1-D or 2-D ``y`` with the same row layout: one ``tmatmul`` per
    non-empty shard, partials fetched and summed here.

    Raises:
        ValueError: the row counts differ (NumPy's matmul message).
    """
    x.check()
    y.check()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"matmul: mismatch in its core dimension: {x.shape[::-1]} @ {y.shape}")
    dtype = np.matmul(np.zeros((1, 1), x.dtype), np.zeros((1,) * y.ndim, y.dtype)).dtype
    shape = (x.shape[1], *y.shape[1:])
    session = x.session
    programs = []
    for index, piece in enumerate(x.layout):
        rows = piece.stop - piece.start
        if not rows:
            continue
        builder = ProgramBuilder(session, index, piece)
        inputs = [buffer_operand(builder.emit(x)), buffer_operand(builder.emit(y))]
        out = session.new_buffer_id()
        builder.program.ops.append(make_op("tmatmul", inputs, out, dtype, shape))
        builder.program.fetch.append(out)
        builder.program.free.append(out)
        builder.program.work_flops += 2 * rows * math.prod(shape)
        programs.append(builder.program)
    total = np.zeros(shape, dtype)
    for fetched, program in zip(run_programs(session, programs, what="tmatmul"), programs, strict=True):
        total += fetched[program.fetch[-1]]
    return total


class Transposed(np.lib.mixins.NDArrayOperatorsMixin):
    """The transpose of a row-sharded 2-D remote array ``base``, not yet computed (see the module)."""

    __slots__ = ("base",)
    __array_priority__ = 101.0

    def __init__(self, base: GraphArray) -> None:
        self.base = base

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
        """The transposed array on the host (downloaded; counted as a host ``transpose``)."""
        host: np.ndarray = run_on_host("transpose", np.transpose, (self.base,), {})
        return host

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.get()
        return host if dtype is None else host.astype(dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    def __getitem__(self, key: Any) -> Any:
        return self.get()[key]

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if ufunc is np.matmul and method == "__call__" and not kwargs and self._pairs(*inputs):
            count("matmul", "pool")
            return tmatmul(self.base, inputs[1])
        hosts = [v.get() if isinstance(v, Transposed | GraphArray) else v for v in inputs]
        return getattr(ufunc, method)(*hosts, **kwargs)

    def _pairs(self, *inputs: Any) -> bool:
        """Whether ``inputs`` are this view and a remote array laid out as its base (``tmatmul``'s case)."""
        if len(inputs) != 2 or inputs[0] is not self or not isinstance(inputs[1], GraphArray):
            return False
        right = inputs[1]
        same = right.session is self.base.session and layout_key(right.layout) == layout_key(self.base.layout)
        return same and right.ndim in (1, 2)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        def host(value: Any) -> Any:
            if isinstance(value, Transposed | GraphArray):
                return value.get()
            if isinstance(value, list | tuple):
                return type(value)(host(v) for v in value)
            return value

        return func(*host(tuple(args)), **host(dict(kwargs)))
