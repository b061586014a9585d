"""The CuPy backend: the only module of gpupool that imports CuPy, and only inside its functions.

``import gpupool`` and ``import gpupool.agent`` must never load CuPy (a CUDA context costs hundreds of
MiB and seconds of start-up); :func:`probe_cuda` is the first thing that does, and only when the agent
decides to try a GPU.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupool.agent.discovery import normalize_bus_id

__all__ = ["CudaDevice", "CudaUnavailable", "CupyBackend", "probe_cuda"]

log = logging.getLogger(__name__)

# Exceptions raised by a failing kernel, a CUDA API call or a library call; looked up by name since
# their home moved between CuPy versions.
_KERNEL_ERRORS = (
    "cupy.cuda.runtime.CUDARuntimeError",
    "cupy.cuda.driver.CUDADriverError",
    "cupy.cuda.compiler.CompileException",
    "cupy_backends.cuda.libs.cublas.CUBLASError",
    "cupy_backends.cuda.api.runtime.CUDARuntimeError",
    "cupy_backends.cuda.api.driver.CUDADriverError",
)


class CudaUnavailable(Exception):
    """CuPy cannot compute on this host.

    Args:
        reason: why, in words for an operator ("CuPy is not installed", the CUDA error).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class CudaDevice:
    """A CUDA device that passed the probe.

    Attributes:
        index: the CUDA device index (after CUDA_VISIBLE_DEVICES).
        bus_id: its PCI bus id, normalized (matches NVML's).
        model: the device name.
        memory_total: bytes of device memory.
        compute_capability: "8.6" and the like.
    """

    index: int
    bus_id: str
    model: str
    memory_total: int
    compute_capability: str


def _import_cupy() -> Any:
    try:
        return importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA failing at import
        raise CudaUnavailable(
            f"CuPy is not usable ({type(exc).__name__}: {exc}); pip install 'gpupool[cupy]'"
        ) from exc


def probe_cuda() -> list[CudaDevice]:
    """Import CuPy and run a trivial op on every CUDA device; the devices that passed.

    A device that fails its trivial op is left out with a warning; the others still serve.

    Raises:
        CudaUnavailable: CuPy does not import, CUDA sees no device, or no device passed.
    """
    cupy = _import_cupy()
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        raise CudaUnavailable(f"CUDA runtime: {exc}") from exc
    if count == 0:
        raise CudaUnavailable("CUDA sees no device")
    devices: list[CudaDevice] = []
    failures: list[str] = []
    for index in range(count):
        try:
            with cupy.cuda.Device(index):
                probe = cupy.arange(4, dtype=cupy.float32) * 2
                if float(probe.sum()) != 12.0:
                    raise RuntimeError("a trivial op gave a wrong answer")
            props = cupy.cuda.runtime.getDeviceProperties(index)
            name = props.get("name", b"")
            bus_id = str(cupy.cuda.runtime.deviceGetPCIBusId(index))
        except Exception as exc:
            log.warning("CUDA device %d failed its probe (%s); leaving it out", index, exc)
            failures.append(f"device {index}: {exc}")
            continue
        devices.append(
            CudaDevice(
                index=index,
                bus_id=normalize_bus_id(bus_id),
                model=name.decode(errors="replace") if isinstance(name, bytes) else str(name),
                memory_total=int(props.get("totalGlobalMem", 0)),
                compute_capability=f"{props.get('major', 0)}.{props.get('minor', 0)}",
            )
        )
    if not devices:
        raise CudaUnavailable("no CUDA device passed a trivial op: " + "; ".join(failures))
    return devices


def _lookup(dotted: str) -> type[BaseException] | None:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


class CupyBackend:
    """One CUDA device through CuPy.

    Args:
        device_index: the CUDA device index.
    """

    def __init__(self, device_index: int) -> None:
        self._cupy = _import_cupy()
        self._cupyx = importlib.import_module("cupyx")
        self._device_index = device_index
        oom = _lookup("cupy.cuda.memory.OutOfMemoryError")
        self._oom: tuple[type[BaseException], ...] = (*((oom,) if oom else ()), MemoryError)
        found = (_lookup(name) for name in _KERNEL_ERRORS)
        self._kernel_errors = tuple({error for error in found if error is not None})

    @property
    def name(self) -> str:
        """``"cupy"``."""
        return "cupy"

    @property
    def device_index(self) -> int:
        """The CUDA device index."""
        return self._device_index

    @property
    def xp(self) -> Any:
        """The ``cupy`` module."""
        return self._cupy

    @property
    def host_resident(self) -> bool:
        """False: arrays live in device memory."""
        return False

    @property
    def out_of_memory_errors(self) -> tuple[type[BaseException], ...]:
        """CuPy's ``OutOfMemoryError`` and ``MemoryError``."""
        return self._oom

    @property
    def kernel_errors(self) -> tuple[type[BaseException], ...]:
        """CUDA runtime, driver, compiler and cuBLAS errors."""
        return self._kernel_errors

    def bind_thread(self) -> None:
        """Make the device current in this thread."""
        self._cupy.cuda.Device(self._device_index).use()

    def to_device(self, host: np.ndarray) -> Any:
        """Copy a host array to the device."""
        return self._cupy.asarray(host)

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to a C-contiguous host array."""
        return np.asarray(self._cupy.asnumpy(array), order="C")  # keeps 0-d arrays 0-d

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        """``cupy.empty`` on this device."""
        return self._cupy.empty(shape, dtype)

    def staging_buffer(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory from CuPy's pinned pool (plain memory if none can be had)."""
        try:
            staging: np.ndarray = self._cupyx.empty_pinned((nbytes,), np.uint8)
        except Exception as exc:  # CUDA's page-locked allocations can fail where plain ones succeed
            log.warning("no page-locked staging memory (%s); uploads copy from plain memory", exc)
            return np.empty(nbytes, np.uint8)
        return staging

    def copy_in(self, array: Any, offset: int, block: np.ndarray) -> None:
        """Copy ``block`` to the device on the current stream and wait, so ``block`` is free again."""
        array.reshape(-1).view(self._cupy.uint8)[offset : offset + block.nbytes].set(block)
        self._cupy.cuda.get_current_stream().synchronize()

    def copy_out(self, array: Any, offset: int, block: np.ndarray) -> None:
        """Copy bytes of the (C-contiguous) device array into ``block`` and wait, so ``block`` is filled."""
        array.reshape(-1).view(self._cupy.uint8)[offset : offset + block.nbytes].get(out=block)
        self._cupy.cuda.get_current_stream().synchronize()

    def synchronize(self) -> None:
        """Wait for the device's queued work."""
        self._cupy.cuda.Device(self._device_index).synchronize()

    def release_cached_memory(self) -> None:
        """Return CuPy's pooled blocks of this device to the driver."""
        self._cupy.get_default_memory_pool().free_all_blocks()
        self._cupy.get_default_pinned_memory_pool().free_all_blocks()
