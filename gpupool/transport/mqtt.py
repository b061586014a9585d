"""One MQTT session kept alive across broker restarts, on top of aiomqtt.

The agent and the coordinator each hold one :class:`MqttSession`. It reconnects with capped, jittered
backoff, runs ``on_connect`` after every (re)connect so retained state is published again and
subscriptions are renewed, and hands each message to ``on_message``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiomqtt

from gpupool._config import BrokerAddress, Timeouts
from gpupool._errors import ConnectError, DeadlineExceeded
from gpupool.transport.backoff import Backoff

__all__ = ["LastWill", "MessageHandler", "MqttSession"]

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], Awaitable[None]]
"""Called as ``handler(topic, payload, retained)`` for each message, one at a time, in arrival order."""


@dataclass(frozen=True, slots=True)
class LastWill:
    """What the broker publishes when the session drops without a clean disconnect."""

    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


class MqttSession:
    """A reconnecting MQTT session.

    One reader (the receive loop inside :meth:`run`) and any number of writers (:meth:`publish`).

    Args:
        broker: where the broker listens.
        client_id: the MQTT client identifier; unique per broker.
        subscriptions: topic filters subscribed after every connect.
        on_message: called for each message received.
        on_connect: called after every connect, before subscribing; publish retained state here.
        will: the last will, or None.
        timeouts: deadlines for connect and publish.
        backoff: the reconnect policy; ``attempts=None`` retries until closed.
        keepalive: seconds between MQTT pings; the broker declares us gone after 1.5 times this.
    """

    def __init__(
        self,
        *,
        broker: BrokerAddress,
        client_id: str,
        subscriptions: Sequence[str] = (),
        on_message: MessageHandler | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        will: LastWill | None = None,
        timeouts: Timeouts = Timeouts(),
        backoff: Backoff = Backoff(base=0.2, cap=5.0, attempts=None),
        keepalive: int = 10,
    ) -> None:
        self._broker = broker
        self._client_id = client_id
        self._subscriptions = tuple(subscriptions)
        self._on_message = on_message
        self._on_connect = on_connect
        self._will = will
        self._timeouts = timeouts
        self._backoff = backoff
        self._keepalive = keepalive
        self._client: aiomqtt.Client | None = None
        self._closing = False
        self.connected = asyncio.Event()
        self.last_error = "not connected yet"  # why the session is down, for operators
        self.connects = 0  # successful connects so far; tests watch it across broker restarts

    def _new_client(self) -> aiomqtt.Client:
        will = None
        if self._will is not None:
            will = aiomqtt.Will(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        return aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            username=self._broker.username,
            password=self._broker.password,
            identifier=self._client_id,
            will=will,
            clean_session=True,
            keepalive=self._keepalive,
            timeout=self._timeouts.connect,
            tls_context=ssl.create_default_context() if self._broker.tls else None,
            max_queued_incoming_messages=100_000,
        )

    async def run(self) -> None:
        """Connect, serve, and reconnect until :meth:`close` or cancellation.

        Raises:
            ConnectError: the backoff policy's attempts ran out.
        """
        delays = self._backoff.delays()
        while not self._closing:
            client = self._new_client()
            try:
                async with client:
                    self._client = client
                    self.connects += 1
                    delays = self._backoff.delays()  # a good connect resets the backoff
                    if self._on_connect is not None:
                        await self._on_connect()
                    for topic_filter in self._subscriptions:
                        await client.subscribe(topic_filter, qos=1)
                    self.connected.set()
                    log.info("mqtt %s: connected to %s", self._client_id, self._broker.url())
                    async for message in client.messages:
                        if self._on_message is not None:
                            payload = message.payload
                            data = payload if isinstance(payload, bytes) else str(payload).encode()
                            await self._on_message(message.topic.value, data, bool(message.retain))
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc) or type(exc).__name__
                if self._closing:
                    return
                log.warning("mqtt %s: %s; reconnecting", self._client_id, exc)
            finally:
                self.connected.clear()
                self._client = None
            delay = next(delays, None)
            if delay is None:
                raise ConnectError(self._broker.url(), "gave up reconnecting to the MQTT broker")
            await asyncio.sleep(delay)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Publish one message.

        Raises:
            ConnectError: not connected to the broker right now.
            DeadlineExceeded: the broker did not acknowledge in time.
        """
        client = self._client  # set from connect (on_connect included) until the session drops
        if client is None:
            raise ConnectError(self._broker.url(), "not connected to the MQTT broker")
        try:
            async with asyncio.timeout(self._timeouts.rpc):
                await client.publish(topic, payload, qos=qos, retain=retain)
        except TimeoutError as exc:
            raise DeadlineExceeded(self._broker.url(), f"publish to {topic}") from exc
        except aiomqtt.MqttError as exc:
            raise ConnectError(self._broker.url(), f"publish to {topic}: {exc}") from exc

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a deadline, not a cancel scope
        """Wait until the session is connected and subscribed.

        Raises:
            ConnectError: not connected within ``timeout`` (default: the connect deadline).
        """
        try:
            async with asyncio.timeout(timeout if timeout is not None else self._timeouts.connect):
                await self.connected.wait()
        except TimeoutError as exc:
            raise ConnectError(self._broker.url(), "no MQTT session within the connect deadline") from exc

    async def close(self, *, final: tuple[str, bytes] | None = None) -> None:
        """Stop reconnecting; publish ``final`` (topic, payload) retained first if connected.

        A clean disconnect means the broker does not send the last will, so an agent passes its
        offline status here.
        """
        self._closing = True
        client = self._client
        if client is not None and final is not None and self.connected.is_set():
            try:
                async with asyncio.timeout(self._timeouts.connect):
                    await client.publish(final[0], final[1], qos=1, retain=True)
            except (TimeoutError, aiomqtt.MqttError) as exc:
                log.warning("mqtt %s: final publish failed: %s", self._client_id, exc)
