"""``gpupool up``: a whole pool on this machine, in the foreground, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

from gpupool._config import default_state_dir
from gpupool._errors import GpupoolError
from gpupool.cli._table import render_table
from gpupool.local import LocalPool

__all__ = ["add_arguments", "describe", "run"]

#: The line ``gpupool up`` prints once every part serves (tests and scripts wait for it).
READY_LINE = "Pool ready. Press Ctrl-C to stop it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gpupool up``."""
    parser.add_argument("--agents", type=int, default=2, metavar="N", help="agents to start (default 2)")
    parser.add_argument(
        "--broker", metavar="URL", help="an MQTT broker to use (default: start an embedded one)"
    )
    parser.add_argument(
        "--broker-kind",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="the embedded broker: Mosquitto from PATH, else amqtt (default auto)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=50051,
        help="the coordinator's port on 127.0.0.1 (0 picks one; default 50051)",
    )
    parser.add_argument(
        "--backend", choices=["auto", "cupy", "numpy"], default="auto", help="agents' backend"
    )
    parser.add_argument("--memory-limit", metavar="LIMIT", help="per-worker memory limit, e.g. 80%% or 2GiB")
    parser.add_argument("--topic-prefix", metavar="PREFIX", help="MQTT topic prefix (default gpupool)")
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the pool's CA, tokens and agents' identities, kept across restarts "
        "(default $GPUPOOL_STATE_DIR, else ~/.local/state/gpupool/pool)",
    )


def describe(pool: LocalPool) -> str:
    """Where every part of a running pool is, and how to use it."""
    address = pool.coordinator_address
    broker = f"{pool.broker_url}  ({pool.broker_kind}, {'embedded' if pool.embedded_broker else 'external'})"
    rows = [
        [
            agent.ready.get("name", "?"),
            agent.ready.get("agent_id", "?"),
            agent.ready.get("endpoint", "?"),
            agent.ready.get("backend", "?"),
            agent.ready.get("workers", "?"),
        ]
        for agent in pool.agents
    ]
    table = render_table(["NAME", "ID", "ENDPOINT", "BACKEND", "WORKERS"], rows, align="<<<<>")
    example = (
        "import numpy as np, gpupool as gp; pool = gp.connect(); "
        "x = pool.asarray(np.ones((4096, 512), np.float32)); print(float(x.sum()))"
    )
    state = pool.state_dir
    security = (
        "agents enrolled with the pool CA, TLS and capabilities"
        if pool.secure
        else "open agents (--insecure)"
    )
    lines = [
        "gpupool pool is up",
        f"  broker        {broker}{', per-agent users' if pool.secure_broker else ''}",
        f"  coordinator   {address}  (tokens required; {security})",
        f"  state dir     {state}",
        f"  topic prefix  {pool.topic_prefix}",
        f"  agents        {len(pool.agents)}",
        "",
        *("  " + line for line in table.splitlines()),
        "",
        f"Credentials (also in {state / 'client.env'}; the admin token is in {state / 'admin.env'}):",
        f"  export GPUPOOL_COORDINATOR={address} GPUPOOL_TOKEN={pool.client_token}",
        "Use it from Python (after the export above, or `. " + str(state / "client.env") + "`):",
        f"  python -c '{example}'",
        "Look at it and steer it (`. "
        + str(state / "admin.env")
        + "` first for drain, cordon, forget, tokens):",
        "  gpupool agents",
        "  gpupool status",
        "  gpupool jobs",
        f"  gpupool token create --role client --state-dir {state / 'coordinator'}",
        "",
    ]
    return "\n".join(lines)


class _Stop(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into KeyboardInterrupt, then ignore both while the pool stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        _ignore_signals()
        raise _Stop

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def _ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _watch(pool: LocalPool, err: TextIO) -> int:
    """Wait until interrupted; return non-zero if the coordinator or the embedded broker dies."""
    reported: set[int] = set()
    while True:
        time.sleep(0.5)
        for part in (pool.coordinator, pool.broker):
            if part is not None and not part.alive():
                print(f"gpupool: the {part.role} exited with code {part.process.returncode}", file=err)
                return 1
        for agent in pool.agents:
            if agent.pid not in reported and not agent.alive():
                reported.add(agent.pid)
                name = agent.ready.get("name", "an agent")
                print(f"gpupool: {name} exited with code {agent.process.returncode}", file=err, flush=True)


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Start a pool, print where it is, and wait; Ctrl-C or SIGTERM stop it and return 0."""
    if args.agents < 1:
        print("gpupool up: --agents must be at least 1", file=err)
        return 2
    try:
        pool = LocalPool(
            agents=args.agents,
            broker_url=args.broker,
            broker_kind=args.broker_kind,
            port=args.port,
            topic_prefix=args.topic_prefix,
            backend=args.backend,
            memory_limit=args.memory_limit,
            state_dir=Path(args.state_dir or default_state_dir("pool")),
        )
    except GpupoolError as exc:
        print(f"gpupool up: {exc}", file=err)
        return 2
    code = 0
    with _signals_stop():
        try:
            print(
                f"gpupool: starting a broker, a coordinator and {args.agents} agent(s)...",
                file=err,
                flush=True,
            )
            pool.start()  # stops whatever it started if it fails or is interrupted
            print(describe(pool), file=out)
            print(READY_LINE, file=out, flush=True)
            code = _watch(pool, err)
        except KeyboardInterrupt:
            print("\ngpupool: stopping the pool...", file=err, flush=True)
        except GpupoolError as exc:
            print(f"gpupool up: {exc}", file=err)
            code = 1
        finally:
            _ignore_signals()  # a second Ctrl-C must not cut the cleanup short
            pool.stop()
    print("gpupool: pool stopped", file=err, flush=True)
    return code
