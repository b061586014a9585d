"""The Array API's ``linalg`` extension in the ``gpupool`` namespace (``gp.linalg``).

Norms of remote arrays run on the pool (squares, absolute values, sums and maxima on the agents); the
factorizations and solvers are NumPy's on the host copy, with :class:`~gpupool.HostFallbackWarning`, their
results uploaded back: they are for small matrices here, not sharded linear algebra.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpupool import _functions as _f
from gpupool.client import composite
from gpupool.client.array import RemoteArray
from gpupool.client.dispatch import Unsupported
from gpupool.client.namespace import call, lift, to_namespace

__all__ = [
    "cholesky",
    "cross",
    "det",
    "diagonal",
    "eigh",
    "eigvalsh",
    "inv",
    "matmul",
    "matrix_norm",
    "matrix_power",
    "matrix_rank",
    "matrix_transpose",
    "norm",
    "outer",
    "pinv",
    "qr",
    "slogdet",
    "solve",
    "svd",
    "svdvals",
    "tensordot",
    "trace",
    "vecdot",
    "vector_norm",
]

cholesky = lift(np.linalg.cholesky)
cross = lift(np.linalg.cross)
det = lift(np.linalg.det)
diagonal = lift(np.linalg.diagonal)
eigh = lift(np.linalg.eigh)
eigvalsh = lift(np.linalg.eigvalsh)
inv = lift(np.linalg.inv)
matrix_norm = lift(np.linalg.matrix_norm)
matrix_power = lift(np.linalg.matrix_power)
matrix_rank = lift(np.linalg.matrix_rank)
outer = lift(np.linalg.outer)
pinv = lift(np.linalg.pinv)
qr = lift(np.linalg.qr)
slogdet = lift(np.linalg.slogdet)
solve = lift(np.linalg.solve)
svd = lift(np.linalg.svd)
svdvals = lift(np.linalg.svdvals)
trace = lift(np.linalg.trace)
matmul = _f.matmul
matrix_transpose = _f.matrix_transpose
tensordot = _f.tensordot
vecdot = _f.vecdot


def vector_norm(x: Any, /, *, axis: Any = None, keepdims: bool = False, ord: Any = 2) -> Any:
    """The ``ord``-norm of ``x``'s vectors along ``axis`` (None: all elements as one vector); on the pool
    for orders 1, 2, inf and -inf of floating arrays."""
    if isinstance(x, RemoteArray):
        try:
            return to_namespace(composite.vector_norm(x, axis=axis, keepdims=keepdims, ord=ord), x.session)
        except Unsupported:
            pass
    return call(np.linalg.vector_norm, (x,), {"axis": axis, "keepdims": keepdims, "ord": ord})


def norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> Any:
    """NumPy's ``linalg.norm`` (vector norms on the pool, as ``np.linalg.norm`` of a remote array)."""
    return call(np.linalg.norm, (x,), {"ord": ord, "axis": axis, "keepdims": keepdims})
