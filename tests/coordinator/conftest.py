"""Fixtures for the coordinator's tests: the coordinator as a subprocess, the test's topics."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpupool._process import Child, spawn
from gpupool.protocol.topics import Topics
from gpupool.security.store import StateStore

StartCoordinator = Callable[..., Child]


def admin_token(state_dir: Path) -> str:
    """A new admin token in a coordinator's state dir (as ``gpupool token create --role admin`` makes)."""
    with StateStore.open(state_dir) as store:
        token, _ = store.create_token(role="admin", name="tests", ttl=None, now=time.time())
    return token


@pytest.fixture
def start_coordinator() -> Iterator[StartCoordinator]:
    """``start_coordinator(broker_url, topic_prefix, *extra, state_dir=None)``: a coordinator process.

    It keeps its state in a temporary dir (or ``state_dir``) holding an admin token,
    ``child.ready["token"]``, and believes unsigned statuses (``--allow-unenrolled``: the simulated and
    ``--insecure`` agents these tests use never enrol). Stopped after the test.
    """
    children: list[Child] = []
    scratch = tempfile.TemporaryDirectory(prefix="gpupool-coordinator-")

    def start(broker_url: str, prefix: str, *extra: str, state_dir: Path | None = None) -> Child:
        state = state_dir or Path(tempfile.mkdtemp(dir=scratch.name))
        token = admin_token(state)
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
            "--state-dir",
            str(state),
            "--allow-unenrolled",
            "--min-shard-bytes",  # the tests' arrays are small: split them anyway, to test the splits
            "0",
            *extra,
        ]
        child = spawn("coordinator", argv, timeout=30)
        child.ready["token"] = token
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop(timeout=10)
    scratch.cleanup()


@pytest.fixture
def topics(topic_prefix: str) -> Topics:
    return Topics(topic_prefix)
