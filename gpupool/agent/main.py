"""``gpupool-agent`` (also ``python -m gpupool.agent``): serve this host's GPUs to a gpupool.

Logs go to stderr; once the data plane serves (and the status is published, or the broker has had
the connect deadline to answer), one JSON ready line goes to stdout. SIGTERM and SIGINT stop it
cleanly: the retained status turns OFFLINE and in-flight calls get a short grace.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from gpupool._config import (
    DEFAULT_TOPIC_PREFIX,
    Timeouts,
    parse_broker_url,
    parse_endpoint,
    parse_memory_limit,
)
from gpupool._errors import GpupoolError, UsageError
from gpupool._ids import new_agent_id
from gpupool._process import announce_ready
from gpupool.agent._malloc import keep_chunk_memory
from gpupool.agent.config import DEFAULT_AGENT_PORT, AgentConfig, BackendChoice
from gpupool.agent.runtime import Agent

__all__ = ["build_parser", "config_from_args", "main", "serve"]

log = logging.getLogger("gpupool.agent")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``gpupool-agent``."""
    parser = argparse.ArgumentParser(
        prog="gpupool-agent",
        description="Serve this host's GPUs (or its CPU, through NumPy, where there is none) to a gpupool.",
    )
    parser.add_argument(
        "--broker",
        default=os.environ.get("GPUPOOL_BROKER"),
        help="MQTT broker URL, mqtt://[user:pass@]HOST[:PORT] (default $GPUPOOL_BROKER)",
    )
    parser.add_argument(
        "--listen",
        default=f"0.0.0.0:{DEFAULT_AGENT_PORT}",
        help="HOST:PORT of the gRPC data plane; port 0 picks one (default %(default)s)",
    )
    parser.add_argument(
        "--advertise",
        default="",
        help="host clients dial (default: the listen host, or this machine's address)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "cupy", "numpy"),
        default="auto",
        help="auto: CuPy where CUDA works, else NumPy (default %(default)s)",
    )
    parser.add_argument(
        "--memory-limit",
        default="80%",
        help="per worker: a share of GPU memory (host RAM for NumPy) or a size (default %(default)s)",
    )
    parser.add_argument("--name", default="", help="a human name (default: the hostname)")
    parser.add_argument(
        "--id",
        default=os.environ.get("GPUPOOL_AGENT_ID", ""),
        help="agent id (default $GPUPOOL_AGENT_ID, else a fresh random one)",
    )
    parser.add_argument(
        "--topic-prefix",
        default=os.environ.get("GPUPOOL_TOPIC_PREFIX") or DEFAULT_TOPIC_PREFIX,
        help="first MQTT topic level (default $GPUPOOL_TOPIC_PREFIX or %(default)s)",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=Timeouts().heartbeat,
        help="seconds between telemetry reports (default %(default)s)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (pip install 'gpupool[uvloop]')")
    return parser


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The agent's configuration from parsed arguments.

    Raises:
        UsageError: a missing broker, an unreadable address, limit or heartbeat.
    """
    if not args.broker:
        raise UsageError("--broker is required (or set GPUPOOL_BROKER), e.g. --broker mqtt://10.0.0.2:1883")
    host, port = parse_endpoint(args.listen, default_port=DEFAULT_AGENT_PORT)
    parse_memory_limit(args.memory_limit, 1 << 40)  # refuse a bad limit before discovery
    if not args.heartbeat > 0:
        raise UsageError(f"--heartbeat must be more than zero, not {args.heartbeat}")
    backend: BackendChoice = args.backend
    return AgentConfig(
        broker=parse_broker_url(args.broker),
        agent_id=args.id or new_agent_id(),
        name=args.name or socket.gethostname(),
        listen_host=host,
        listen_port=port,
        advertise=args.advertise,
        backend=backend,
        memory_limit=args.memory_limit,
        topic_prefix=args.topic_prefix,
        heartbeat=args.heartbeat,
    )


async def serve(config: AgentConfig) -> None:
    """Run an agent until SIGTERM or SIGINT, printing the ready line once it serves.

    Raises:
        UsageError: the agent cannot start as configured.
    """
    async with Agent(config) as agent:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        runner = asyncio.create_task(agent.run(), name=f"gpupool[{config.agent_id}].run")
        registered = asyncio.create_task(
            agent.wait_registered(), name=f"gpupool[{config.agent_id}].registered"
        )
        try:
            done, _ = await asyncio.wait(
                {runner, registered}, timeout=config.timeouts.connect, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            registered.cancel()
        if runner in done:
            await runner  # it failed or was stopped before registering: surface why
            return
        if registered not in done:
            log.warning(
                "no answer from the MQTT broker at %s yet: serving, and registering once it answers",
                config.broker.url(),
            )
        announce_ready(
            "agent",
            agent_id=config.agent_id,
            name=config.name,
            endpoint=agent.endpoint,
            backend=agent.backend,
            workers=agent.workers,
        )
        await runner


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gpupool-agent``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s gpupool-agent %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    keep_chunk_memory()
    try:
        config = config_from_args(args)
        if args.uvloop:
            try:
                import uvloop
            except ImportError as exc:
                raise UsageError("--uvloop needs uvloop: pip install 'gpupool[uvloop]'") from exc
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(serve(config))
        else:
            asyncio.run(serve(config))
    except UsageError as exc:
        print(f"gpupool-agent: error: {exc}", file=sys.stderr)
        return 2
    except GpupoolError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
