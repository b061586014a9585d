"""A Mosquitto that admits only enrolled agents, through Mosquitto 2's dynamic-security plugin.

The broker starts with one user, the coordinator's (:data:`ADMIN_USERNAME`, a random password). Its role
lets it administer users over ``$CONTROL/dynamic-security/v1`` and read and write every agent's topics;
the coordinator then creates one user per agent at enrolment
(:class:`gpupool.coordinator.mqttusers.MqttUsers`), confined to that agent's own topics. Anonymous
clients are refused.

The plugin's JSON file is written here rather than by ``mosquitto_ctrl dynsec init``, which would put the
password on a command line and give the coordinator a broader role. Passwords are hashed as Mosquitto 2.0
does (``plugins/dynamic-security/auth.c``): PBKDF2-HMAC-SHA512 over a 12-byte salt, 64-byte hash, both
base64. A salt of any other length makes the plugin skip the client without a word.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gpupool._errors import UsageError
from gpupool.protocol.topics import COORDINATOR_MQTT_USER, DYNSEC_CONTROL_TOPIC, DYNSEC_RESPONSE_TOPIC, Topics

__all__ = [
    "ADMIN_ROLE",
    "ADMIN_USERNAME",
    "CONTROL_RESPONSE_TOPIC",
    "CONTROL_TOPIC",
    "SecureBroker",
    "admin_role",
    "dynsec_config",
    "find_dynsec_plugin",
    "hash_password",
    "prepare_secure_broker",
    "probe_login",
    "secure_mosquitto_config",
    "write_dynsec_file",
]

ADMIN_USERNAME: Final = COORDINATOR_MQTT_USER
ADMIN_ROLE: Final = "gpupool-coordinator"
CONTROL_TOPIC: Final = DYNSEC_CONTROL_TOPIC
CONTROL_RESPONSE_TOPIC: Final = DYNSEC_RESPONSE_TOPIC
#: Mosquitto 2.0's own count (PW_DEFAULT_ITERATIONS), used for every password it sets itself. The
#: passwords gpupool makes are 256 random bits, so key stretching would add nothing.
PBKDF2_ITERATIONS: Final = 101
SALT_BYTES: Final = 12  # SALT_LEN in Mosquitto 2.0
HASH_BYTES: Final = 64
DYNSEC_PLUGIN_PATHS: Final = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
)
DYNSEC_FILE: Final = "dynamic-security.json"
PASSWORD_FILE: Final = "admin-password"
CONFIG_FILE: Final = "mosquitto.conf"


def find_dynsec_plugin() -> Path | None:
    """Where Mosquitto's dynamic-security plugin is installed, or None."""
    return next((Path(p) for p in DYNSEC_PLUGIN_PATHS if Path(p).is_file()), None)


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> dict[str, Any]:
    """The ``password``, ``salt`` and ``iterations`` fields of a dynamic-security client."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise UsageError(f"a dynamic-security salt has {SALT_BYTES} bytes, not {len(salt)}")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


def admin_role(topics: Topics = Topics()) -> dict[str, Any]:
    """The coordinator's role: user administration, and every agent's topics of ``topics``' pool."""
    agents = f"{topics.root}/#"
    return {
        "rolename": ADMIN_ROLE,
        "textname": "gpupool coordinator",
        "acls": [
            _acl("publishClientSend", f"{CONTROL_TOPIC}/#"),
            _acl("publishClientReceive", f"{CONTROL_TOPIC}/#"),
            _acl("subscribePattern", CONTROL_RESPONSE_TOPIC),
            _acl("subscribePattern", agents),
            _acl("publishClientReceive", agents),
            _acl("publishClientSend", topics.all_of("commands")),
            # Forgetting an agent clears its retained topics (an empty retained payload).
            _acl("publishClientSend", topics.all_of("status")),
            _acl("publishClientSend", topics.all_of("telemetry")),
        ],
    }


def dynsec_config(
    *, admin_password: str, topics: Topics = Topics(), admin_username: str = ADMIN_USERNAME
) -> dict[str, Any]:
    """The plugin's JSON for a new broker: the coordinator's user and nothing else."""
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {
                "username": admin_username,
                "textname": "gpupool coordinator",
                "roles": [{"rolename": ADMIN_ROLE}],
                **hash_password(admin_password),
            }
        ],
        "groups": [],
        "roles": [admin_role(topics)],
    }


def _write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` to a file only its owner may read (0600 from the start, not chmod after)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    with os.fdopen(os.open(path, flags, 0o600), "w") as stream:
        stream.write(text)


def write_dynsec_file(
    path: Path,
    *,
    topics: Topics = Topics(),
    admin_username: str = ADMIN_USERNAME,
    password_file: Path | None = None,
) -> str:
    """Create the plugin's JSON file for a new broker; returns the coordinator's new password.

    The password is also written to ``password_file`` (mode 0600) when one is given. Neither file may
    exist already: the plugin file holds every agent's user once the broker runs.

    Raises:
        UsageError: a file exists already.
    """
    password = secrets.token_urlsafe(32)
    config = dynsec_config(admin_password=password, topics=topics, admin_username=admin_username)
    try:
        _write_private(path, json.dumps(config, indent=2) + "\n", exclusive=True)
        if password_file is not None:
            _write_private(password_file, password + "\n", exclusive=True)
    except FileExistsError as exc:
        raise UsageError(f"{exc.filename} exists already; remove it to start a new broker") from exc
    return password


def secure_mosquitto_config(*, host: str, port: int, plugin: Path, dynsec_file: Path) -> str:
    """The Mosquitto configuration of a broker that admits only dynamic-security users.

    Mosquitto started as root drops to the ``mosquitto`` user before the plugin reads its file, which it
    then cannot open (and starts anyway, refusing everyone); ``user`` keeps the broker as whoever started it.
    """
    return (
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        f"plugin {plugin}\n"
        f"plugin_opt_config_file {dynsec_file}\n"
        f"listener {port} {host}\n"
        "set_tcp_nodelay true\n"
        "persistence false\n"
        "max_queued_messages 100000\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureBroker:
    """The files of one secure broker and the coordinator's credentials.

    Attributes:
        config_file: the Mosquitto configuration.
        dynsec_file: the plugin's JSON (users, roles), rewritten by the broker at every change.
        password_file: the coordinator's password (mode 0600).
        admin_username: the coordinator's user name.
        admin_password: the coordinator's password.
    """

    config_file: Path
    dynsec_file: Path
    password_file: Path
    admin_username: str
    admin_password: str


def prepare_secure_broker(
    directory: Path, *, host: str, port: int, plugin: Path, topics: Topics = Topics()
) -> SecureBroker:
    """Write a secure broker's files into ``directory``, keeping the users of an earlier run there.

    A directory that already holds the plugin file and the password file is reused: agent users the
    coordinator created survive a broker restart. The coordinator's role is rewritten for ``topics``.

    Raises:
        UsageError: the directory holds a plugin file but not the coordinator's password.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    dynsec_file = directory / DYNSEC_FILE
    password_file = directory / PASSWORD_FILE
    if dynsec_file.exists():
        if not password_file.exists():
            raise UsageError(f"{dynsec_file} exists but {password_file} does not; remove both to start anew")
        password = password_file.read_text().strip()
        config = json.loads(dynsec_file.read_text())
        roles = [r for r in config.get("roles", []) if r.get("rolename") != ADMIN_ROLE]
        config["roles"] = [*roles, admin_role(topics)]
        _write_private(dynsec_file, json.dumps(config, indent=2) + "\n")
    else:
        password_file.unlink(missing_ok=True)
        password = write_dynsec_file(dynsec_file, topics=topics, password_file=password_file)
    config_file = directory / CONFIG_FILE
    config_file.write_text(
        secure_mosquitto_config(host=host, port=port, plugin=plugin, dynsec_file=dynsec_file)
    )
    return SecureBroker(
        config_file=config_file,
        dynsec_file=dynsec_file,
        password_file=password_file,
        admin_username=ADMIN_USERNAME,
        admin_password=password,
    )


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def probe_login(
    host: str, port: int, *, username: str | None, password: str | None, timeout: float = 5.0
) -> int:
    """Log in once with MQTT 3.1.1 and return the CONNACK code (0 accepted, 5 not authorised).

    A blocking check for a broker just started, before any event loop runs.

    Raises:
        OSError: the connection failed or the broker closed it without a CONNACK.
    """
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 10)
    body += _mqtt_string(f"gpupool-probe-{secrets.token_hex(4)}")
    body += _mqtt_string(username) if username is not None else b""
    body += _mqtt_string(password) if password is not None else b""
    length = bytearray()
    remaining = len(body)
    while True:
        remaining, digit = divmod(remaining, 128)
        length.append(digit | (0x80 if remaining else 0))
        if not remaining:
            break
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(b"\x10" + bytes(length) + body)
        answer = b""
        while len(answer) < 4:
            chunk = connection.recv(4 - len(answer))
            if not chunk:
                raise ConnectionError(f"{host}:{port} closed the connection without a CONNACK")
            answer += chunk
        if answer[0] != 0x20:
            raise ConnectionError(f"{host}:{port} answered CONNECT with packet type {answer[0] >> 4}")
        if answer[3] == 0:
            connection.sendall(b"\xe0\x00")  # DISCONNECT, so no will and no warning in the log
        return answer[3]
