"""The coordinator program: ``gpupool coordinator`` and ``python -m gpupool.coordinator``.

It logs to stderr, prints one ready line on stdout once it serves
(``{"event": "ready", "role": "coordinator", "listen": "127.0.0.1:PORT"}``), and stops cleanly on SIGTERM
and SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from gpupool._config import (
    DEFAULT_TOPIC_PREFIX,
    broker_with_password,
    default_state_dir,
    parse_broker_url,
    parse_endpoint,
)
from gpupool._errors import ConnectError, GpupoolError, UsageError
from gpupool._process import announce_ready
from gpupool.coordinator.jobs import DEFAULT_LEASE
from gpupool.coordinator.runtime import DEFAULT_LIVENESS, Coordinator
from gpupool.coordinator.trust import DEFAULT_QUARANTINE_AFTER
from gpupool.placement import MIN_SHARD_BYTES
from gpupool.protocol.topics import Topics

__all__ = ["build_parser", "main"]

log = logging.getLogger("gpupool.coordinator")


def build_parser(prog: str = "gpupool coordinator") -> argparse.ArgumentParser:
    """The coordinator's command line."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the gpupool coordinator: agent registry, placement, client and admin API."
    )
    parser.add_argument(
        "--broker",
        default=os.environ.get("GPUPOOL_BROKER", "mqtt://127.0.0.1:1883"),
        help="mqtt://[user:pass@]host[:port] or mqtts://... (default: $GPUPOOL_BROKER or %(default)s)",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="gRPC address HOST:PORT; port 0 picks one (default: %(default)s)",
    )
    parser.add_argument(
        "--topic-prefix",
        default=os.environ.get("GPUPOOL_TOPIC_PREFIX", DEFAULT_TOPIC_PREFIX),
        help="first MQTT topic level (default: $GPUPOOL_TOPIC_PREFIX or %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="tokens, enrolled agents, sessions and the pool CA "
        "(default: $GPUPOOL_STATE_DIR, else ~/.local/state/gpupool/coordinator)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext gRPC even beyond loopback (logged as a warning; tokens are still required)",
    )
    parser.add_argument(
        "--allow-unenrolled",
        action="store_true",
        help="believe unsigned statuses of agents that never enrolled (agents run with --insecure; "
        "development only)",
    )
    parser.add_argument(
        "--manage-mqtt-users",
        action="store_true",
        help="create an MQTT user per enrolled agent through Mosquitto's dynamic-security plugin "
        "(the --broker user must be its admin)",
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        help="seconds a client session lives unrenewed (default 60)",
    )
    parser.add_argument(
        "--liveness",
        type=float,
        default=DEFAULT_LIVENESS,
        help="seconds of silence after which an agent is shown offline (default 15)",
    )
    parser.add_argument(
        "--tls-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address clients dial, for the TLS certificate (repeatable)",
    )
    parser.add_argument(
        "--min-shard-bytes",
        type=int,
        default=MIN_SHARD_BYTES,
        help="the smallest shard worth a worker of its own; smaller arrays use fewer workers (default 1 MiB)",
    )
    parser.add_argument(
        "--placement",
        choices=("speed", "memory"),
        default="speed",
        help="how rows are shared among workers: by each worker's measured speed within its free memory "
        "(default), or by free memory alone (the old rule, e.g. as a baseline)",
    )
    parser.add_argument(
        "--quarantine-after",
        type=int,
        default=DEFAULT_QUARANTINE_AFTER,
        metavar="N",
        help="quarantine an agent (placement skips it until `gpupool uncordon`) once clients' verification "
        "has caught N of its results disagreeing with another agent's (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the coordinator until SIGTERM or SIGINT; returns the exit status (0 clean, 1 failed, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s",
    )
    try:
        broker = broker_with_password(parse_broker_url(args.broker))
        parse_endpoint(args.listen)
        if args.min_shard_bytes < 0:
            raise UsageError("--min-shard-bytes must be zero or more")
        if not args.lease > 0 or not args.liveness > 0:
            raise UsageError("--lease and --liveness must be more than zero")
        if args.quarantine_after < 1:
            raise UsageError("--quarantine-after must be at least 1")
    except UsageError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    try:
        coordinator = Coordinator(
            broker=broker,
            state_dir=Path(args.state_dir or default_state_dir("coordinator")),
            listen=args.listen,
            topics=Topics(args.topic_prefix),
            min_shard_bytes=args.min_shard_bytes,
            by_speed=args.placement == "speed",
            lease=args.lease,
            liveness=args.liveness,
            insecure=args.insecure,
            allow_unenrolled=args.allow_unenrolled,
            manage_mqtt_users=args.manage_mqtt_users,
            tls_hosts=tuple(args.tls_host),
            quarantine_after=args.quarantine_after,
        )
        asyncio.run(_serve(coordinator))
    except UsageError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except GpupoolError as exc:
        log.error("%s", exc)
        return 1
    except ExceptionGroup as group:
        failures, others = group.split(GpupoolError)
        if others is not None or failures is None:
            raise
        for failure in failures.exceptions:
            log.error("%s", failure)
        return 1
    return 0


async def _serve(coordinator: Coordinator) -> None:
    """Serve until a signal asks to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with coordinator, asyncio.TaskGroup() as group:
        group.create_task(coordinator.run(), name="gpupool[coordinator].run")
        try:
            await coordinator.wait_connected()
        except ConnectError as exc:
            log.warning("%s; serving anyway, the registry fills once the broker answers", exc)
        announce_ready(
            "coordinator",
            listen=coordinator.address,
            state_dir=str(coordinator.store.path.parent),
            ca=str(coordinator.store.path.parent / "ca.pem"),
        )
        await stop.wait()
        log.info("stopping")
        await coordinator.close()
