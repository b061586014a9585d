"""What the GPUs of this host are, and how they fare, as NVML reports it.

NVML comes from NVIDIA's ``pynvml`` (package nvidia-ml-py), imported when :meth:`Nvml.open` runs and
never at import time. Every NVML call is guarded: a query the driver or the card does not support
leaves its field at zero or empty instead of failing discovery (consumer cards answer no utilisation
on some drivers, risers report odd PCIe links, fan and power queries fail on some boards).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gpupool._proto.v1 import control_pb2

__all__ = ["GpuTelemetry", "Nvml", "NvmlGpu", "NvmlUnavailable", "normalize_bus_id"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU


class NvmlUnavailable(Exception):
    """NVML cannot be used on this host (no driver, no library, no GPU).

    Args:
        reason: NVML's own words, e.g. "NVML Shared Library Not Found".
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class NvmlGpu:
    """One GPU as NVML enumerates it.

    Attributes:
        index: NVML's index (PCI order; not always CUDA's).
        bus_id: the PCI bus id, normalized with :func:`normalize_bus_id` ("" if NVML gave none).
        info: what the status reports about it.
    """

    index: int
    bus_id: str
    info: control_pb2.GpuInfo


@dataclass(frozen=True, slots=True)
class GpuTelemetry:
    """A GPU's health at one moment; zeros where NVML gave nothing."""

    memory_free: int = 0
    utilization_percent: float = 0.0
    temperature_c: float = 0.0
    power_w: float = 0.0


def normalize_bus_id(bus_id: str | bytes) -> str:
    """A PCI bus id in one spelling, so NVML's ``00000000:01:00.0`` matches CUDA's ``0000:01:00.0``."""
    text = _text(bus_id).strip().lower()
    try:
        domain, bus, rest = text.split(":")
        device, function = rest.split(".")
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16)}"
    except ValueError:
        return text


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """An open NVML session. Not thread-safe by contract; NVML itself is.

    Use :meth:`open`; call :meth:`close` when done.

    Args:
        module: the ``pynvml`` module, already initialised (tests pass a fake).
    """

    def __init__(self, module: Any) -> None:
        self._nvml = module
        self._handles: dict[int, Any] = {}
        self._closed = False

    @classmethod
    def open(cls, module: Any | None = None) -> Nvml:
        """Initialise NVML.

        Raises:
            NvmlUnavailable: no NVML library or driver here, with NVML's reason.
        """
        if module is None:
            try:
                module = importlib.import_module("pynvml")
            except ImportError as exc:  # nvidia-ml-py is a dependency, but be kind to trimmed installs
                raise NvmlUnavailable(f"pynvml is not installed: {exc}") from exc
        try:
            module.nvmlInit()
        except Exception as exc:
            raise NvmlUnavailable(str(exc) or type(exc).__name__) from exc
        return cls(module)

    def close(self) -> None:
        """Shut NVML down (once)."""
        if not self._closed:
            self._closed = True
            self._guard(self._nvml.nvmlShutdown, None)

    def _guard(self, query: Callable[..., T], default: T, *args: object) -> T:
        try:
            return query(*args)
        except Exception as exc:  # an NVMLError, or a function this pynvml or driver lacks
            log.debug("NVML %s failed: %s", getattr(query, "__name__", query), exc)
            return default

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._nvml.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def count(self) -> int:
        """How many GPUs NVML sees (0 where the query fails)."""
        return int(self._guard(self._nvml.nvmlDeviceGetCount, 0))

    def driver_version(self) -> str:
        """The NVIDIA driver's version, "" if unknown."""
        return _text(self._guard(self._nvml.nvmlSystemGetDriverVersion, ""))

    def gpus(self) -> list[NvmlGpu]:
        """Every GPU NVML sees, described; a GPU whose handle cannot be had is left out."""
        driver = self.driver_version()
        found = []
        for index in range(self.count()):
            handle = self._guard(self._handle, None, index)
            if handle is None:
                log.warning("NVML cannot open GPU %d; leaving it out", index)
                continue
            found.append(self._describe(index, handle, driver))
        return found

    def _describe(self, index: int, handle: Any, driver: str) -> NvmlGpu:
        nvml = self._nvml
        guard = self._guard
        info = control_pb2.GpuInfo(index=index, driver_version=driver)
        info.model = _text(guard(nvml.nvmlDeviceGetName, "", handle))
        info.uuid = _text(guard(nvml.nvmlDeviceGetUUID, "", handle))
        memory = guard(nvml.nvmlDeviceGetMemoryInfo, None, handle)
        if memory is not None:
            info.memory_total = int(getattr(memory, "total", 0) or 0)
            info.memory_free = int(getattr(memory, "free", 0) or 0)
        capability = guard(nvml.nvmlDeviceGetCudaComputeCapability, None, handle)
        if capability is not None:
            major, minor = capability
            info.compute_capability = f"{int(major)}.{int(minor)}"
        info.pcie_generation = int(guard(nvml.nvmlDeviceGetCurrPcieLinkGeneration, 0, handle) or 0)
        info.pcie_width = int(guard(nvml.nvmlDeviceGetCurrPcieLinkWidth, 0, handle) or 0)
        info.pcie_max_generation = int(guard(nvml.nvmlDeviceGetMaxPcieLinkGeneration, 0, handle) or 0)
        info.pcie_max_width = int(guard(nvml.nvmlDeviceGetMaxPcieLinkWidth, 0, handle) or 0)
        pci = guard(nvml.nvmlDeviceGetPciInfo, None, handle)
        bus_id = normalize_bus_id(getattr(pci, "busId", "") or "") if pci is not None else ""
        return NvmlGpu(index=index, bus_id=bus_id, info=info)

    def telemetry(self, index: int) -> GpuTelemetry:
        """The GPU's memory free, utilisation, temperature and power now; zeros where NVML says nothing."""
        nvml = self._nvml
        guard = self._guard
        handle = guard(self._handle, None, index)
        if handle is None:
            return GpuTelemetry()
        memory = guard(nvml.nvmlDeviceGetMemoryInfo, None, handle)
        rates = guard(nvml.nvmlDeviceGetUtilizationRates, None, handle)
        milliwatts = guard(nvml.nvmlDeviceGetPowerUsage, 0, handle) or 0
        return GpuTelemetry(
            memory_free=int(getattr(memory, "free", 0) or 0),
            utilization_percent=float(getattr(rates, "gpu", 0) or 0),
            temperature_c=float(guard(nvml.nvmlDeviceGetTemperature, 0, handle, _TEMPERATURE_GPU) or 0),
            power_w=float(milliwatts) / 1000.0,
        )
