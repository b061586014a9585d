"""The bare baselines, each a separate process: a grpc.aio server with raw-bytes methods, and a raw TCP sink.

``python -m bench.baselines grpc|tcp`` serves on a free port and prints ``{"event": "ready", "port": N}``.

gRPC methods (identity serializers: bytes in, bytes out; no protobuf anywhere):
    /bench.Bare/Echo       unary: returns the request
    /bench.Bare/Upload     stream-unary: consumes chunks into a preallocated buffer, returns the byte count
    /bench.Bare/Download   unary-stream: request = 8-byte little-endian total and 8-byte chunk size; streams
                           that many bytes in chunks sliced from a prepared buffer (one copy per chunk)
TCP (``tcp``): each connection sends an 8-byte total then that many bytes (the server reads them into a
preallocated buffer and answers 8 bytes), or sends b"GET" + 8-byte total and reads that many bytes back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator

import grpc

GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.so_reuseport", 0)]


async def serve_grpc() -> None:
    """The bare gRPC server."""
    sink = bytearray(512 << 20)
    source = bytes(256 << 20)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        offset = 0
        view = memoryview(sink)
        async for chunk in requests:
            view[offset:offset + len(chunk)] = chunk
            offset += len(chunk)
        return struct.pack("<Q", offset)

    async def download(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        total, chunk = struct.unpack("<QQ", request)
        view = memoryview(source)
        for start in range(0, total, chunk):
            yield bytes(view[start % len(source):start % len(source) + min(chunk, total - start)])

    handler = grpc.method_handlers_generic_handler("bench.Bare", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download),
    })
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "ready", "role": "bare-grpc", "port": port}), flush=True)
    await server.wait_for_termination()


def serve_tcp() -> None:
    """The raw TCP server, one connection at a time."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"event": "ready", "role": "bare-tcp", "port": listener.getsockname()[1]}), flush=True)
    sink = bytearray(512 << 20)
    source = bytes(256 << 20)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = _read_exact(conn, 3)
                if not head:
                    break
                if head == b"GET":
                    (total,) = struct.unpack("<Q", _read_exact(conn, 8))
                    view = memoryview(source)
                    sent = 0
                    while sent < total:
                        n = min(len(source), total - sent)
                        conn.sendall(view[:n])
                        sent += n
                    continue
                (total,) = struct.unpack("<Q", head + _read_exact(conn, 5))
                view = memoryview(sink)
                got = 0
                while got < total:
                    n = conn.recv_into(view[got:], min(total - got, 4 << 20))
                    if n == 0:
                        break
                    got += n
                conn.sendall(struct.pack("<Q", got))


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            return b""
        data += part
    return data


if __name__ == "__main__":
    if sys.argv[1:] == ["grpc"]:
        asyncio.run(serve_grpc())
    elif sys.argv[1:] == ["tcp"]:
        serve_tcp()
    else:
        sys.exit("usage: python -m bench.baselines grpc|tcp")
