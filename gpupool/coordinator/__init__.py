"""The coordinator: the agents' registry over MQTT, placement, jobs, and the client and admin gRPC API.

Run it with ``gpupool coordinator --broker URL --listen HOST:PORT`` or ``python -m gpupool.coordinator``;
embed it with :class:`Coordinator`. It never imports the agent: the two share only :mod:`gpupool.protocol`.
"""

from __future__ import annotations

from gpupool.coordinator.runtime import Coordinator

__all__ = ["Coordinator"]
