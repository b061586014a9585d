"""GPU discovery and the choice of backend, with a stand-in for NVML (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from gpupool._errors import UsageError
from gpupool.agent import _cupy, workers
from gpupool.agent.discovery import GpuTelemetry, Nvml, NvmlUnavailable, normalize_bus_id


class NvmlError(Exception):
    """What pynvml raises."""


class FakeNvml:
    """Enough of pynvml for discovery: ``gpus`` GPUs; the queries named in ``failing`` raise."""

    def __init__(self, gpus: int = 2, *, failing: tuple[str, ...] = (), init_error: str = "") -> None:
        self.gpus = gpus
        self.failing = set(failing)
        self.init_error = init_error
        self.shut_down = False

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)  # a function this "pynvml" lacks

    def _maybe_fail(self, name: str) -> None:
        if name in self.failing:
            raise NvmlError(f"{name}: Not Supported")

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NvmlError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlSystemGetDriverVersion(self) -> bytes:
        self._maybe_fail("driver")
        return b"580.1"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        self._maybe_fail("name")
        return f"NVIDIA GeForce GTX 1070 #{handle}"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        self._maybe_fail("memory")
        return SimpleNamespace(total=8 << 30, free=(7 << 30) - handle, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return (6, 1)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: int) -> int:
        self._maybe_fail("pcie")
        return 1

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: int) -> int:
        self._maybe_fail("pcie")
        return 1

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: int) -> int:
        return 3

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: int) -> int:
        return 16

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        return SimpleNamespace(busId=f"00000000:0{handle + 1}:00.0".encode())

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._maybe_fail("utilization")
        return SimpleNamespace(gpu=42, memory=10)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 95_500


def test_gpus_are_described() -> None:
    nvml = Nvml.open(FakeNvml(2))
    found = nvml.gpus()
    assert [gpu.index for gpu in found] == [0, 1]
    info = found[1].info
    assert info.model == "NVIDIA GeForce GTX 1070 #1"
    assert info.uuid == "GPU-0001"
    assert info.memory_total == 8 << 30
    assert info.memory_free == (7 << 30) - 1
    assert info.compute_capability == "6.1"
    assert (info.pcie_generation, info.pcie_width, info.pcie_max_generation, info.pcie_max_width) == (
        1,
        1,
        3,
        16,
    )
    assert info.driver_version == "580.1"
    assert found[1].bus_id == "0000:02:00.0"
    assert nvml.telemetry(0) == GpuTelemetry(
        memory_free=7 << 30, utilization_percent=42.0, temperature_c=61.0, power_w=95.5
    )
    nvml.close()


def test_failing_queries_leave_zeros() -> None:
    fake = FakeNvml(1, failing=("name", "memory", "pcie", "utilization", "driver"))
    nvml = Nvml.open(fake)
    info = nvml.gpus()[0].info
    assert (info.model, info.memory_total, info.memory_free, info.pcie_width, info.driver_version) == (
        "",
        0,
        0,
        0,
        "",
    )
    assert info.compute_capability == "6.1"
    telemetry = nvml.telemetry(0)
    assert (telemetry.memory_free, telemetry.utilization_percent, telemetry.temperature_c) == (0, 0.0, 61.0)
    nvml.close()
    nvml.close()
    assert fake.shut_down


def test_missing_functions_are_guarded_too() -> None:
    fake = FakeNvml(1)
    del_name = "nvmlDeviceGetPowerUsage"
    setattr(fake, del_name, None)  # not callable: as if this pynvml predates the query
    assert Nvml.open(fake).telemetry(0).power_w == 0.0


def test_init_failure_says_why() -> None:
    with pytest.raises(NvmlUnavailable, match="NVML Shared Library Not Found"):
        Nvml.open(FakeNvml(init_error="NVML Shared Library Not Found"))


def test_bus_ids_of_nvml_and_cuda_agree() -> None:
    assert normalize_bus_id(b"00000000:65:00.0") == normalize_bus_id("0000:65:00.0") == "0000:65:00.0"
    assert normalize_bus_id("0000:0A:1F.7") == "0000:0a:1f.7"
    assert normalize_bus_id("odd") == "odd"


def test_no_gpu_serves_one_numpy_worker_and_says_why() -> None:
    setup = workers.plan_workers(
        "auto", "50%", nvml_module=FakeNvml(init_error="NVML Shared Library Not Found")
    )
    try:
        assert setup.backend == "numpy"
        assert len(setup.workers) == 1
        assert setup.workers[0].gpu is None
        assert setup.workers[0].memory_limit == workers.host_memory() // 2
        assert (
            setup.note
            == "no GPU found through NVML (NVML Shared Library Not Found): serving one NumPy worker"
        )
        assert setup.nvml is None
    finally:
        setup.close()


def test_gpus_without_cuda_fall_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda() -> list[_cupy.CudaDevice]:
        raise _cupy.CudaUnavailable("CuPy is not usable (ModuleNotFoundError: No module named 'cupy')")

    monkeypatch.setattr(_cupy, "probe_cuda", no_cuda)
    setup = workers.plan_workers("auto", "1GiB", nvml_module=FakeNvml(2))
    try:
        assert setup.backend == "numpy"
        assert setup.workers[0].memory_limit == 1 << 30
        assert setup.note.startswith(
            "2 GPU(s) found through NVML, but CUDA is not usable (CuPy is not usable"
        )
    finally:
        setup.close()
    with pytest.raises(UsageError, match="--backend cupy, but CUDA is not usable"):
        workers.plan_workers("cupy", "80%", nvml_module=FakeNvml(2))


def test_numpy_backend_on_request() -> None:
    setup = workers.plan_workers("numpy", "1000", nvml_module=FakeNvml(2))
    try:
        assert setup.backend == "numpy"
        assert setup.workers[0].memory_limit == 1000
        assert setup.note == "NumPy backend chosen with --backend numpy; 2 GPU(s) left idle"
    finally:
        setup.close()


def test_importing_the_agent_loads_neither_cupy_nor_nvml() -> None:
    code = (
        "import sys, gpupool, gpupool.agent, gpupool.agent.main, gpupool.agent.service\n"
        "import gpupool.agent.workers, gpupool.agent.runtime\n"
        "loaded = sorted(m for m in ('cupy', 'pynvml') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
