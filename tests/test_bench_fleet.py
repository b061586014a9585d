"""The benchmark's fleet section at a small scale, so its machinery stays working; no figure is checked."""

from __future__ import annotations

import asyncio
import math

import aiomqtt
import pytest

from bench.fleet import measure, results
from gpupool._config import parse_broker_url


@pytest.mark.parametrize("broker", ["own", "shared"])
def test_a_small_fleet_registers_reports_places_and_goes_offline(
    broker: str, request: pytest.FixtureRequest
) -> None:
    """Our own Mosquitto (the bench's default), and a shared one, which must be left without our retained."""
    shared = str(request.getfixturevalue("system_broker_url")) if broker == "shared" else None
    figures = measure(agents=20, processes=2, broker_url=shared, place_calls=5, telemetry_every=0.5)
    assert (figures.registered, figures.reporting, figures.offline) == (20, 20, 20)
    assert figures.place_fleet_shards == 20
    rows = results(figures)
    assert len({row.name for row in rows}) == len(rows)
    assert all(math.isfinite(row.value) and row.value > 0 for row in rows), rows
    if shared is not None:
        assert asyncio.run(_retained(shared, f"{figures.prefix}/#")) == []


async def _retained(url: str, topic_filter: str) -> list[str]:
    """Topics under the filter that still hold a retained message on the broker."""
    broker = parse_broker_url(url)
    found: list[str] = []
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic_filter, qos=1)
        try:
            async with asyncio.timeout(0.5):
                async for message in client.messages:
                    found.append(message.topic.value)
        except TimeoutError:
            pass
    return found
