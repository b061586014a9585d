"""Configuration shared by every part: deadlines, addresses, defaults, and their parsers."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final
from urllib.parse import urlsplit

from gpupool._errors import UsageError

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_COORDINATOR",
    "DEFAULT_TOPIC_PREFIX",
    "SUPPORTED_DTYPES",
    "BrokerAddress",
    "Streams",
    "Timeouts",
    "broker_with_password",
    "coordinator_address",
    "default_state_dir",
    "parse_broker_url",
    "parse_endpoint",
    "parse_memory_limit",
]

DEFAULT_COORDINATOR: Final = "127.0.0.1:50051"
DEFAULT_TOPIC_PREFIX: Final = "gpupool"
#: Bytes per streamed chunk: grpc.aio streams ran best at 1 MiB here (DESIGN.md, measured facts).
CHUNK_BYTES: Final = 1 << 20
#: The dtypes a shard may have. Comparisons produce bool; the rest are what users upload.
#: Every dtype of the Array API standard (2024.12), and float16: what NumPy and CuPy agents both compute in.
SUPPORTED_DTYPES: Final = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
#: Largest gRPC message either side accepts: a chunk, a program, or an inline fetch.
MAX_MESSAGE_BYTES: Final = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Named deadlines, in seconds, for every network wait.

    Attributes:
        connect: opening a channel or an MQTT session.
        rpc: one unary call (placement, a free), and the fixed part of a program's or a stream's deadline.
        heartbeat: between telemetry reports from an agent.
        shard: streaming one shard in or out, per MiB (plus ``rpc``).
        command: an admin command until the agent's status reflects it.
        stall: the longest wait for the next chunk of an upload or the next read of a download, on top
            of the stream's overall deadline: a peer that goes quiet loses its reservation this soon.
    """

    #: Bytes a program touches per second, at the least: far below any GPU's or host's memory bandwidth
    #: (the H200 measured here moves hundreds of GB/s; a 2-core VM's NumPy several GB/s), so that a
    #: program's deadline only fires on an agent that is stuck, not on a slow one.
    WORK_BYTES_PER_SECOND: ClassVar[float] = 200e6
    #: Floating-point operations per second, at the least: float32 matmul ran at 51 TFLOP/s on the H200
    #: and at tens of GFLOP/s in NumPy on 2 cores (DESIGN.md, measured facts).
    WORK_FLOPS_PER_SECOND: ClassVar[float] = 2e9

    connect: float = 10.0
    rpc: float = 30.0
    heartbeat: float = 3.0
    shard: float = 1.0
    command: float = 10.0
    stall: float = 10.0

    def for_stream(self, nbytes: int) -> float:
        """Deadline for streaming ``nbytes``: a fixed part plus a per-MiB allowance."""
        return self.rpc + self.shard * (nbytes / (1 << 20))

    def for_work(self, nbytes: int, flops: int) -> float:
        """Deadline for a program that touches ``nbytes`` and computes ``flops``: the fixed ``rpc`` part
        plus the time the work takes at :attr:`WORK_BYTES_PER_SECOND` and :attr:`WORK_FLOPS_PER_SECOND`
        (see ``gpupool.agent.program.estimate_work`` for the estimate an agent makes)."""
        return self.rpc + nbytes / self.WORK_BYTES_PER_SECOND + flops / self.WORK_FLOPS_PER_SECOND


@dataclass(frozen=True, slots=True, kw_only=True)
class Streams:
    """How a client moves one shard's bytes: over how many gRPC streams and connections.

    A shard of at least twice ``min_part_bytes`` is split into row ranges ("parts"), up to ``per_shard``
    of them, each its own upload or download stream into (or out of) one preallocated array; the streams
    to one agent go round robin over ``connections`` HTTP/2 connections. On a 2-core VM neither helped
    (scripts/bench, transfer section: no gain in GB/s or CPU per byte; every core is busy copying with one
    stream per shard already), so one stream and one connection are the default; machines with cores to
    spare may gain. ``GPUPOOL_STREAMS`` (``per_shard[,connections]``) overrides both for a process.

    Attributes:
        per_shard: the most streams one shard's bytes are split over (1: no split).
        connections: HTTP/2 connections per agent (1: gRPC's one).
        min_part_bytes: the least bytes of one part.
    """

    ENVIRONMENT: ClassVar[str] = "GPUPOOL_STREAMS"

    per_shard: int = 1
    connections: int = 1
    min_part_bytes: int = 8 << 20

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Streams:
        """The defaults, or what ``$GPUPOOL_STREAMS`` says.

        Raises:
            UsageError: a value that is not one or two positive integers.
        """
        text = (os.environ if environ is None else environ).get(cls.ENVIRONMENT, "").strip()
        if not text:
            return cls()
        try:
            numbers = [int(part) for part in text.split(",")]
        except ValueError:
            numbers = []
        if not 1 <= len(numbers) <= 2 or min(numbers) < 1:
            raise UsageError(f"{cls.ENVIRONMENT}={text!r}: expected STREAMS or STREAMS,CONNECTIONS (>= 1)")
        return cls(per_shard=numbers[0], connections=numbers[-1] if len(numbers) == 2 else 1)

    def parts(self, rows: int, nbytes: int) -> list[tuple[int, int]]:
        """The row ranges ``[start, stop)`` a shard of ``rows`` rows and ``nbytes`` bytes moves in."""
        count = max(1, min(self.per_shard, rows, nbytes // max(self.min_part_bytes, 1)))
        bounds = [rows * i // count for i in range(count + 1)]
        return list(itertools.pairwise(bounds))


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the MQTT broker listens."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def url(self) -> str:
        """The address as a URL (without credentials)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://[user:pass@]host[:port]`` (``mqtts://`` for TLS).

    Raises:
        UsageError: the URL is not an MQTT URL.
    """
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise UsageError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise UsageError(f"broker URL {url!r} names no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise UsageError(f"broker URL {url!r}: bad port") from exc
    return BrokerAddress(parts.hostname, port, parts.username, parts.password, tls)


def broker_with_password(broker: BrokerAddress) -> BrokerAddress:
    """``broker`` with the password from ``$GPUPOOL_BROKER_PASSWORD`` or ``$GPUPOOL_BROKER_PASSWORD_FILE``
    when set (so it never has to appear on a command line, where ``ps`` shows it).

    Raises:
        UsageError: the password file cannot be read.
    """
    password = os.environ.get("GPUPOOL_BROKER_PASSWORD")
    path = os.environ.get("GPUPOOL_BROKER_PASSWORD_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                password = handle.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read GPUPOOL_BROKER_PASSWORD_FILE {path!r}: {exc}") from exc
    if not password:
        return broker
    return BrokerAddress(broker.host, broker.port, broker.username, password, broker.tls)


def default_state_dir(role: str) -> str:
    """``$GPUPOOL_STATE_DIR``, else ``$XDG_STATE_HOME/gpupool/<role>`` (``~/.local/state/...``)."""
    explicit = os.environ.get("GPUPOOL_STATE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "gpupool", role)


def parse_endpoint(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) into its parts.

    Raises:
        UsageError: no port where one is needed, or a port that is not a number.
    """
    match = re.fullmatch(
        r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:\[\]]*)(?::(?P<port>[^:]*))?", text
    )
    if match is None:
        raise UsageError(f"address {text!r}: expected HOST:PORT")
    host = match["v6"] or match["host"] or "127.0.0.1"
    port_text = match["p6"] or match["port"]
    if port_text is None:
        if default_port is None:
            raise UsageError(f"address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def coordinator_address(explicit: str | None = None) -> str:
    """The coordinator to talk to: ``explicit``, else ``$GPUPOOL_COORDINATOR``, else 127.0.0.1:50051."""
    address = explicit or os.environ.get("GPUPOOL_COORDINATOR") or DEFAULT_COORDINATOR
    host, port = parse_endpoint(address, default_port=50051)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}


def parse_memory_limit(text: str, total: int) -> int:
    """Turn ``80%``, ``6GiB``, ``512M`` or a plain byte count into bytes, given the memory in total.

    Raises:
        UsageError: an unreadable limit, a percentage outside (0, 100], or zero bytes.
    """
    value = text.strip().lower()
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError as exc:
            raise UsageError(f"memory limit {text!r}: not a percentage") from exc
        if not 0 < percent <= 100:
            raise UsageError(f"memory limit {text!r}: percentage must be in (0, 100]")
        return int(total * percent / 100)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    if match is None or match[2] not in _UNITS:
        raise UsageError(f"memory limit {text!r}: expected a percentage like 80% or a size like 6GiB")
    limit = int(float(match[1]) * _UNITS[match[2]])
    if limit <= 0:
        raise UsageError(f"memory limit {text!r} must be more than zero")
    return limit
