"""TLS for plain sockets (the bulk byte path, :mod:`gpupool.protocol.bulk`), verified as gRPC's channels are.

The agent's certificate and key are the ones its gRPC server presents; a peer checks them against the
pool CA for the name ``<agent-id>.agent.gpupool``, as :func:`gpupool.transport.rpc.aio_channel` does.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from gpupool.transport.rpc import ServerTLS

__all__ = ["client_context", "server_context"]


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """A server-side context presenting ``tls``'s certificate chain and key (TLS 1.2 or later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads a certificate and key only from files: a private directory, gone once they are read.
    with tempfile.TemporaryDirectory(prefix="gpupool-tls-") as directory:
        chain = os.path.join(directory, "chain.pem")
        key = os.path.join(directory, "key.pem")
        for path, data in ((chain, tls.certificate_pem), (key, tls.key_pem)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        context.load_cert_chain(chain, key)
    return context


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    """A client-side context that trusts only the pool CA and checks the peer's name."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
