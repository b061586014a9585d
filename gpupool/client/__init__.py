"""The client shim: a local proxy device whose arrays are handles to shards on remote GPUs."""

from gpupool.client import composite  # noqa: F401 - registers the composed NumPy functions
from gpupool.client.array import RemoteArray, compute, persist
from gpupool.client.creation import (
    arange,
    asarray,
    empty,
    empty_like,
    eye,
    full,
    full_like,
    linspace,
    ones,
    ones_like,
    zeros,
    zeros_like,
)
from gpupool.client.current import current_pool
from gpupool.client.pool import Pool, connect
from gpupool.client.types import AgentInfo, GpuInfo, Shard

__all__ = [
    "AgentInfo",
    "GpuInfo",
    "Pool",
    "RemoteArray",
    "Shard",
    "arange",
    "asarray",
    "compute",
    "connect",
    "current_pool",
    "empty",
    "empty_like",
    "eye",
    "full",
    "full_like",
    "linspace",
    "ones",
    "ones_like",
    "persist",
    "zeros",
    "zeros_like",
]
