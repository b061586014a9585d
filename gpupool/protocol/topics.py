"""MQTT topic names under ``<prefix>/v1/``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from gpupool._config import DEFAULT_TOPIC_PREFIX

__all__ = ["COORDINATOR_MQTT_USER", "DYNSEC_CONTROL_TOPIC", "DYNSEC_RESPONSE_TOPIC", "Channel", "Topics"]

#: Where Mosquitto's dynamic-security plugin takes user commands, and where it answers them.
DYNSEC_CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE_TOPIC: Final = f"{DYNSEC_CONTROL_TOPIC}/response"
#: The coordinator's MQTT user on a secure broker (its admin); no agent may take the name.
COORDINATOR_MQTT_USER: Final = "gpupool-coordinator"

Channel = Literal["status", "telemetry", "commands"]
_CHANNELS: tuple[Channel, ...] = ("status", "telemetry", "commands")


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one pool. Tests give each run its own prefix so pools never meet.

    Args:
        prefix: the first topic level, ``gpupool`` unless several pools share a broker.
    """

    prefix: str = DEFAULT_TOPIC_PREFIX

    @property
    def root(self) -> str:
        """``<prefix>/v1/agents``."""
        return f"{self.prefix}/v1/agents"

    def status(self, agent_id: str) -> str:
        """The agent's retained status topic."""
        return f"{self.root}/{agent_id}/status"

    def telemetry(self, agent_id: str) -> str:
        """The agent's periodic telemetry topic."""
        return f"{self.root}/{agent_id}/telemetry"

    def commands(self, agent_id: str) -> str:
        """Where the coordinator sends the agent commands."""
        return f"{self.root}/{agent_id}/commands"

    def all_of(self, channel: Channel) -> str:
        """A filter matching that channel of every agent."""
        return f"{self.root}/+/{channel}"

    def parse(self, topic: str) -> tuple[str, Channel] | None:
        """``(agent_id, channel)`` for one of this pool's agent topics, else None.

        Filtering here, not only in the subscription, matters: one pure-Python broker delivers
        retained messages to clients that never subscribed to them.
        """
        head = self.root + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or not parts[0]:
            return None
        agent_id, channel = parts
        for known in _CHANNELS:
            if channel == known:
                return agent_id, known
        return None
