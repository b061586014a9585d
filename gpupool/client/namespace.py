"""The ``gpupool`` namespace's functions over NumPy's: what makes ``import gpupool as gp`` an Array API
namespace whose every result is an array of the namespace.

:func:`lift` turns a NumPy function into one of the namespace. Called with a remote array among its
arguments, NumPy's function dispatches to it (``__array_ufunc__``, ``__array_function__``): it runs on the
pool, or on the host copy with :class:`~gpupool.HostFallbackWarning` where gpupool does not run it on the
pool. Called with values only (0-d arrays and small results the client keeps,
:class:`~gpupool.client.values.PendingValue`), it computes them here. Either way :func:`to_namespace` makes
the result the namespace's: a 0-d result is a value kept here; a host array of one dimension or more is
uploaded to the pool of the remote array that led (or to the current pool).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from gpupool.client.array import RemoteArray, upload
from gpupool.client.current import current_pool
from gpupool.client.session import Session
from gpupool.client.values import PendingValue

__all__ = ["call", "lead_array", "lift", "to_host", "to_namespace"]


def lift(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (NumPy's) as a function of the namespace, with its signature (for ``inspect``)."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        return call(function, args, kwargs)

    return run


def call(function: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``function(*args, **kwargs)`` on the pool where a remote array is among them, else here; the result
    as the namespace's (:func:`to_namespace`)."""
    lead = lead_array([*args, *kwargs.values()])
    result = function(*to_host(args), **{k: to_host(v) for k, v in kwargs.items()})
    return to_namespace(result, None if lead is None else lead.session)


def lead_array(values: Iterable[Any]) -> RemoteArray | None:
    """The first remote array among ``values`` (looking into lists and tuples), if any."""
    for value in values:
        if isinstance(value, RemoteArray):
            return value
        if isinstance(value, list | tuple):
            found = lead_array(value)
            if found is not None:
                return found
    return None


def to_host(value: Any) -> Any:
    """``value`` with the values kept here (:class:`PendingValue`) as NumPy arrays, computing pending ones;
    remote arrays stay as they are."""
    if isinstance(value, PendingValue):
        return np.asarray(value.compute())
    if isinstance(value, list | tuple) and any(isinstance(v, PendingValue | list | tuple) for v in value):
        return type(value)(to_host(v) for v in value)
    return value


def to_namespace(result: Any, session: Session | None) -> Any:
    """A function's ``result`` as arrays of the namespace: remote arrays and values as they are, 0-d NumPy
    results as values kept here, other NumPy arrays uploaded through ``session`` (None: the current pool);
    tuples (named ones too) and lists item by item; anything else as it is."""
    if isinstance(result, RemoteArray | PendingValue):
        return result
    if isinstance(result, np.ndarray | np.generic):
        if result.ndim == 0:
            return PendingValue.known(result)
        if session is None:
            return current_pool().asarray(result)
        return upload(session, np.asarray(result))
    if isinstance(result, tuple):
        items = [to_namespace(item, session) for item in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    if isinstance(result, list):
        return [to_namespace(item, session) for item in result]
    return result
