"""The credentials of a pool on one machine (``gpupool up``, ``gpupool demo``, :class:`LocalPool`).

A local pool keeps everything in one state dir::

    <state-dir>/coordinator/   the coordinator's store (tokens, agents, sessions) and the pool CA
    <state-dir>/agents/<name>/ each agent's key, certificate and id (enrolled on first start)
    <state-dir>/broker/        the embedded Mosquitto's users (dynamic security), if it is Mosquitto
    <state-dir>/client.env     export GPUPOOL_COORDINATOR=... GPUPOOL_TOKEN=<a client token>
    <state-dir>/admin.env      the same with the operator's admin token

On first start the CA and the tokens are made; later starts reuse the tokens of the env files while the
store still accepts them, so a user's shell keeps working across restarts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gpupool._errors import AuthError
from gpupool.security.files import private_dir, write_file
from gpupool.security.pki import PoolAuthority
from gpupool.security.store import StateStore
from gpupool.security.tokens import Role

__all__ = ["LocalCredentials", "prepare_local_state", "write_env_files"]

#: Seconds the join token of a local pool's agents lives (made anew at every start).
JOIN_TOKEN_TTL = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalCredentials:
    """What a local pool's parts and users need.

    Attributes:
        state_dir: the pool's state dir.
        coordinator_dir: the coordinator's ``--state-dir``.
        admin_token: the operator's token (``admin.env``).
        client_token: a user's token (``client.env``).
        join_token: the agents' join token (role agent, short-lived).
        ca_path: the pool CA's PEM file.
    """

    state_dir: Path
    coordinator_dir: Path
    admin_token: str
    client_token: str
    join_token: str
    ca_path: Path

    def agent_dir(self, name: str) -> Path:
        """The state dir of the agent called ``name``."""
        return self.state_dir / "agents" / name


def _token_in(env_file: Path) -> str:
    try:
        text = env_file.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        if key.strip() == "GPUPOOL_TOKEN":
            return value.strip().strip("'\"")
    return ""


def _reuse_or_create(store: StateStore, env_file: Path, *, role: Role, name: str, now: float) -> str:
    token = _token_in(env_file)
    if token:
        try:
            if store.authenticate(token, now=now).role == role:
                return token
        except AuthError:
            pass
    token, _ = store.create_token(role=role, name=name, ttl=None, now=now)
    return token


def prepare_local_state(state_dir: Path) -> LocalCredentials:
    """Make (or reuse) the CA and the tokens of a local pool in ``state_dir``."""
    private_dir(state_dir)
    coordinator_dir = state_dir / "coordinator"
    PoolAuthority.load_or_create(coordinator_dir)
    now = time.time()
    with StateStore.open(coordinator_dir) as store:
        admin = _reuse_or_create(
            store, state_dir / "admin.env", role="admin", name="gpupool up: operator", now=now
        )
        client = _reuse_or_create(
            store, state_dir / "client.env", role="client", name="gpupool up: client", now=now
        )
        join, _ = store.create_token(
            role="agent", name="gpupool up: local agents", ttl=JOIN_TOKEN_TTL, now=now
        )
    return LocalCredentials(
        state_dir=state_dir,
        coordinator_dir=coordinator_dir,
        admin_token=admin,
        client_token=client,
        join_token=join,
        ca_path=coordinator_dir / "ca.pem",
    )


def write_env_files(credentials: LocalCredentials, coordinator: str) -> tuple[Path, Path]:
    """Write ``client.env`` and ``admin.env`` (mode 0600); returns their paths."""
    paths = []
    for filename, token in (("client.env", credentials.client_token), ("admin.env", credentials.admin_token)):
        path = credentials.state_dir / filename
        text = f"export GPUPOOL_COORDINATOR={coordinator}\nexport GPUPOOL_TOKEN={token}\n"
        write_file(path, text.encode(), 0o600)
        paths.append(path)
    return paths[0], paths[1]
