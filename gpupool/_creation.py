"""The ``gpupool`` namespace's creation functions, with the Array API standard's signatures.

Arrays of one dimension or more are made on the current pool, by its agents where
:mod:`gpupool.client.creation` can (``zeros``, ``arange``, ``eye``...), else uploaded; 0-d arrays are values
the client keeps (:class:`~gpupool.client.values.PendingValue`): a scalar rides inside the programs that
use it rather than costing a buffer and a round trip. ``device=`` accepts only the pool's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gpupool.client import creation
from gpupool.client.array import RemoteArray
from gpupool.client.creation import ShapeLike, normalize_shape
from gpupool.client.device import check_device
from gpupool.client.namespace import call, lift, to_host, to_namespace
from gpupool.client.values import PendingValue
from gpupool.protocol.codec import check_dtype

__all__ = [
    "arange",
    "asarray",
    "empty",
    "empty_like",
    "eye",
    "from_dlpack",
    "full",
    "full_like",
    "linspace",
    "meshgrid",
    "ones",
    "ones_like",
    "tril",
    "triu",
    "zeros",
    "zeros_like",
]


def asarray(
    obj: Any,
    /,
    dtype: Any = None,
    *,
    device: Any = None,
    copy: bool | None = None,
    rows: Sequence[int] | None = None,
) -> Any:
    """``obj`` as an array of the namespace: a remote array as it is (converted if ``dtype`` differs, copied
    if ``copy``), host data uploaded to the current pool (``rows`` choosing its sharding), a scalar or 0-d
    data as a value the client keeps.

    Raises:
        ValueError: ``copy=False`` for data that must be copied (host data is, to reach the pool).
        UnsupportedDType, UsageError: as :meth:`gpupool.Pool.asarray`.
    """
    check_device(device)
    if isinstance(obj, RemoteArray | PendingValue):
        if rows is not None and isinstance(obj, RemoteArray):
            return creation.asarray(obj, dtype, rows=rows)  # refused there, with the reason
        same = dtype is None or np.dtype(dtype) == obj.dtype
        if same and not copy:
            return obj
        if copy is False:
            raise ValueError("asarray(copy=False): converting the dtype makes a copy")
        if isinstance(obj, RemoteArray):
            return obj.copy() if same else obj.astype(dtype)
        return PendingValue.known(np.asarray(obj.compute(), dtype=dtype))
    if copy is False:
        raise ValueError("asarray(copy=False): host data is copied to reach the pool")
    host = np.asarray(to_host(obj), dtype=None if dtype is None else check_dtype(dtype))
    if host.ndim == 0:
        check_dtype(host.dtype)
        return PendingValue.known(host)
    return creation.asarray(host, rows=rows)


def _dims(shape: ShapeLike) -> tuple[int, ...]:
    return () if isinstance(shape, tuple | list) and len(shape) == 0 else normalize_shape(shape)


def full(shape: ShapeLike, fill_value: Any, dtype: Any = None, *, device: Any = None) -> Any:
    """An array of ``fill_value``; the dtype defaults to the value's (bool, int64, float64, complex128)."""
    check_device(device)
    dims = _dims(shape)
    if dims == ():
        return PendingValue.known(np.full((), to_host(fill_value), dtype=dtype))
    return creation.full(dims, to_host(fill_value), dtype)


def zeros(shape: ShapeLike, dtype: Any = None, *, device: Any = None) -> Any:
    """An array of zeros (float64 unless ``dtype``)."""
    return full(shape, 0, dtype=np.float64 if dtype is None else dtype, device=device)


def ones(shape: ShapeLike, dtype: Any = None, *, device: Any = None) -> Any:
    """An array of ones (float64 unless ``dtype``)."""
    return full(shape, 1, dtype=np.float64 if dtype is None else dtype, device=device)


def empty(shape: ShapeLike, dtype: Any = None, *, device: Any = None) -> Any:
    """An array whose values are not to be relied on (float64 unless ``dtype``)."""
    return zeros(shape, dtype=dtype, device=device)


def full_like(
    x: Any, /, fill_value: Any, dtype: Any = None, *, device: Any = None, shape: ShapeLike | None = None
) -> Any:
    """An array of ``fill_value`` with ``x``'s shape and dtype (unless given); a remote ``x``'s layout."""
    check_device(device)
    if isinstance(x, RemoteArray):
        return creation.full_like(x, to_host(fill_value), dtype, shape)
    like = x if isinstance(x, PendingValue) else np.asarray(x)
    return full(
        like.shape if shape is None else shape, fill_value, dtype=like.dtype if dtype is None else dtype
    )


def zeros_like(x: Any, /, dtype: Any = None, *, device: Any = None, shape: ShapeLike | None = None) -> Any:
    """Zeros with ``x``'s shape and dtype (unless given)."""
    return full_like(x, 0, dtype=dtype, device=device, shape=shape)


def ones_like(x: Any, /, dtype: Any = None, *, device: Any = None, shape: ShapeLike | None = None) -> Any:
    """Ones with ``x``'s shape and dtype (unless given)."""
    return full_like(x, 1, dtype=dtype, device=device, shape=shape)


def empty_like(x: Any, /, dtype: Any = None, *, device: Any = None, shape: ShapeLike | None = None) -> Any:
    """An array with ``x``'s shape and dtype (unless given) whose values are not to be relied on."""
    return full_like(x, 0, dtype=dtype, device=device, shape=shape)


def arange(
    start: Any, /, stop: Any = None, step: Any = None, dtype: Any = None, *, device: Any = None
) -> Any:
    """Evenly spaced values in ``[start, stop)`` (``[0, start)`` with one bound), made on the agents."""
    check_device(device)
    return creation.arange(to_host(start), to_host(stop), to_host(step), dtype)


def linspace(
    start: Any,
    stop: Any,
    /,
    num: int = 50,
    endpoint: bool = True,
    dtype: Any = None,
    *,
    device: Any = None,
) -> Any:
    """``num`` evenly spaced values from ``start`` to ``stop``, made on the agents (complex bounds: here,
    then uploaded)."""
    check_device(device)
    start, stop = to_host(start), to_host(stop)
    if isinstance(start, complex) or isinstance(stop, complex) or np.dtype(dtype or float).kind == "c":
        return to_namespace(np.linspace(start, stop, num, endpoint=endpoint, dtype=dtype), None)
    return creation.linspace(start, stop, num, endpoint, dtype)


def eye(
    n_rows: int, n_cols: int | None = None, /, k: int = 0, dtype: Any = None, *, device: Any = None
) -> Any:
    """``n_rows`` by ``n_cols`` with ones on diagonal ``k``, made on the agents."""
    check_device(device)
    return creation.eye(n_rows, n_cols, k, np.float64 if dtype is None else dtype)


def from_dlpack(x: Any, /, *, device: Any = None, copy: bool | None = None) -> Any:
    """An array of the namespace from any DLPack exporter (its data uploaded to the current pool)."""
    check_device(device)
    if isinstance(x, RemoteArray | PendingValue):
        return asarray(x, copy=copy)
    if copy is False:
        raise ValueError("from_dlpack(copy=False): the data is copied to reach the pool")
    return to_namespace(np.from_dlpack(x), None)


def meshgrid(*arrays: Any, indexing: str = "xy") -> Any:
    """Coordinate matrices from 1-D coordinate arrays."""
    return list(call(np.meshgrid, arrays, {"indexing": indexing}))


tril = lift(np.tril)
triu = lift(np.triu)
