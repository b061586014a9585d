"""A private event loop on a daemon thread, so the synchronous client API can drive grpc.aio.

The user's thread submits coroutines with :meth:`LoopThread.run` and blocks on the result with a
deadline; every channel lives on this loop. One loop per :class:`gpupool.Pool`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gpupool._errors import DeadlineExceeded, UsageError

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running on its own thread until :meth:`stop`.

    Args:
        name: the thread's name, e.g. ``gpupool[job-1a2b].loop``.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._stopped = False
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop itself (for ``call_soon_threadsafe``)."""
        return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T], *, timeout: float, what: str = "call") -> T:
        """Run ``coroutine`` on the loop and wait for its result.

        Raises:
            DeadlineExceeded: no result within ``timeout`` (the coroutine is cancelled).
            UsageError: the loop was stopped (the pool is closed).
            Whatever the coroutine raises.
        """
        if self._stopped:
            coroutine.close()
            raise UsageError("the pool is closed")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise UsageError("a blocking gpupool call was made from inside the pool's own event loop")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise DeadlineExceeded("gpupool", f"{what} took longer than {timeout:.1f} s") from exc

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Schedule a plain callback on the loop from any thread; a no-op once stopped."""
        if not self._stopped:
            try:
                self._loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left, stop the loop and join the thread (bounded by ``timeout``)."""
        if self._stopped:
            return
        self._stopped = True

        async def cancel_rest() -> None:
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            if rest:
                await asyncio.wait(rest, timeout=timeout)

        try:
            asyncio.run_coroutine_threadsafe(cancel_rest(), self._loop).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
