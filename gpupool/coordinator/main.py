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

from gpupool._config import DEFAULT_TOPIC_PREFIX, BrokerAddress, Timeouts, parse_broker_url, parse_endpoint
from gpupool._errors import ConnectError, GpupoolError, UsageError
from gpupool._process import announce_ready
from gpupool.coordinator.runtime import Coordinator
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
        "--min-shard-bytes",
        type=int,
        default=MIN_SHARD_BYTES,
        help="the smallest shard worth a worker of its own; smaller arrays use fewer workers (default 1 MiB)",
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
        broker = parse_broker_url(args.broker)
        parse_endpoint(args.listen)
        if args.min_shard_bytes < 0:
            raise UsageError("--min-shard-bytes must be zero or more")
    except UsageError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(
            _serve(broker, args.listen, Topics(args.topic_prefix), min_shard_bytes=args.min_shard_bytes)
        )
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


async def _serve(
    broker: BrokerAddress,
    listen: str,
    topics: Topics,
    timeouts: Timeouts = Timeouts(),
    min_shard_bytes: int = MIN_SHARD_BYTES,
) -> None:
    """Serve until a signal asks to stop."""
    coordinator = Coordinator(
        broker=broker, listen=listen, topics=topics, timeouts=timeouts, min_shard_bytes=min_shard_bytes
    )
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
        announce_ready("coordinator", listen=coordinator.address)
        await stop.wait()
        log.info("stopping")
        await coordinator.close()
