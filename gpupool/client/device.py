"""The Array API's device and namespace of gpupool's arrays: one device, the pool; the ``gpupool`` package.

Remote arrays and the values kept on the client (:class:`~gpupool.client.values.PendingValue`) both answer
``x.device`` with :data:`DEVICE` and ``x.__array_namespace__()`` with :func:`namespace`.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Final

import numpy as np

__all__ = ["API_VERSIONS", "DEVICE", "ArrayApiObject", "check_api_version", "check_device", "namespace"]

#: The Array API device of every gpupool array: the pool (``x.device``, ``device=`` of creation functions).
DEVICE: Final = "gpupool"
#: The standard's versions ``__array_namespace__(api_version=...)`` accepts; gpupool implements the last.
API_VERSIONS: Final = ("2022.12", "2023.12", "2024.12")


def namespace() -> ModuleType:
    """The ``gpupool`` package: always imported before its client modules are."""
    return sys.modules["gpupool"]


def check_api_version(api_version: str | None) -> None:
    """Refuse an Array API version gpupool does not implement (None means the latest).

    Raises:
        ValueError: another version.
    """
    if api_version is not None and api_version not in API_VERSIONS:
        raise ValueError(f"gpupool implements the Array API {API_VERSIONS[-1]}, not {api_version!r}")


def check_device(device: object) -> None:
    """Refuse a ``device=`` other than the pool's (None means the pool).

    Raises:
        ValueError: another device, as the Array API asks.
    """
    if device is not None and device != DEVICE:
        raise ValueError(f"gpupool arrays live on the pool ({DEVICE!r}), not on {device!r}")


class ArrayApiObject:
    """What every array of the namespace answers the same way: its namespace, its device (the pool), and
    DLPack of its host copy. Subclasses give the host copy (:meth:`_host_copy`)."""

    __slots__ = ()

    def _host_copy(self) -> np.ndarray:
        raise NotImplementedError

    def __array_namespace__(self, /, *, api_version: str | None = None) -> ModuleType:
        """The ``gpupool`` package, an Array API namespace (standard 2024.12)."""
        check_api_version(api_version)
        return namespace()

    @property
    def device(self) -> str:
        """Where the array lives: the pool (:data:`DEVICE`)."""
        return DEVICE

    def to_device(self, device: object, /, *, stream: object = None) -> Any:
        """The array itself on the pool's device; other devices are refused (``get()`` brings it here)."""
        check_device(device)
        return self

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """DLPack of the host copy (the data comes back from the agents: for interchange only)."""
        host = self._host_copy()
        return host.__dlpack__(stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: the exported copy is in host memory
