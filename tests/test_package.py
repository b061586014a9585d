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
    functions = {
        "abs",
        "absolute",
        "add",
        "all",
        "any",
        "arccos",
        "arcsin",
        "arctan",
        "arctan2",
        "ceil",
        "cos",
        "cosh",
        "divide",
        "equal",
        "exp",
        "exp2",
        "expm1",
        "floor",
        "floor_divide",
        "fmax",
        "fmin",
        "greater",
        "greater_equal",
        "hypot",
        "isfinite",
        "isinf",
        "isnan",
        "less",
        "less_equal",
        "log",
        "log10",
        "log1p",
        "log2",
        "logical_and",
        "logical_not",
        "logical_or",
        "logical_xor",
        "matmul",
        "max",
        "maximum",
        "mean",
        "min",
        "minimum",
        "multiply",
        "negative",
        "not_equal",
        "positive",
        "power",
        "prod",
        "remainder",
        "rint",
        "sign",
        "sin",
        "sinh",
        "sqrt",
        "square",
        "subtract",
        "sum",
        "tan",
        "tanh",
        "true_divide",
        "trunc",
        "where",
    }
    assert set(gp.__all__) == core | creation | functions
    for name in gp.__all__:
        assert hasattr(gp, name), name


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
