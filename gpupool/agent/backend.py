"""The backend boundary: the array namespace a worker computes with, and moving arrays in and out.

Generic agent code (ops, programs, the servicer) sees only :class:`ArrayBackend`. The NumPy backend
lives here; the CuPy one lives in :mod:`gpupool.agent._cupy`, the one module that imports CuPy, and
only when :func:`gpupool.agent.workers.plan_workers` decides a GPU is usable.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ["ArrayBackend", "NumpyBackend"]


class ArrayBackend(Protocol):
    """One worker's compute: an array namespace bound to one device.

    Contract: :meth:`bind_thread` runs once in the worker's own thread before anything else there;
    :meth:`to_device`, :meth:`to_host`, :meth:`empty`, :meth:`staging_buffer`, :meth:`copy_in` and
    :meth:`synchronize` and every use of :attr:`xp` happen in that thread only (CuPy keeps the current
    device per thread), except where :attr:`host_resident` says device arrays are plain host arrays, when
    any thread may read them.
    """

    @property
    def name(self) -> str:
        """``"numpy"`` or ``"cupy"``."""
        ...

    @property
    def device_index(self) -> int:
        """The CUDA device index (0 for the NumPy backend)."""
        ...

    @property
    def xp(self) -> Any:
        """The array namespace (``numpy`` or ``cupy``) ops run with."""
        ...

    @property
    def host_resident(self) -> bool:
        """True when device arrays are host arrays, so :meth:`to_device` and :meth:`to_host` cost nothing."""
        ...

    @property
    def out_of_memory_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions meaning the device ran out of memory (mapped to ``out-of-memory``)."""
        ...

    @property
    def kernel_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions meaning an op failed on the device (mapped to ``kernel-failed``)."""
        ...

    def bind_thread(self) -> None:
        """Make this backend's device current in the calling thread."""
        ...

    def to_device(self, host: np.ndarray) -> Any:
        """The array on the device. ``host`` is the caller's to give away: it is not used afterwards."""
        ...

    def to_host(self, array: Any) -> np.ndarray:
        """A C-contiguous host copy (or view, for host-resident arrays) of a device array."""
        ...

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        """A new C-contiguous device array; its contents are undefined until :meth:`copy_in` fills it."""
        ...

    def staging_buffer(self, nbytes: int) -> np.ndarray:
        """A 1-D uint8 host buffer that :meth:`copy_in` copies from fast (page-locked memory for CUDA)."""
        ...

    def copy_in(self, array: Any, offset: int, block: np.ndarray) -> None:
        """Copy the bytes of ``block`` into ``array``'s C-order bytes from byte ``offset`` on.

        ``array`` came from :meth:`empty`; ``block`` is 1-D uint8 and may be reused once this returns.
        """
        ...

    def copy_out(self, array: Any, offset: int, block: np.ndarray) -> None:
        """Copy ``block.nbytes`` of the C-contiguous array's bytes from byte ``offset`` into ``block``."""
        ...

    def synchronize(self) -> None:
        """Wait for queued device work; a failed kernel raises here."""
        ...

    def release_cached_memory(self) -> None:
        """Give cached device memory back to the driver (after frees, on shutdown)."""
        ...


class NumpyBackend:
    """The host as a worker: arrays are NumPy arrays in host RAM.

    Args:
        device_index: the worker's index (always 0 for the one NumPy worker of a host).
    """

    def __init__(self, device_index: int = 0) -> None:
        self._device_index = device_index

    @property
    def name(self) -> str:
        """``"numpy"``."""
        return "numpy"

    @property
    def device_index(self) -> int:
        """The worker index."""
        return self._device_index

    @property
    def xp(self) -> Any:
        """The ``numpy`` module."""
        return np

    @property
    def host_resident(self) -> bool:
        """Always true."""
        return True

    @property
    def out_of_memory_errors(self) -> tuple[type[BaseException], ...]:
        """``MemoryError`` (NumPy's ``ArrayMemoryError`` is one)."""
        return (MemoryError,)

    @property
    def kernel_errors(self) -> tuple[type[BaseException], ...]:
        """Nothing beyond the ValueError/TypeError every backend maps."""
        return ()

    def bind_thread(self) -> None:
        """Nothing to bind."""

    def to_device(self, host: np.ndarray) -> Any:
        """``host`` itself: it is already where NumPy computes."""
        return host

    def to_host(self, array: Any) -> np.ndarray:
        """The array itself, made C-contiguous if it is not."""
        return np.asarray(array, order="C")  # ascontiguousarray would make 0-d arrays 1-d

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        """``numpy.empty``."""
        return np.empty(shape, dtype)

    def staging_buffer(self, nbytes: int) -> np.ndarray:
        """Plain host memory."""
        return np.empty(nbytes, np.uint8)

    def copy_in(self, array: Any, offset: int, block: np.ndarray) -> None:
        """A memory copy into the array's bytes."""
        array.reshape(-1).view(np.uint8)[offset : offset + block.nbytes] = block

    def copy_out(self, array: Any, offset: int, block: np.ndarray) -> None:
        """A memory copy out of the (C-contiguous) array's bytes."""
        block[:] = array.reshape(-1).view(np.uint8)[offset : offset + block.nbytes]

    def synchronize(self) -> None:
        """NumPy is synchronous."""

    def release_cached_memory(self) -> None:
        """NumPy caches nothing."""
