"""The rig owner's handle on a running agent: a Unix socket on the rig itself, and ``gpupool-agent pause`` /
``resume`` / ``state`` to talk to it.

Pausing takes the GPU back from the pool without the operator: the agent turns DRAINING (no new arrays are
placed on it, uploads are refused) as ``gpupool drain`` does, and ``resume`` makes it READY again. The socket
is the owner's only: it is made with mode 0600 in the agent's state directory (itself 0700), so only the
agent's own user (or root) can use it. One request per connection, a line each way: ``pause``, ``resume`` or
``state`` in, a JSON object out (``{"state": "draining"}``, or ``{"error": "..."}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from gpupool._errors import ConnectError

__all__ = ["COMMANDS", "ControlServer", "ask"]

#: What the socket understands.
COMMANDS: Final = ("pause", "resume", "state")
#: Seconds a connection has to send its line, and a client to get its answer.
TIMEOUT: Final = 10.0

#: Applies a command ("pause", "resume" or "state") and returns the agent's state name after it.
Handler = Callable[[str], Awaitable[str]]


class ControlServer:
    """The agent's end: listens on ``path`` until closed."""

    def __init__(self, path: Path, handle: Handler) -> None:
        self.path = path
        self._handle = handle
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (replacing a socket file a previous run left behind).

        Raises:
            OSError: the path cannot be bound.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                line = (await reader.readline()).decode(errors="replace").strip()
            if line not in COMMANDS:
                answer = {"error": f"unknown request {line[:40]!r}: one of {', '.join(COMMANDS)}"}
            else:
                answer = {"state": await self._handle(line)}
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def ask(path: Path, command: str) -> str:
    """The owner's end: send ``command`` to the agent listening on ``path``; returns its state name.

    Raises:
        ConnectError: no agent listens there (not running, or started without a control socket).
        ValueError: the agent refused the request.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(command.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ConnectError(str(path), f"no agent answers on its control socket: {exc}") from exc
    answer = json.loads(data or b"{}")
    if "error" in answer or "state" not in answer:
        raise ValueError(str(answer.get("error", "no answer")))
    return str(answer["state"])
