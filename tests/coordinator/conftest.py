"""Fixtures for the coordinator's tests: the coordinator as a subprocess, the test's topics."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest

from gpupool._process import Child, spawn
from gpupool.protocol.topics import Topics

StartCoordinator = Callable[[str, str], Child]


@pytest.fixture
def start_coordinator() -> Iterator[StartCoordinator]:
    """``start_coordinator(broker_url, topic_prefix)``: a coordinator process, stopped after the test."""
    children: list[Child] = []

    def start(broker_url: str, prefix: str) -> Child:
        argv = [
            sys.executable,
            "-m",
            "gpupool.coordinator",
            "--broker",
            broker_url,
            "--listen",
            "127.0.0.1:0",
            "--topic-prefix",
            prefix,
            "--min-shard-bytes",  # the tests' arrays are small: split them anyway, to test the splits
            "0",
        ]
        child = spawn("coordinator", argv, timeout=30)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop(timeout=10)


@pytest.fixture
def topics(topic_prefix: str) -> Topics:
    return Topics(topic_prefix)
