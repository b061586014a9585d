"""The embedded MQTT broker for a pool on one machine.

``gpupool up`` starts one when given no broker URL: Mosquitto from PATH where there is one (configured
with TCP_NODELAY, which Debian's default leaves off at a cost of ~40 ms per retained message), else
amqtt, a pure-Python broker, in a subprocess (``python -m gpupool.broker``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from gpupool._errors import ConnectError, UsageError
from gpupool._process import Child, spawn

__all__ = ["BrokerKind", "free_port", "mosquitto_config", "start_broker", "wait_for_port"]

BrokerKind = Literal["auto", "mosquitto", "amqtt"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for programs that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Raises:
        ConnectError: nothing listens within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectError(f"{host}:{port}", f"no broker listening after {timeout:.0f} s") from exc
            time.sleep(0.05)


def mosquitto_config(host: str, port: int) -> str:
    """The Mosquitto configuration for an embedded, anonymous, non-persistent broker."""
    return (
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "set_tcp_nodelay true\n"
        "max_queued_messages 100000\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


def start_broker(
    kind: BrokerKind = "auto", *, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0
) -> Child:
    """Start a broker and return once it accepts connections; ``child.ready["url"]`` is its URL.

    Raises:
        UsageError: ``kind="mosquitto"`` with no mosquitto on PATH.
        ConnectError: the broker did not come up.
    """
    mosquitto = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if kind == "mosquitto" and mosquitto is None:
        raise UsageError("no mosquitto on PATH; install it or use the amqtt broker")
    if kind == "amqtt" or mosquitto is None:
        return spawn(
            "broker",
            [sys.executable, "-m", "gpupool.broker", "--host", host, "--port", str(port)],
            timeout=timeout,
        )
    port = port or free_port(host)
    config = Path(tempfile.mkdtemp(prefix="gpupool-broker-")) / "mosquitto.conf"
    config.write_text(mosquitto_config(host, port))
    process = subprocess.Popen(
        [mosquitto, "-c", str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    child = Child("broker", process)
    try:
        wait_for_port(host, port, timeout)
    except ConnectError:
        child.kill()
        raise
    if not child.alive():
        raise ConnectError(f"{host}:{port}", f"mosquitto exited with code {process.returncode}")
    child.ready = {
        "event": "ready",
        "role": "broker",
        "kind": "mosquitto",
        "url": f"mqtt://{host}:{port}",
        "host": host,
        "port": port,
    }
    return child
