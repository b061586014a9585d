"""The Array API's device and namespace of gpupool's arrays: one device, the pool; the ``gpupool`` package.

Remote arrays and the values kept on the client (:class:`~gpupool.client.values.PendingValue`) both answer
``x.device`` with :data:`DEVICE` and ``x.__array_namespace__()`` with :func:`namespace`.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Final

__all__ = ["API_VERSIONS", "DEVICE", "check_api_version", "check_device", "namespace"]

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
