"""The client shim: a local proxy device whose arrays are handles to shards on remote GPUs."""

from gpupool.client.array import RemoteArray, persist
from gpupool.client.pool import Pool, connect
from gpupool.client.types import AgentInfo, GpuInfo, Shard

__all__ = ["AgentInfo", "GpuInfo", "Pool", "RemoteArray", "Shard", "connect", "persist"]
