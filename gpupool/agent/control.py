"""The rig owner's handle on a running agent: a Unix socket on the rig itself, and ``gpupool-agent pause`` /
``resume`` / ``state`` to talk to it.

Pausing takes the GPU back from the pool without the operator: the agent turns DRAINING (no new arrays are
placed on it, uploads are refused) as ``gpupool drain`` does, the coordinator moves its buffers to other
agents, and ``resume`` makes it READY again. The socket is the owner's only: it is made with mode 0600 in the
agent's state directory (itself 0700), so only the agent's own user (or root) can use it. One request per
connection, a line each way: ``pause [SECONDS]``, ``resume`` or ``state`` in, a JSON object out
(``{"state": "draining"}``, or ``{"error": "..."}``). A pause waits up to SECONDS (default
:data:`PAUSE_WAIT`) for the buffers to move, and its answer says what moved where: ``"moved"``, a list of
``{"session", "agent_id", "endpoint", "worker", "buffers", "bytes"}``; ``"held"``, the buffers still here;
``"left"``, ``"left_bytes"``, ``"note"``, ``"finished"`` (see
:class:`~gpupool.agent.evacuation.EvacuationSummary`).
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

__all__ = ["COMMANDS", "PAUSE_WAIT", "ControlServer", "ask"]

#: What the socket understands.
COMMANDS: Final = ("pause", "resume", "state")
#: Seconds a connection has to send its line, and a client to get its answer (beyond a pause's wait).
TIMEOUT: Final = 10.0
#: Seconds a pause waits for the agent's buffers to move, unless the request says otherwise.
PAUSE_WAIT: Final = 120.0
#: The longest wait a pause may ask for.
MAX_PAUSE_WAIT: Final = 3600.0

#: Applies a command ("pause", "resume" or "state"; a pause with the seconds it may wait for the moves) and
#: returns the answer: the agent's state name after it as "state", and for a pause what moved.
Handler = Callable[[str, float], Awaitable[dict[str, object]]]


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
            answer: dict[str, object]
            try:
                command, wait = _parse_request(line)
            except ValueError as exc:
                answer = {"error": str(exc)}
            else:
                answer = await self._handle(command, wait)
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _parse_request(line: str) -> tuple[str, float]:
    """``pause [SECONDS]``, ``resume`` or ``state``: the command and the seconds a pause may wait.

    Raises:
        ValueError: anything else (the message is the answer's error).
    """
    command, _, rest = line.partition(" ")
    if command not in COMMANDS or (rest and command != "pause"):
        raise ValueError(f"unknown request {line[:40]!r}: one of {', '.join(COMMANDS)}")
    if not rest:
        return command, PAUSE_WAIT
    try:
        wait = float(rest)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_PAUSE_WAIT:
        raise ValueError(f"a pause waits 0 to {MAX_PAUSE_WAIT:g} seconds, not {rest[:20]!r}")
    return command, wait


def ask(path: Path, command: str, *, wait: float | None = None) -> dict[str, object]:
    """The owner's end: send ``command`` to the agent listening on ``path`` (a pause waiting up to ``wait``
    seconds for the agent's buffers to move, :data:`PAUSE_WAIT` if None); returns its answer, whose "state"
    is the agent's state name (see the module).

    Raises:
        ConnectError: no agent listens there (not running, or started without a control socket).
        ValueError: the agent refused the request.
    """
    line = command if wait is None or command != "pause" else f"pause {wait:g}"
    seconds = TIMEOUT + (PAUSE_WAIT if wait is None else wait) if command == "pause" else TIMEOUT
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(seconds)
            sock.connect(str(path))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ConnectError(str(path), f"no agent answers on its control socket: {exc}") from exc
    answer = json.loads(data or b"{}")
    if not isinstance(answer, dict) or "error" in answer or "state" not in answer:
        raise ValueError(str(answer.get("error", "no answer")) if isinstance(answer, dict) else "no answer")
    return answer
