"""The newer op families on CuPy give what they give on NumPy (skipped where CuPy cannot reach a CUDA device).

CuPy is imported inside the tests only, so collecting this module never needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpupool.agent.ops import TABLE, OpArgs, apply_op

from .ops_more_helpers import expect

pytestmark = pytest.mark.gpu

RNG = np.random.default_rng(8)
A = RNG.standard_normal((6, 5))
WITH_NAN = np.where(RNG.random((6, 5)) < 0.2, np.nan, A)
INTS = RNG.integers(-9, 9, (6, 5))

# (name, operands, result dtype, params, axes, keepdims)
CASES: list[tuple[str, list[Any], str, list[int], list[int], bool]] = [
    ("clip", [A, -0.5, 0.5], "float64", [], [], False),
    ("where", [A > 0, A, 0.0], "float64", [], [], False),
    ("round", [A], "float64", [2], [], False),
    ("sum", [A], "float64", [], [0, 1], True),
    ("mean", [A], "float64", [], [1], False),
    ("var", [A], "float64", [1], [0], False),
    ("std", [A], "float64", [1], [], True),
    ("argmax", [A], "int64", [], [1], False),
    ("argmin", [A], "int64", [], [], False),
    ("count_nonzero", [INTS], "int64", [], [0], True),
    ("nansum", [WITH_NAN], "float64", [], [0], False),
    ("nanprod", [WITH_NAN], "float64", [], [], False),
    ("nanmax", [WITH_NAN], "float64", [], [1], False),
    ("nanmin", [WITH_NAN], "float64", [], [0], True),
    ("nanmean", [WITH_NAN], "float64", [], [0], False),
    ("moments", [A], "float64", [], [0], False),
    ("argmax_partial", [A], "float64", [], [], False),
    ("argmin_partial", [INTS], "int64", [], [1], False),
    ("cumsum", [A], "float64", [0], [], False),
    ("cumprod", [INTS], "int64", [1], [], False),
    ("sort", [A], "float64", [0], [], False),
    ("argsort", [INTS], "int64", [1], [], False),
    ("slice", [A], "float64", [5, 0, -2, 1, 5, 3], [], False),
    ("take", [A, np.array([5, -1, 0])], "float64", [0], [], False),
    ("compress", [A, A[:, 0] > 0], "float64", [], [], False),
    ("transpose", [A], "float64", [], [1, 0], False),
    ("reshape", [A], "float64", [3, 10], [], False),
    ("expand_dims", [A], "float64", [-1], [], False),
    ("squeeze", [A[:1]], "float64", [], [0], False),
    ("concatenate", [A, A[:2]], "float64", [0], [], False),
    ("swapaxes", [A], "float64", [0, 1], [], False),
    ("tmatmul", [A, A[:, :2]], "float64", [], [], False),
    ("full", [2.5], "float64", [], [], False),
    # The Array API's elementwise functions, and its newer dtypes (complex, float16, unsigned).
    ("bitwise_and", [INTS, INTS[::-1]], "int64", [], [], False),
    ("left_shift", [np.abs(INTS), 2], "int64", [], [], False),
    ("right_shift", [np.abs(INTS), 1], "int64", [], [], False),
    ("invert", [INTS.astype(np.uint8)], "uint8", [], [], False),
    ("copysign", [A, -1.0], "float64", [], [], False),
    ("nextafter", [A, 0.0], "float64", [], [], False),
    ("logaddexp", [A, A[::-1]], "float64", [], [], False),
    ("float_power", [np.abs(A), 1.5], "float64", [], [], False),
    ("signbit", [A], "bool", [], [], False),
    ("reciprocal", [A], "float64", [], [], False),
    ("conjugate", [A + 1j * A[::-1]], "complex128", [], [], False),
    ("multiply", [(A + 1j).astype(np.complex64), (A - 2j).astype(np.complex64)], "complex64", [], [], False),
    ("add", [A.astype(np.float16), A[::-1].astype(np.float16)], "float16", [], [], False),
    ("arcsinh", [A], "float64", [], [], False),
    ("arccosh", [np.abs(A) + 1], "float64", [], [], False),
    ("arctanh", [np.clip(A, -0.9, 0.9)], "float64", [], [], False),
    ("cbrt", [A], "float64", [], [], False),
    ("arange", [1.5, 0.25], "float64", [7], [], False),
]
SHAPES = {"full": (4, 3), "arange": (9,)}


@pytest.fixture(scope="module")
def backend() -> Any:
    """A CuPy backend on the first usable device, bound to this thread."""
    from gpupool.agent._cupy import CupyBackend, probe_cuda

    chosen = CupyBackend(probe_cuda()[0].index)
    chosen.bind_thread()
    return chosen


def on_device(backend: Any, operand: Any) -> Any:
    return backend.to_device(np.array(operand)) if isinstance(operand, np.ndarray) else operand


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_cupy_gives_what_numpy_gives(
    backend: Any, case: tuple[str, list[Any], str, list[int], list[int], bool]
) -> None:
    name, operands, dtype, params, axes, keepdims = case
    args = OpArgs(params=tuple(params), axes=tuple(axes), keepdims=keepdims)
    shape = SHAPES.get(name) or np.shape(TABLE[name].compute(np, name, operands, expect(dtype, ()), args))
    want = apply_op(np, name, operands, expect(dtype, shape), args=args)
    device_operands = [on_device(backend, operand) for operand in operands]
    host = backend.to_host(apply_op(backend.xp, name, device_operands, expect(dtype, shape), args=args))
    assert host.dtype == want.dtype
    rtol = {"float16": 1e-3, "float32": 1e-6, "complex64": 1e-6}.get(dtype, 1e-9)  # FMA and rounding
    np.testing.assert_allclose(host, want, rtol=rtol, atol=1e-12, equal_nan=True)


def test_cupy_partition_and_random(backend: Any) -> None:
    xp = backend.xp
    got = backend.to_host(
        apply_op(
            xp,
            "partition",
            [backend.to_device(A.copy())],
            expect("float64", A.shape),
            args=OpArgs(params=(0, 2)),
        )
    )
    np.testing.assert_array_equal(got[2], np.sort(A, axis=0)[2])
    for name in ("random_uniform", "random_normal"):
        draws = [
            backend.to_host(
                apply_op(xp, name, [0.0, 1.0], expect("float32", (1000,)), args=OpArgs(params=(3, stream)))
            )
            for stream in (0, 0, 1)
        ]
        np.testing.assert_array_equal(draws[0], draws[1])
        assert not np.array_equal(draws[0], draws[2])
