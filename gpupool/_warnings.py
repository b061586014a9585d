"""Warnings gpupool issues: categories a program can filter (``warnings.filterwarnings``)."""

from __future__ import annotations

from gpupool._errors import GpupoolError

__all__ = ["HostFallbackWarning"]


class HostFallbackWarning(GpupoolError, UserWarning):
    """A NumPy function gpupool does not run on the pool ran on the host copy of its arguments instead.

    Issued once per function (cuPyNumeric's way); :func:`gpupool.coverage` counts every call. A
    :class:`~gpupool.GpupoolError` too, so that with the warning turned into an error (``-W error``) a
    program's ``except gpupool.GpupoolError`` sees it.
    """
