"""The op vocabulary of programs (``Op.op``), shared by the client that writes programs and the agent that
runs them (docs/contracts.md). Names are NumPy's."""

from __future__ import annotations

from typing import Final

__all__ = ["BINARY", "ELEMENTWISE", "REDUCTIONS", "UNARY"]

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
    }
)
REDUCTIONS: Final = frozenset({"sum", "prod", "max", "min", "mean", "any", "all"})
ELEMENTWISE: Final = BINARY | UNARY
