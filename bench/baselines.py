"""The bare baselines, each a separate process: a grpc.aio server with raw-bytes methods, and a raw TCP sink.

``python -m bench.baselines grpc|tcp`` serves on a free port and prints ``{"event": "ready", "port": N}``.
``python -m bench.baselines grpc-client HOST:PORT`` is the bare gRPC server's client for the transfer section,
in a process of its own: grpc.aio serves every channel of a process from the event loop that made its first
one, and a client on a second loop there pays two thread hops per event (several times slower), so it
cannot share the bench's process with gpupool's client. It prints a ready line, then answers each stdin line
``upload N`` or ``download N`` with ``{"seconds": S}`` for moving N bytes (at most 256 MiB) in 1 MiB chunks.

gRPC methods (identity serializers: bytes in, bytes out; no protobuf anywhere):
    /bench.Bare/Echo       unary: returns the request
    /bench.Bare/Upload     stream-unary: first message an 8-byte little-endian total, then chunks copied
                           into a buffer of that size allocated for this call; returns the byte count
    /bench.Bare/Download   unary-stream: request = 8-byte little-endian total and 8-byte chunk size; streams
                           that many bytes in chunks sliced from a prepared buffer (one copy per chunk)
TCP (``tcp``): each connection sends an 8-byte total then that many bytes (the server reads them into a
buffer allocated for this upload and answers 8 bytes), or sends b"GET" + 8-byte total and reads that many
bytes back.

Fair to both sides: a receiver of a new array must put it in new memory, so each upload lands in a fresh
buffer (as an agent's does), not in one reused warm sink; the download source holds real bytes, not
untouched zero pages (reading those reads one cached page over and over, faster than any real array).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
]


async def serve_grpc() -> None:
    """The bare gRPC server."""
    source = _source()

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def upload(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        chunks = aiter(requests)
        (total,) = struct.unpack("<Q", await anext(chunks))
        view = np.empty(total, np.uint8).data
        offset = 0
        async for chunk in chunks:
            view[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        return struct.pack("<Q", offset)

    async def download(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        total, chunk = struct.unpack("<QQ", request)
        view = memoryview(source)
        for start in range(0, total, chunk):
            yield bytes(view[start % len(source) : start % len(source) + min(chunk, total - start)])

    handler = grpc.method_handlers_generic_handler(
        "bench.Bare",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Download": grpc.unary_stream_rpc_method_handler(download),
        },
    )
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "ready", "role": "bare-grpc", "port": port}), flush=True)
    await server.wait_for_termination()


async def run_grpc_client(address: str) -> None:
    """The bare gRPC client, driven by lines on stdin."""
    source = memoryview(_source())
    chunk_bytes = 1 << 20
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        upload = channel.stream_unary("/bench.Bare/Upload", None, None)
        download = channel.unary_stream("/bench.Bare/Download", None, None)

        async def chunks(total: int) -> AsyncIterator[bytes]:
            yield struct.pack("<Q", total)
            for start in range(0, total, chunk_bytes):
                yield bytes(source[start : start + chunk_bytes])  # gRPC sends bytes only: one copy

        async def up(total: int) -> None:
            reply = await upload(chunks(total))
            if struct.unpack("<Q", reply)[0] != total:
                raise RuntimeError("the server counted another size")

        async def down(total: int) -> None:
            target = np.empty(total, np.uint8).data  # a new array in new memory, as any receiver's
            offset = 0
            async for chunk in download(struct.pack("<QQ", total, chunk_bytes)):
                target[offset : offset + len(chunk)] = chunk
                offset += len(chunk)
            if offset != total:
                raise RuntimeError(f"short download: {offset} of {total} bytes")

        print(json.dumps({"event": "ready", "role": "bare-grpc-client"}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command, total = line.split()
            start = time.perf_counter()
            await (up if command == "upload" else down)(int(total))
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def serve_tcp() -> None:
    """The raw TCP server, one connection at a time."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"event": "ready", "role": "bare-tcp", "port": listener.getsockname()[1]}), flush=True)
    source = _source()
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
                view = np.empty(total, np.uint8).data
                got = 0
                while got < total:
                    n = conn.recv_into(view[got:], min(total - got, 4 << 20))
                    if n == 0:
                        break
                    got += n
                conn.sendall(struct.pack("<Q", got))


def _source() -> bytes:
    """256 MiB of real bytes to send from."""
    return np.arange(64 << 20, dtype=np.uint32).tobytes()


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
    elif sys.argv[1:2] == ["grpc-client"] and len(sys.argv) == 3:
        asyncio.run(run_grpc_client(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.baselines grpc|tcp|grpc-client HOST:PORT")
