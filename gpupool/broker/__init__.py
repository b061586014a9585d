"""The embedded MQTT broker for a pool on one machine.

``gpupool up`` starts one when given no broker URL: Mosquitto from PATH where there is one (configured
with TCP_NODELAY, which Debian's default leaves off at a cost of ~40 ms per retained message), else
amqtt, a pure-Python broker, in a subprocess (``python -m gpupool.broker``).

Both admit anonymous clients unless started with ``secure=True``: then Mosquitto admits only the users of
its dynamic-security plugin, starting with the coordinator's (:mod:`gpupool.broker.secure`).
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

from gpupool._config import DEFAULT_TOPIC_PREFIX
from gpupool._errors import ConnectError, UsageError
from gpupool._process import Child, spawn
from gpupool.broker.secure import find_dynsec_plugin, prepare_secure_broker, probe_login
from gpupool.protocol.topics import Topics

__all__ = [
    "BrokerKind",
    "find_mosquitto",
    "free_port",
    "mosquitto_config",
    "mosquitto_secure_available",
    "start_broker",
    "wait_for_port",
]

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


def find_mosquitto() -> str | None:
    """The mosquitto program: on PATH, else where Debian and others install it."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def mosquitto_secure_available() -> bool:
    """Whether a secure embedded broker can start here: Mosquitto and its dynamic-security plugin."""
    return find_mosquitto() is not None and find_dynsec_plugin() is not None


def start_broker(
    kind: BrokerKind = "auto",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 20.0,
    secure: bool = False,
    state_dir: Path | None = None,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
) -> Child:
    """Start a broker and return once it accepts connections; ``child.ready["url"]`` is its URL.

    With ``secure=True`` the broker is Mosquitto with the dynamic-security plugin and refuses anonymous
    clients; ``child.ready`` then also holds ``secure`` (True), ``admin_username``, ``admin_password``,
    ``admin_password_file`` and ``dynsec_file``. The admin is the coordinator's user, allowed the agent
    topics under ``topic_prefix`` and user administration.

    Args:
        kind: "mosquitto", "amqtt", or "auto" (Mosquitto where installed, else amqtt).
        host: the address to listen on.
        port: the port; 0 picks a free one.
        timeout: seconds to wait for the broker to accept connections.
        secure: admit only dynamic-security users (Mosquitto only).
        state_dir: where Mosquitto's files go (a new temporary directory when None). A secure broker
            started again on the same directory keeps its users and the coordinator's password.
        topic_prefix: the pool's topic prefix, for the coordinator's role (secure only).

    Raises:
        UsageError: ``kind="mosquitto"`` with no mosquitto on PATH; ``secure=True`` with amqtt, without
            Mosquitto, or without its dynamic-security plugin.
        ConnectError: the broker did not come up, or (secure) refused the coordinator's user.
    """
    mosquitto = find_mosquitto()
    if kind == "mosquitto" and mosquitto is None:
        raise UsageError("no mosquitto on PATH; install it or use the amqtt broker")
    if secure and (kind == "amqtt" or mosquitto is None):
        raise UsageError(
            "a secure broker needs Mosquitto 2 with its dynamic-security plugin; "
            "amqtt, the pure-Python broker, cannot confine agents to their own topics"
        )
    if kind == "amqtt" or mosquitto is None:
        return spawn(
            "broker",
            [sys.executable, "-m", "gpupool.broker", "--host", host, "--port", str(port)],
            timeout=timeout,
        )
    port = port or free_port(host)
    directory = state_dir if state_dir is not None else Path(tempfile.mkdtemp(prefix="gpupool-broker-"))
    ready: dict[str, object] = {}
    if secure:
        plugin = find_dynsec_plugin()
        if plugin is None:
            raise UsageError("a secure broker needs mosquitto_dynamic_security.so (Mosquitto 2), not found")
        files = prepare_secure_broker(
            directory, host=host, port=port, plugin=plugin, topics=Topics(topic_prefix)
        )
        config = files.config_file
        ready = {
            "secure": True,
            "admin_username": files.admin_username,
            "admin_password": files.admin_password,
            "admin_password_file": str(files.password_file),
            "dynsec_file": str(files.dynsec_file),
        }
    else:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "mosquitto.conf"
        config.write_text(mosquitto_config(host, port))
    # Its log goes to a file beside its config (as root it warns on every start that it runs as root);
    # a failure to start quotes the file's end.
    log_path = directory / "mosquitto.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [mosquitto, "-c", str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
        )
    child = Child("broker", process)
    try:
        wait_for_port(host, port, timeout)
        if not child.alive():
            raise ConnectError(f"{host}:{port}", f"mosquitto exited with code {process.returncode}")
        if secure:
            _check_admin(host, port, str(ready["admin_username"]), str(ready["admin_password"]), timeout)
    except ConnectError as exc:
        child.kill()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise ConnectError(exc.peer, f"{exc.detail} ({log_path}: {' | '.join(tail) or 'empty'})") from exc
    child.ready = {
        "event": "ready",
        "role": "broker",
        "kind": "mosquitto",
        "url": f"mqtt://{host}:{port}",
        "host": host,
        "port": port,
        "log": str(log_path),
        **ready,
    }
    return child


def _check_admin(host: str, port: int, username: str, password: str, timeout: float) -> None:
    """Log in as the coordinator once: a plugin that could not read its file starts a broker anyway.

    Raises:
        ConnectError: the broker refused the coordinator's user or did not answer.
    """
    try:
        code = probe_login(host, port, username=username, password=password, timeout=timeout)
    except OSError as exc:
        raise ConnectError(f"{host}:{port}", f"mosquitto did not answer a login: {exc}") from exc
    if code != 0:
        raise ConnectError(
            f"{host}:{port}",
            f"mosquitto refused the coordinator's user (CONNACK {code}); its dynamic-security plugin "
            "may have failed to load its file",
        )
