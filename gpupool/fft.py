"""The Array API's ``fft`` extension in the ``gpupool`` namespace (``gp.fft``): NumPy's transforms on the
host copy, with :class:`~gpupool.HostFallbackWarning`, their results uploaded back. Agents do not run
FFTs yet (a transform along the sharded axis needs every row).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpupool.client.device import check_device
from gpupool.client.namespace import lift, to_namespace

__all__ = [
    "fft",
    "fftfreq",
    "fftn",
    "fftshift",
    "hfft",
    "ifft",
    "ifftn",
    "ifftshift",
    "ihfft",
    "irfft",
    "irfftn",
    "rfft",
    "rfftfreq",
    "rfftn",
]

fft = lift(np.fft.fft)
ifft = lift(np.fft.ifft)
fftn = lift(np.fft.fftn)
ifftn = lift(np.fft.ifftn)
rfft = lift(np.fft.rfft)
irfft = lift(np.fft.irfft)
rfftn = lift(np.fft.rfftn)
irfftn = lift(np.fft.irfftn)
hfft = lift(np.fft.hfft)
ihfft = lift(np.fft.ihfft)
fftshift = lift(np.fft.fftshift)
ifftshift = lift(np.fft.ifftshift)


def fftfreq(n: int, /, *, d: float = 1.0, dtype: Any = None, device: Any = None) -> Any:
    """The sample frequencies of an ``n``-point transform."""
    check_device(device)
    freqs = np.fft.fftfreq(n, d)
    return to_namespace(freqs if dtype is None else freqs.astype(dtype), None)


def rfftfreq(n: int, /, *, d: float = 1.0, dtype: Any = None, device: Any = None) -> Any:
    """The sample frequencies of an ``n``-point real transform."""
    check_device(device)
    freqs = np.fft.rfftfreq(n, d)
    return to_namespace(freqs if dtype is None else freqs.astype(dtype), None)
