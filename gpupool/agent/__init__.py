"""The gpupool agent: one process per host, one worker per GPU, serving shards over gRPC.

Run it as ``gpupool-agent`` (:mod:`gpupool.agent.main`); embed it with :class:`Agent`::

    config = AgentConfig(broker=parse_broker_url("mqtt://10.0.0.2"), agent_id="a1", name="rig1")
    async with Agent(config) as agent:
        await agent.run()

Importing this package loads neither CuPy nor NVML: :mod:`gpupool.agent._cupy` and ``pynvml`` are
imported only when the agent starts and looks for GPUs.
"""

from gpupool.agent.backend import ArrayBackend, NumpyBackend
from gpupool.agent.config import AgentConfig, BackendChoice
from gpupool.agent.runtime import Agent

__all__ = ["Agent", "AgentConfig", "ArrayBackend", "BackendChoice", "NumpyBackend"]
