"""``gpupool-agent`` (also ``python -m gpupool.agent``): serve this host's GPUs to a gpupool.

Logs go to stderr; once the data plane serves (and the status is published, or the broker has had
the connect deadline to answer), one JSON ready line goes to stdout. SIGTERM and SIGINT stop it
cleanly: the retained status turns OFFLINE and in-flight calls get a short grace.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from gpupool._config import (
    DEFAULT_TOPIC_PREFIX,
    Timeouts,
    broker_with_password,
    default_state_dir,
    parse_broker_url,
    parse_endpoint,
    parse_memory_limit,
)
from gpupool._errors import ConnectError, GpupoolError, UsageError
from gpupool._ids import new_agent_id
from gpupool._process import announce_ready
from gpupool.agent._malloc import keep_chunk_memory
from gpupool.agent.config import DEFAULT_AGENT_PORT, AgentConfig, BackendChoice
from gpupool.agent.control import COMMANDS, PAUSE_WAIT, ask
from gpupool.agent.enrolment import load_or_enrol
from gpupool.agent.runtime import Agent
from gpupool.agent.schedule import parse_schedule

__all__ = ["build_parser", "config_from_args", "main", "owner_command", "serve"]

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
        "--bulk-port",
        default="0",
        metavar="PORT|off",
        help="port of the bulk byte path other agents read rows from (on the listen host; TLS like the "
        "data plane); 0 picks one, off reads and serves rows over gRPC only (default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "cupy", "numpy"),
        default="auto",
        help="auto: CuPy where CUDA works, else NumPy (default %(default)s)",
    )
    parser.add_argument(
        "--allow-kernels",
        action="store_true",
        help="run users' CUDA kernels (gp.ElementwiseKernel, ReductionKernel, RawKernel) on this rig's "
        "GPUs: they run in each GPU's worker process and can read any session's memory on that GPU "
        "(SECURITY.md)",
    )
    parser.add_argument(
        "--fuse-kernels",
        action="store_true",
        help="on CuPy workers, run each elementwise chain of a program as one kernel the agent generates "
        "from its own ops (experimental: not yet verified on a GPU)",
    )
    parser.add_argument(
        "--max-temperature",
        type=float,
        default=85.0,
        metavar="C",
        help="a GPU hotter than this takes no new rows until it cools (0: no limit; default %(default)g)",
    )
    parser.add_argument(
        "--in-process-workers",
        action="store_true",
        help="keep each worker's buffers and compute in the agent's own process instead of a supervised "
        "process per worker: a faulting kernel then takes the whole agent down (debugging, embedding)",
    )
    parser.add_argument(
        "--allow-python",
        action="store_true",
        help="run users' Python tasks that gpupool cannot trace (pool.map), each in a process of its own: "
        "arbitrary code with this agent's user's rights on this rig (SECURITY.md)",
    )
    parser.add_argument(
        "--memory-limit",
        default="80%",
        help="per worker: a share of GPU memory (host RAM for NumPy) or a size (default %(default)s)",
    )
    parser.add_argument(
        "--session-memory-limit",
        default="",
        help="per worker, the most one session may hold: a share of the worker's limit or a size "
        "(e.g. 50%%, 512MiB; default: no cap beyond the worker's)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=Timeouts().stall,
        metavar="SECONDS",
        help="longest wait for an upload's next chunk or a download's next read; a stalled stream "
        "ends and its memory is freed (default %(default)s)",
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
    parser.add_argument(
        "--coordinator",
        default=None,
        help="the coordinator's HOST:PORT, to enrol (default $GPUPOOL_COORDINATOR, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--join-token",
        default=None,
        help="a token of role agent, presented once to enrol (default $GPUPOOL_JOIN_TOKEN; prefer the "
        "variable: a command line is visible to every user of the host)",
    )
    parser.add_argument(
        "--ca",
        default=None,
        help="the pool CA (PEM file) to check the coordinator's TLS certificate while enrolling "
        "(default $GPUPOOL_CA)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="where the agent keeps its key, certificate and id "
        "(default $GPUPOOL_STATE_DIR, else ~/.local/state/gpupool/agent)",
    )
    parser.add_argument(
        "--control-socket",
        default=os.environ.get("GPUPOOL_CONTROL_SOCKET"),
        metavar="PATH|off",
        help="the Unix socket `gpupool-agent pause|resume|state` talks to (default $GPUPOOL_CONTROL_SOCKET, "
        "else control.sock in the state directory for an enrolled agent, none for an --insecure one)",
    )
    parser.add_argument(
        "--pause-schedule",
        action="append",
        default=None,
        metavar="WINDOW",
        help="pause the agent (as gpupool-agent pause does: its buffers move to other agents) during "
        "WINDOW of this rig's local time, '[DAYS] HH:MM-HH:MM', e.g. 'Mon-Fri 08:00-18:00' or "
        "'daily 22:00-06:00'; "
        "repeat for more windows (default $GPUPOOL_PAUSE_SCHEDULE, windows separated by ';')",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="run without an identity: plaintext, and any caller may use it (development only)",
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
    if args.id and not args.insecure:
        raise UsageError("--id is for --insecure agents only: an enrolled agent's id comes from enrolment")
    host, port = parse_endpoint(args.listen, default_port=DEFAULT_AGENT_PORT)
    parse_memory_limit(args.memory_limit, 1 << 40)  # refuse a bad limit before discovery
    if args.session_memory_limit:
        parse_memory_limit(args.session_memory_limit, 1 << 40)
    if not args.heartbeat > 0:
        raise UsageError(f"--heartbeat must be more than zero, not {args.heartbeat}")
    if args.max_temperature < 0:
        raise UsageError(f"--max-temperature must be zero (no limit) or more, not {args.max_temperature}")
    if not args.stall_timeout > 0:
        raise UsageError(f"--stall-timeout must be more than zero, not {args.stall_timeout}")
    backend: BackendChoice = args.backend
    schedule = args.pause_schedule
    if schedule is None:
        schedule = [os.environ.get("GPUPOOL_PAUSE_SCHEDULE", "")]
    parse_schedule(schedule)  # refuse a bad window before discovery
    return AgentConfig(
        pause_schedule=tuple(
            piece.strip() for text in schedule for piece in text.split(";") if piece.strip()
        ),
        bulk_port=_bulk_port(args.bulk_port),
        broker=broker_with_password(parse_broker_url(args.broker)),
        insecure=args.insecure,
        agent_id=args.id or new_agent_id(),
        name=args.name or socket.gethostname(),
        listen_host=host,
        listen_port=port,
        advertise=args.advertise,
        backend=backend,
        allow_kernels=args.allow_kernels,
        allow_python=args.allow_python,
        fuse_kernels=args.fuse_kernels,
        worker_processes=not args.in_process_workers,
        control_socket=_control_socket(args),
        max_temperature=args.max_temperature,
        memory_limit=args.memory_limit,
        session_memory_limit=args.session_memory_limit,
        topic_prefix=args.topic_prefix,
        heartbeat=args.heartbeat,
        timeouts=Timeouts(stall=args.stall_timeout),
    )


def _bulk_port(text: str) -> int | None:
    """``--bulk-port``: a port, or None for off.

    Raises:
        UsageError: neither a port nor ``off``.
    """
    if text.strip().lower() == "off":
        return None
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(f"--bulk-port takes a port (0 picks one) or off, not {text!r}")
    return port


async def with_identity(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    """``config`` with the agent's identity (kept, or from enrolment), id and broker credentials.

    Raises:
        UsageError: not enrolled and neither a join token nor --insecure.
        AuthError, ConnectError, DeadlineExceeded: enrolment failed.
    """
    state_dir = Path(args.state_dir or default_state_dir("agent"))
    identity = await load_or_enrol(
        state_dir=state_dir,
        join_token=(args.join_token or os.environ.get("GPUPOOL_JOIN_TOKEN", "")).strip(),
        coordinator=args.coordinator,
        ca=args.ca,
        name=config.name,
        insecure=config.insecure,
    )
    if identity is None:
        log.warning("no identity: serving as an OPEN agent (--insecure); any caller may use it")
        return config
    broker = config.broker
    if identity.mqtt_username:
        broker = dataclasses.replace(broker, username=identity.mqtt_username, password=identity.mqtt_password)
    return dataclasses.replace(
        config,
        agent_id=identity.agent_id,
        identity=identity,
        broker=broker,
        topic_prefix=identity.topic_prefix or config.topic_prefix,
    )


async def serve(config: AgentConfig, args: argparse.Namespace | None = None) -> None:
    """Run an agent until SIGTERM or SIGINT, printing the ready line once it serves.

    Raises:
        UsageError: the agent cannot start as configured.
        AuthError: enrolment was refused.
    """
    if args is not None:
        config = await with_identity(config, args)
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


def _control_socket(args: argparse.Namespace) -> str:
    """Where the owner's control socket goes: as given, else in the state directory of an enrolled agent."""
    given = args.control_socket or ""
    if given == "off":
        return ""
    if given:
        return given
    if args.insecure and not args.state_dir:
        return ""
    return str(Path(args.state_dir or default_state_dir("agent")) / "control.sock")


def owner_command(argv: Sequence[str]) -> int:
    """``gpupool-agent pause|resume|state [--state-dir DIR] [--control-socket PATH]``, on the rig itself.

    Prints the agent's state; after a pause, a line for each session and agent its buffers moved to, and
    what stayed.
    """
    parser = argparse.ArgumentParser(
        prog="gpupool-agent",
        description="Take this rig's GPUs back from the pool (pause), give them back (resume), or ask "
        "(state).",
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--state-dir", default=None, help="the agent's state directory (as it was started)")
    parser.add_argument("--control-socket", default=os.environ.get("GPUPOOL_CONTROL_SOCKET"), metavar="PATH")
    parser.add_argument(
        "--wait",
        type=float,
        default=PAUSE_WAIT,
        metavar="SECONDS",
        help="pause: how long to wait for the coordinator to move the agent's buffers to other agents "
        "(0: not at all; default %(default)g)",
    )
    args = parser.parse_args(argv)
    args.insecure = False
    path = _control_socket(args)
    try:
        answer = ask(Path(path), args.command, wait=args.wait if args.command == "pause" else None)
    except (ConnectError, ValueError) as exc:
        print(f"gpupool-agent {args.command}: {exc}", file=sys.stderr)
        return 1
    print(answer["state"])
    if args.command == "pause":
        for line in pause_lines(answer):
            print(line)
    return 0


def pause_lines(answer: dict[str, object]) -> list[str]:
    """What a pause's answer says moved where, and what stayed, as lines (none where nothing was held)."""
    lines = []
    moved = answer.get("moved")
    for group in moved if isinstance(moved, list) else ():
        if isinstance(group, dict):
            lines.append(
                f"moved {group.get('buffers')} buffer(s), {group.get('bytes')} bytes, of session "
                f"{group.get('session') or '(none)'} to agent {group.get('agent_id')} "
                f"({group.get('endpoint')}) worker {group.get('worker')}"
            )
    left = answer.get("left")
    if left:
        note = answer.get("note")
        lines.append(
            f"{left} buffer(s), {answer.get('left_bytes')} bytes, stay here" + (f": {note}" if note else "")
        )
    held = answer.get("held")
    if held and not answer.get("finished"):
        lines.append(
            f"{held} buffer(s) still here: not all moved within the wait (the coordinator moves them to "
            "other ready agents with room; gpupool agents shows what each holds)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gpupool-agent``; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in COMMANDS:
        return owner_command(arguments)
    parser = build_parser()
    args = parser.parse_args(arguments)
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
                runner.run(serve(config, args))
        else:
            asyncio.run(serve(config, args))
    except UsageError as exc:
        print(f"gpupool-agent: error: {exc}", file=sys.stderr)
        return 2
    except GpupoolError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
