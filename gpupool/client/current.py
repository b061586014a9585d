"""The current pool, as CuPy has a current device: where ``gp.zeros``, ``gp.asarray``... create arrays.

``with gp.connect() as pool:`` makes ``pool`` current inside the block (nested blocks restore the outer
pool on exit) and ``pool.use()`` makes it current until another is used or it closes; a closed pool is
never current. With none, the first call that needs one connects to ``$GPUPOOL_COORDINATOR`` with the
environment's credentials (``$GPUPOOL_TOKEN``, ``$GPUPOOL_CA``), as CuPy falls back to device 0, and keeps
that *default pool* for the rest of the process (closed at interpreter exit). Which pool is current is
per thread (a context variable): a new thread starts with none, and so uses the default pool.
"""

from __future__ import annotations

import atexit
import threading

from gpupool.client.pool import Pool, active_pool, connect

__all__ = ["close_default_pool", "current_pool"]

_default: Pool | None = None
_default_lock = threading.Lock()


def current_pool() -> Pool:
    """The pool arrays are created on now: the current one, else the default pool (connecting it first).

    Raises:
        ConnectError, AuthError: there is no current pool, and connecting to ``$GPUPOOL_COORDINATOR``
            (default ``127.0.0.1:50051``) with ``$GPUPOOL_TOKEN`` failed; for the caller to handle, or to
            avoid with ``gp.connect(...).use()``.
    """
    pool = active_pool()
    return pool if pool is not None else _default_pool()


def _default_pool() -> Pool:
    global _default
    with _default_lock:  # one connection however many threads ask at once
        if _default is None or _default.closed:
            _default = connect()
        return _default


def close_default_pool() -> None:
    """Close the default pool if there is one (a later call connects again); for tests and notebooks."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.close()


atexit.register(close_default_pool)
