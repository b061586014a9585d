"""What ran where: NumPy functions called on remote arrays, counted on the pool and on the host.

A function gpupool does not run on the pool (or not with those arguments) runs on the host copy of its
arguments, cuPyNumeric's way: :func:`run_on_host` downloads the remote arrays among them, calls NumPy and
warns once per function with :class:`~gpupool.HostFallbackWarning`. :func:`coverage` reports the counts.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any, Final, Literal

import numpy as np

from gpupool._errors import UsageError
from gpupool._warnings import HostFallbackWarning
from gpupool.client.graph import GraphArray

__all__ = ["count", "coverage", "run_on_host"]

_LOCK: Final = threading.Lock()
_COUNTS: dict[str, dict[str, int]] = {}
_WARNED: set[str] = set()


def count(name: str, where: Literal["pool", "host"]) -> None:
    """Count one call of NumPy's ``name`` that ran ``where``."""
    with _LOCK:
        counts = _COUNTS.setdefault(name, {"pool": 0, "host": 0})
        counts[where] += 1


def coverage(*, show: bool = False, reset: bool = False) -> dict[str, dict[str, int]]:
    """How many calls of each NumPy function on remote arrays ran on the pool and how many on the host.

    Args:
        show: also print the counts as a table (functions that ran on the host first).
        reset: start counting afresh (and warn again for functions that fall back to the host).

    Returns:
        ``{"std": {"pool": 3, "host": 0}, "median": {"pool": 0, "host": 1}, ...}`` (a copy).
    """
    with _LOCK:
        report = {name: dict(counts) for name, counts in sorted(_COUNTS.items())}
        if reset:
            _COUNTS.clear()
            _WARNED.clear()
    if show:
        width = max((len(name) for name in report), default=8)
        print(f"{'function':<{width}}  {'pool':>6}  {'host':>6}")
        for name, counts in sorted(report.items(), key=lambda item: (-item[1]["host"], item[0])):
            print(f"{name:<{width}}  {counts['pool']:>6}  {counts['host']:>6}")
    return report


def _to_host(value: Any) -> Any:
    if isinstance(value, GraphArray):
        return value.get()
    if isinstance(value, list | tuple):
        return type(value)(_to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    return value


def run_on_host(name: str, function: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
    """Call NumPy's ``function`` on host copies of ``args`` and ``kwargs``; warns once per ``name``.

    The result is NumPy's (host arrays). ``out=`` a remote array is refused: the result would not reach it.

    Raises:
        UsageError: ``out=`` names a remote array. And whatever NumPy raises for the arguments.
    """
    if any(isinstance(v, GraphArray) for v in np.atleast_1d(np.asarray(kwargs.get("out"), dtype=object))):
        raise UsageError(f"numpy.{name} runs on the host here: out= cannot be a remote array")
    with _LOCK:
        first = name not in _WARNED
        _WARNED.add(name)
    if first:
        warnings.warn(
            f"numpy.{name} is not implemented on the gpupool pool for these arguments; it ran on the host "
            "copy of its arguments (downloaded) and returned a NumPy result",
            HostFallbackWarning,
            stacklevel=4,
        )
    count(name, "host")
    return function(*_to_host(tuple(args)), **_to_host(dict(kwargs)))
