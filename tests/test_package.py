"""The public surface: what `import gpupool` gives, and what it must not load."""

from __future__ import annotations

import subprocess
import sys

import gpupool as gp


def test_import_loads_neither_cupy_nor_nvml() -> None:
    code = "import gpupool, sys; assert not {'cupy', 'pynvml'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_names_are_pinned() -> None:
    core = {
        "AgentInfo",
        "AgentLost",
        "AgentNotAccepting",
        "ArrayFreed",
        "AuthError",
        "BufferNotFound",
        "ConnectError",
        "DeadlineExceeded",
        "DeviceOutOfMemory",
        "FrameDecodeError",
        "GpuInfo",
        "GpupoolError",
        "HostFallbackWarning",
        "NoCapacity",
        "PlacementError",
        "Pool",
        "ProtocolError",
        "RemoteArray",
        "RemoteError",
        "RemoteKernelError",
        "SchedulingError",
        "Shard",
        "ShapeMismatch",
        "StreamClosed",
        "Timeouts",
        "TransportError",
        "UnsupportedDType",
        "UsageError",
        "VersionMismatch",
        "__version__",
        "compute",
        "connect",
        "coverage",
        "persist",
    }
    creation = {
        "arange",
        "asarray",
        "current_pool",
        "empty",
        "empty_like",
        "eye",
        "full",
        "full_like",
        "linspace",
        "ones",
        "ones_like",
        "random",
        "zeros",
        "zeros_like",
    }
    creation |= {"from_dlpack", "meshgrid", "tril", "triu"}
    core |= {"PendingValue", "fft", "linalg", "__array_namespace_info__"}
    core |= {"ElementwiseKernel", "RawKernel", "ReductionKernel", "fuse"}
    core |= {"Replicated", "TaskFuture", "TracingError", "fori_loop"}
    core |= {"BufferMoved", "ShardsLost"}
    dtypes = {"bool", "complex64", "complex128", "float16", "float32", "float64"}
    dtypes |= {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    # The Array API standard's functions (2024.12) and constants, and NumPy's names of the same ufuncs.
    standard = set(ARRAY_API_FUNCTIONS.split()) | {"e", "inf", "nan", "pi", "newaxis"}
    functions = set(gp._functions.__all__)
    assert standard <= functions | creation | {"__array_namespace_info__"}
    assert {"absolute", "arccos", "arctan2", "power", "true_divide", "logical_not", "rint"} <= functions
    assert set(gp.__all__) == core | creation | dtypes | functions
    assert gp.__array_api_version__ == "2024.12"
    for name in gp.__all__:
        assert hasattr(gp, name), name


#: Every function of the Array API standard 2024.12 outside its extensions (its creation functions too).
ARRAY_API_FUNCTIONS = """
abs acos acosh add asin asinh atan atan2 atanh bitwise_and bitwise_left_shift bitwise_invert bitwise_or
bitwise_right_shift bitwise_xor ceil clip conj copysign cos cosh divide equal exp expm1 floor floor_divide
greater greater_equal hypot imag isfinite isinf isnan less less_equal log log1p log2 log10 logaddexp
logical_and logical_not logical_or logical_xor maximum minimum multiply negative nextafter not_equal positive
pow real reciprocal remainder round sign signbit sin sinh square sqrt subtract tan tanh trunc all any diff
cumulative_sum cumulative_prod max mean min prod std sum var astype can_cast finfo iinfo isdtype result_type
argsort sort unique_all unique_counts unique_inverse unique_values arange asarray empty empty_like eye
from_dlpack full full_like linspace meshgrid ones ones_like tril triu zeros zeros_like argmax argmin
count_nonzero nonzero searchsorted where broadcast_arrays broadcast_to concat expand_dims flip moveaxis
permute_dims repeat reshape roll squeeze stack tile unstack take take_along_axis matmul matrix_transpose
tensordot vecdot
"""


def test_errors_form_the_documented_tree() -> None:
    assert issubclass(gp.ConnectError, gp.TransportError)
    assert issubclass(gp.NoCapacity, gp.SchedulingError)
    assert issubclass(gp.DeviceOutOfMemory, gp.RemoteError)
    assert issubclass(gp.BufferNotFound, gp.RemoteError)
    assert issubclass(gp.UnsupportedDType, gp.UsageError)
    assert issubclass(gp.UnsupportedDType, TypeError)
    assert issubclass(gp.ShapeMismatch, ValueError)
    for name in gp.__all__:
        value = getattr(gp, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, gp.GpupoolError)
    error = gp.DeviceOutOfMemory("a1", "over the limit", buffer_id="job-1.4")
    assert (error.agent_id, error.buffer_id, error.remote_message) == ("a1", "job-1.4", "over the limit")
    assert "a1" in str(error)
    assert "job-1.4" in str(error)
