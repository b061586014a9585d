"""Every gRPC channel and server gpupool makes, in one place: options, TLS, credentials, addresses.

Servers listen in plaintext only on loopback unless told ``insecure``; beyond loopback they need a
certificate (:class:`ServerTLS`). Clients dial TLS whenever they hold the pool CA, checking that the peer
presents a certificate for the name they expect: ``coordinator.gpupool`` for the coordinator,
``<agent-id>.agent.gpupool`` for an agent (so a hijacked endpoint cannot pass for the agent placement
named). Bearer tokens travel as ``authorization`` metadata, capabilities as ``gpupool-capability``.

Errors of sync and async calls are translated by :func:`gpupool.protocol.errors.translate_rpc_error`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import grpc

from gpupool._config import MAX_MESSAGE_BYTES, parse_endpoint
from gpupool._errors import ConnectError, UsageError

__all__ = [
    "AUTHORIZATION_KEY",
    "CAPABILITY_KEY",
    "CHANNEL_OPTIONS",
    "SERVER_OPTIONS",
    "ServerTLS",
    "aio_channel",
    "bearer_metadata",
    "format_endpoint",
    "is_loopback",
    "start_server",
    "sync_channel",
]

log = logging.getLogger(__name__)

AUTHORIZATION_KEY: Final = "authorization"
CAPABILITY_KEY: Final = "gpupool-capability"

_MESSAGE_OPTIONS: Final = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # HTTP/2 DATA frames of up to 1 MiB (the default is 16 KiB): one frame per chunk of the byte path.
    # With TLS on a 2-core VM, 256 MiB uploads to 2 agents ran at 0.64-0.82x plaintext with it (6 runs, 5
    # at 0.7x or more) and 0.59-0.71x without (4 runs); plaintext is unchanged (scripts/bench --only tls).
    ("grpc.http2.max_frame_size", 1 << 20),
)

#: Options of every client channel: message limits and keepalive pings that notice a dead peer.
CHANNEL_OPTIONS: Final = (
    *_MESSAGE_OPTIONS,
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

#: Options of every server: message limits, no port sharing (a second server on a taken port must fail,
#: not take half the calls), and tolerance of the clients' keepalive pings.
SERVER_OPTIONS: Final = (
    *_MESSAGE_OPTIONS,
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTLS:
    """A server's certificate chain and key, PEM."""

    certificate_pem: bytes
    key_pem: bytes


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, brackets allowed) is this machine's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    *,
    tls: ServerTLS | None,
    insecure: bool = False,
    what: str = "server",
) -> tuple[grpc.aio.Server, str]:
    """Start a grpc.aio server on ``listen`` with the services ``register`` adds; returns it and its address.

    Serves TLS when ``tls`` is given. Without it, plaintext is allowed on loopback, and beyond loopback
    only with ``insecure`` (logged as a warning).

    Raises:
        UsageError: plaintext beyond loopback without ``insecure``, or a malformed address.
        ConnectError: the address cannot be bound.
    """
    host, port = parse_endpoint(listen)
    if tls is None and not is_loopback(host):
        if not insecure:
            raise UsageError(
                f"the {what} would listen on {listen} in plaintext: beyond loopback it serves TLS, which "
                "needs its certificate (enrol the agent; give the coordinator a --state-dir), "
                "or pass --insecure to serve plaintext anyway"
            )
        log.warning("%s serves PLAINTEXT on %s (--insecure): anyone on the network can read it", what, listen)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    register(server)
    address = format_endpoint(host, port)
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.certificate_pem)])
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConnectError(listen, f"cannot listen: {exc}") from exc
    if bound == 0:
        raise ConnectError(listen, "cannot listen (in use, or not an address of this host)")
    await server.start()
    return server, format_endpoint(host, bound)


#: The channel option that gives a channel connections of its own (no pooling with other channels).
PRIVATE: Final = (("grpc.use_local_subchannel_pool", 1),)


def _secure_options(server_name: str) -> tuple[tuple[str, object], ...]:
    return (("grpc.ssl_target_name_override", server_name),) if server_name else ()


def aio_channel(
    target: str,
    *,
    ca_pem: bytes | None = None,
    server_name: str = "",
    connection: int = 0,
    private: bool = False,
) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: TLS verified against ``ca_pem`` (for ``server_name``) if given.

    Channels to one target share one connection (gRPC pools them by target and options) unless their
    ``connection`` numbers differ: each number is a connection of its own. A ``private`` channel shares
    nothing: it does not inherit another channel's reconnect backoff either (a session made right after a
    coordinator restart would otherwise be refused at once, as the one before it was while it was down).
    Create it on the loop that will use it.
    """
    own: tuple[tuple[str, int], ...] = (("gpupool.connection", connection),) if connection else ()
    own += PRIVATE if private else ()
    if ca_pem is None:
        return grpc.aio.insecure_channel(target, options=(*CHANNEL_OPTIONS, *own))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(
        target, credentials, options=(*CHANNEL_OPTIONS, *_secure_options(server_name), *own)
    )


def sync_channel(
    target: str, *, ca_pem: bytes | None = None, server_name: str = "", private: bool = False
) -> grpc.Channel:
    """A blocking channel to ``target``, secured (and ``private``) as :func:`aio_channel` does."""
    own = PRIVATE if private else ()
    if ca_pem is None:
        return grpc.insecure_channel(target, options=(*CHANNEL_OPTIONS, *own))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.secure_channel(
        target, credentials, options=(*CHANNEL_OPTIONS, *_secure_options(server_name), *own)
    )


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a bearer token (none for an empty token)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()
