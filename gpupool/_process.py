"""Starting gpupool's own programs as subprocesses and waiting until they say they are ready.

Every long-lived gpupool program (agent, coordinator, embedded broker) prints one JSON line to stdout
once it serves, e.g. ``{"event": "ready", "role": "agent", "endpoint": "127.0.0.1:40123", ...}``, and
logs to stderr. :func:`spawn` starts one and returns that line's fields, so callers may ask for port 0
and learn the real port.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from gpupool._errors import ConnectError

__all__ = ["Child", "announce_ready", "spawn"]


def announce_ready(role: str, **fields: object) -> None:
    """Print the ready line for this process (called once by each program when it serves)."""
    print(json.dumps({"event": "ready", "role": role, **fields}), flush=True)


@dataclass(slots=True)
class Child:
    """A started gpupool program.

    Attributes:
        role: what it is ("agent", "coordinator", "broker").
        process: the subprocess.
        ready: the fields of its ready line.
    """

    role: str
    process: subprocess.Popen[bytes]
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (or SIGINT), then SIGKILL after ``timeout``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, with no chance to clean up (what a crash or a pulled plug looks like)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def spawn(
    role: str,
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    stderr: IO[bytes] | int | None = None,
) -> Child:
    """Start ``python -m <argv...>`` style programs and wait for their ready line.

    ``argv`` is the full command; use ``[sys.executable, "-m", "gpupool.agent", ...]``.

    Raises:
        ConnectError: the process exited or said nothing ready within ``timeout``; the message
            carries what it printed.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=full_env
    )
    assert process.stdout is not None
    child = Child(role, process)
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                process.stdout.close()
                raise ConnectError(
                    role, f"not ready within {timeout:.0f} s; it printed: {' | '.join(seen)[-800:]}"
                )
            if not selector.select(min(left, 0.5)):
                if process.poll() is not None:
                    break
                continue
            data = os.read(process.stdout.fileno(), 65536)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                seen.append(text)
                try:
                    message = json.loads(text)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("event") == "ready":
                    child.ready = message
                    _drain_in_background(process.stdout)
                    return child
    code = process.wait(5)
    process.stdout.close()
    raise ConnectError(
        role, f"exited with code {code} before it was ready; it printed: {' | '.join(seen)[-800:]}"
    )


def _drain_in_background(stream: IO[bytes]) -> None:
    """Keep reading a child's stdout so it never blocks on a full pipe."""
    import threading

    def drain() -> None:
        try:
            for line in stream:
                sys.stdout.buffer.write(line) if os.environ.get("GPUPOOL_ECHO_CHILDREN") else None
        except (OSError, ValueError):
            pass
        finally:
            stream.close()  # at EOF (the child exited): an unclosed pipe is a ResourceWarning

    threading.Thread(target=drain, name="gpupool.child-stdout", daemon=True).start()
