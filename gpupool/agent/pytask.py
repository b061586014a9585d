"""Python tasks that cannot be traced (``RunPython``): run in a process of their own, only where the rig's
owner allows it (``gpupool-agent --allow-python``).

A task arrives as cloudpickle bytes of ``(function, args, kwargs)``. The agent spawns a fresh interpreter
(``python -m gpupool.agent.pytask``; spawned, never forked from the agent), gives it the bytes on stdin and
reads cloudpickle bytes of the outcome from stdout: ``("ok", result)`` or ``("raised", type name, message,
traceback)``. The process sees only its worker's GPU (``CUDA_VISIBLE_DEVICES``). Whatever the task does to
its process — a fault, a sticky CUDA error, ``os.abort()``, a hang past its deadline (then it is killed) —
ends that process only: the caller is told precisely, and the agent and every other session carry on.

The task is arbitrary code with the agent's user's rights on the rig: that is why it is the owner's choice
(SECURITY.md). Its memory is not counted against the worker's limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Final

import cloudpickle

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.procworker import AnyWorker
from gpupool.protocol.errors import RpcRefusal

__all__ = ["STDERR_TAIL", "PythonOverdue", "PythonRunner", "main"]

#: Characters of a failed task's stderr passed back to its caller.
STDERR_TAIL: Final = 4000


class PythonOverdue(Exception):
    """The task ran past its deadline; its process was killed."""


class PythonRunner:
    """Runs ``RunPython`` requests: one task at a time per worker, each in a process of its own.

    Args:
        workers: the agent's workers.
        allowed: the owner's ``--allow-python``; without it every request is refused.
    """

    def __init__(self, workers: Sequence[AnyWorker], *, allowed: bool) -> None:
        self._workers = tuple(workers)
        self.allowed = allowed
        self._lanes = [asyncio.Semaphore(1) for _ in self._workers]

    async def run(self, request: agent_pb2.RunPythonRequest, *, seconds: float) -> agent_pb2.RunPythonReply:
        """Run one task within ``seconds``.

        Raises:
            RpcRefusal: permission-denied (not allowed here), not-accepting (no such worker),
                kernel-failed (the process died: how, and the end of its stderr).
            PythonOverdue: the deadline passed (the process was killed).
        """
        if not self.allowed:
            raise RpcRefusal(
                "permission-denied",
                "this agent runs no Python tasks: its owner did not start it with --allow-python",
            )
        if request.worker >= len(self._workers):
            raise RpcRefusal("not-accepting", f"this agent has no worker {request.worker}")
        worker = self._workers[request.worker]
        env = dict(os.environ)
        if worker.nvml_index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(worker.nvml_index)
        async with self._lanes[request.worker]:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpupool.agent.pytask",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            try:
                async with asyncio.timeout(seconds):
                    out, err = await process.communicate(request.payload)
            except TimeoutError:
                raise PythonOverdue(
                    f"the Python task ran past its {seconds:.0f} s; its process was killed"
                ) from None
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
        if process.returncode != 0:
            raise RpcRefusal(
                "kernel-failed",
                f"worker {request.worker}: the Python task's process died ({_how(process.returncode)}); "
                f"the agent carries on. Its stderr ended: {err.decode(errors='replace')[-STDERR_TAIL:]}",
            )
        return agent_pb2.RunPythonReply(payload=out)


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def main() -> int:
    """The task's process: read the task from stdin, run it, write the outcome to stdout."""

    payload = sys.stdin.buffer.read()
    try:
        function, args, kwargs = cloudpickle.loads(payload)
        outcome: tuple[object, ...] = ("ok", function(*args, **kwargs))
        data = cloudpickle.dumps(outcome)
    except Exception as exc:
        data = cloudpickle.dumps(("raised", type(exc).__name__, str(exc), traceback.format_exc()))
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
