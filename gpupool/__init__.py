"""gpupool: many small GPUs on a network, programmed as one device from Python.

    import numpy as np, gpupool as gp

    with gp.connect() as pool:                     # $GPUPOOL_COORDINATOR, else 127.0.0.1:50051
        x = pool.asarray(np.random.rand(4096, 512).astype(np.float32))
        y = np.tanh(x @ np.ones((512, 64), np.float32)) * 2 + 1
        print(float(y.sum()), x.shards)

Importing gpupool loads neither CuPy nor NVML: those are the agent's, loaded lazily there.
"""

from gpupool import _creation, _dtypes, _functions, fft, linalg, random
from gpupool._config import Timeouts
from gpupool._creation import *  # noqa: F403 - the creation functions, listed in _creation.__all__
from gpupool._dtypes import *  # noqa: F403 - the standard's dtypes and inspection API
from gpupool._errors import (
    AgentLost,
    AgentNotAccepting,
    ArrayFreed,
    AuthError,
    BufferMoved,
    BufferNotFound,
    ConnectError,
    DeadlineExceeded,
    DeviceOutOfMemory,
    FrameDecodeError,
    GpupoolError,
    NoCapacity,
    PlacementError,
    ProtocolError,
    RemoteError,
    RemoteKernelError,
    SchedulingError,
    ShapeMismatch,
    ShardsLost,
    StreamClosed,
    TransportError,
    UnsupportedDType,
    UsageError,
    VersionMismatch,
)
from gpupool._functions import *  # noqa: F403 - the namespace's functions, listed in _functions.__all__
from gpupool._version import __version__
from gpupool._warnings import HostFallbackWarning
from gpupool.client import AgentInfo, GpuInfo, Pool, RemoteArray, Shard, compute, connect, persist
from gpupool.client.coverage import coverage
from gpupool.client.current import current_pool
from gpupool.client.tasks import Replicated, TaskFuture
from gpupool.client.trace import TracingError, fori_loop
from gpupool.client.values import PendingValue
from gpupool.fuse import fuse
from gpupool.kernels import ElementwiseKernel, RawKernel, ReductionKernel

#: The Array API standard this namespace implements (``x.__array_namespace__()`` is this package).
__array_api_version__ = "2024.12"

__all__ = [
    "AgentInfo",
    "AgentLost",
    "AgentNotAccepting",
    "ArrayFreed",
    "AuthError",
    "BufferMoved",
    "BufferNotFound",
    "ConnectError",
    "DeadlineExceeded",
    "DeviceOutOfMemory",
    "ElementwiseKernel",
    "FrameDecodeError",
    "GpuInfo",
    "GpupoolError",
    "HostFallbackWarning",
    "NoCapacity",
    "PendingValue",
    "PlacementError",
    "Pool",
    "ProtocolError",
    "RawKernel",
    "ReductionKernel",
    "RemoteArray",
    "RemoteError",
    "RemoteKernelError",
    "Replicated",
    "SchedulingError",
    "ShardsLost",
    "Shard",
    "ShapeMismatch",
    "StreamClosed",
    "TaskFuture",
    "Timeouts",
    "TracingError",
    "TransportError",
    "UnsupportedDType",
    "UsageError",
    "VersionMismatch",
    "__version__",
    "compute",
    "connect",
    "coverage",
    "current_pool",
    "fft",
    "fori_loop",
    "fuse",
    "linalg",
    "persist",
    "random",
    *_creation.__all__,
    *_dtypes.__all__,
    *_functions.__all__,
]
