"""Shared fixtures: real MQTT brokers, per-test topic prefixes, subprocess helpers.

Brokers:
    ``system_broker_url``  the Mosquitto on 127.0.0.1:1883 (``.ci/run`` starts one where it is absent).
    ``broker_url``         parametrized over that Mosquitto and the embedded broker ``gpupool up``
                           would start (Mosquitto from PATH here), plus amqtt, the pure-Python fallback.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from gpupool._process import Child
from gpupool.broker import start_broker

SYSTEM_BROKER = os.environ.get("GPUPOOL_TEST_BROKER", "mqtt://127.0.0.1:1883")


def _reachable(url: str) -> bool:
    host, _, port = url.removeprefix("mqtt://").partition(":")
    try:
        with socket.create_connection((host, int(port or 1883)), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def system_broker_url() -> str:
    """The Mosquitto the machine runs on 127.0.0.1:1883."""
    if not _reachable(SYSTEM_BROKER):
        pytest.fail(
            f"no MQTT broker at {SYSTEM_BROKER}: start mosquitto (.ci/run does) or set GPUPOOL_TEST_BROKER"
        )
    return SYSTEM_BROKER


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[Child]:
    """The broker ``gpupool up`` starts with no broker URL (Mosquitto from PATH, else amqtt)."""
    child = start_broker("auto")
    yield child
    child.stop()


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[Child]:
    """amqtt, the pure-Python broker used where no Mosquitto is installed."""
    child = start_broker("amqtt")
    yield child
    child.stop()


@pytest.fixture(params=["system-mosquitto", "embedded", "amqtt"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each broker kind a pool may run on, in turn."""
    if request.param == "system-mosquitto":
        return str(request.getfixturevalue("system_broker_url"))
    child: Child = request.getfixturevalue(
        "embedded_broker" if request.param == "embedded" else "amqtt_broker"
    )
    return str(child.ready["url"])


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix of this test's own, so tests sharing a broker never see each other's agents."""
    return f"gpupool-test-{uuid.uuid4().hex[:10]}"


def _cuda_available() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests where CuPy cannot reach a CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
