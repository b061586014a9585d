"""The op vocabulary of programs (``Op.op``), shared by the client that writes programs and the agent that
runs them (docs/contracts.md). Names are NumPy's where NumPy has the function.

:data:`ELEMENTWISE` (:data:`BINARY` and :data:`UNARY`) are the ufuncs the client exposes as ``gp.<name>``, and
:data:`REDUCTIONS` the reductions it has always sent; they stay as they are. The families after them
(operands, params and results in docs/contracts.md) are the rest of what an agent runs; :data:`ALL_OPS` is
every name an agent accepts.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ALL_OPS",
    "BINARY",
    "CONTRACTIONS",
    "CREATION",
    "ELEMENTWISE",
    "ELEMENTWISE_MORE",
    "LAYOUT",
    "ORDERING",
    "PARTIALS",
    "REDUCTIONS",
    "REDUCTIONS_MORE",
    "SCANS",
    "UNARY",
]

BINARY: Final = frozenset(
    {
        "add",
        "subtract",
        "multiply",
        "divide",
        "floor_divide",
        "remainder",
        "power",
        "maximum",
        "minimum",
        "fmax",
        "fmin",
        "arctan2",
        "hypot",
        "equal",
        "not_equal",
        "less",
        "less_equal",
        "greater",
        "greater_equal",
        "logical_and",
        "logical_or",
        "logical_xor",
        "bitwise_and",
        "bitwise_or",
        "bitwise_xor",
        "left_shift",
        "right_shift",
        "copysign",
        "nextafter",
        "logaddexp",
        "float_power",
    }
)
UNARY: Final = frozenset(
    {
        "negative",
        "positive",
        "absolute",
        "sign",
        "exp",
        "exp2",
        "expm1",
        "log",
        "log2",
        "log10",
        "log1p",
        "sqrt",
        "square",
        "sin",
        "cos",
        "tan",
        "arcsin",
        "arccos",
        "arctan",
        "sinh",
        "cosh",
        "tanh",
        "floor",
        "ceil",
        "rint",
        "trunc",
        "logical_not",
        "isnan",
        "isinf",
        "isfinite",
        "invert",
        "signbit",
        "reciprocal",
        "conjugate",
        "arcsinh",
        "arccosh",
        "arctanh",
        "cbrt",
    }
)
REDUCTIONS: Final = frozenset({"sum", "prod", "max", "min", "mean", "any", "all"})
ELEMENTWISE: Final = BINARY | UNARY

#: Elementwise ops beyond the ufuncs: three operands (``clip``, ``where``) or a param (``round``).
ELEMENTWISE_MORE: Final = frozenset({"clip", "where", "round"})
#: Reductions beyond :data:`REDUCTIONS`, over ``axes`` with ``keepdims`` like them.
REDUCTIONS_MORE: Final = frozenset(
    {"var", "std", "argmax", "argmin", "count_nonzero", "nansum", "nanprod", "nanmax", "nanmin", "nanmean"}
)
#: Per-shard partial results the client combines across shards (layouts in docs/contracts.md).
PARTIALS: Final = frozenset({"moments", "argmax_partial", "argmin_partial"})
#: Running totals along an axis.
SCANS: Final = frozenset({"cumsum", "cumprod"})
#: Sorting along an axis.
ORDERING: Final = frozenset({"sort", "argsort", "partition"})
#: Moving elements within a shard.
LAYOUT: Final = frozenset(
    {"slice", "take", "compress", "transpose", "reshape", "expand_dims", "squeeze", "concatenate", "swapaxes"}
)
#: Arrays made on the agent, from scalar operands and params.
CREATION: Final = frozenset({"full", "arange", "random_uniform", "random_normal"})
#: Matrix products: ``matmul`` (x @ y) and ``tmatmul`` (x.T @ y, a shard's part of a sharded x.T @ y).
CONTRACTIONS: Final = frozenset({"matmul", "tmatmul"})
#: Every op an agent runs.
ALL_OPS: Final = (
    ELEMENTWISE
    | REDUCTIONS
    | ELEMENTWISE_MORE
    | REDUCTIONS_MORE
    | PARTIALS
    | SCANS
    | ORDERING
    | LAYOUT
    | CREATION
    | CONTRACTIONS
    | {"astype"}
)
