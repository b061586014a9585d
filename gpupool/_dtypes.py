"""The Array API standard's dtypes in the ``gpupool`` namespace, and its inspection API.

The dtypes are NumPy's scalar types, as in NumPy's own namespace: a remote array's ``dtype`` (a NumPy dtype)
compares equal to them (``x.dtype == gp.float32``). Promotion is NumPy 2's, which is the standard's for
every pair it defines.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from gpupool.client.device import DEVICE, check_device

__all__ = [
    "__array_namespace_info__",
    "bool",
    "complex64",
    "complex128",
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
]

bool = np.bool_
int8 = np.int8
int16 = np.int16
int32 = np.int32
int64 = np.int64
uint8 = np.uint8
uint16 = np.uint16
uint32 = np.uint32
uint64 = np.uint64
float16 = np.float16
float32 = np.float32
float64 = np.float64
complex64 = np.complex64
complex128 = np.complex128

#: The standard's dtypes by kind, as ``__array_namespace_info__().dtypes(kind=...)`` gives them.
_KINDS: Final[dict[str, tuple[str, ...]]] = {
    "bool": ("bool",),
    "signed integer": ("int8", "int16", "int32", "int64"),
    "unsigned integer": ("uint8", "uint16", "uint32", "uint64"),
    "real floating": ("float32", "float64"),
    "complex floating": ("complex64", "complex128"),
}
_KINDS["integral"] = _KINDS["signed integer"] + _KINDS["unsigned integer"]
_KINDS["numeric"] = _KINDS["integral"] + _KINDS["real floating"] + _KINDS["complex floating"]


class _Info:
    """What ``gp.__array_namespace_info__()`` tells about the namespace (the standard's inspection API)."""

    __module__ = "gpupool"

    def capabilities(self) -> dict[str, Any]:
        """Boolean indexing and data-dependent shapes work (``x[mask]``, ``unique_values``)."""
        return {"boolean indexing": True, "data-dependent shapes": True, "max dimensions": 64}

    def default_device(self) -> str:
        """The pool."""
        return DEVICE

    def devices(self) -> list[str]:
        """One device: the pool (its agents are where the shards live, not devices of their own)."""
        return [DEVICE]

    def default_dtypes(self, *, device: Any = None) -> dict[str, Any]:
        """float64, complex128, int64, and int64 for indices: NumPy's."""
        check_device(device)
        return {
            "real floating": np.dtype(np.float64),
            "complex floating": np.dtype(np.complex128),
            "integral": np.dtype(np.int64),
            "indexing": np.dtype(np.int64),
        }

    def dtypes(self, *, device: Any = None, kind: Any = None) -> dict[str, Any]:
        """The dtypes of ``kind`` (a name, a tuple of names, or None for all of the standard's)."""
        check_device(device)
        if kind is None:
            names = ("bool", *_KINDS["numeric"])
        elif isinstance(kind, tuple):
            names = tuple(dict.fromkeys(n for k in kind for n in _KINDS[k]))
        else:
            names = _KINDS[kind]
        return {name: np.dtype(name) for name in names}


def __array_namespace_info__() -> _Info:
    """The namespace's inspection API: devices, dtypes, capabilities."""
    return _Info()
