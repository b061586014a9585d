"""The CuPy backend and NVML on a real GPU (skipped where CuPy cannot reach a CUDA device).

CuPy is imported inside the tests only, so collecting this module never needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from gpupool._config import SUPPORTED_DTYPES, Timeouts
from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2, control_pb2
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.ops import BINARY, REDUCTIONS, UNARY, Expected, apply_op
from gpupool.agent.program import run_program
from gpupool.client.channels import AgentChannel
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    agent_in_process,
    agent_stub,
    buffer,
    clear_retained,
    constant,
    download,
    fetched_array,
    header,
    mqtt_watch,
    new_prefix,
    next_matching,
    op,
    refused,
    run,
    scalar,
    start_agent,
    upload,
)

pytestmark = pytest.mark.gpu

RNG = np.random.default_rng(5)


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return RNG.random(shape) > 0.5
    if dtype.startswith("int"):
        return RNG.integers(-1000, 1000, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


@pytest.fixture(scope="module")
def backend() -> Any:
    """A CuPy backend on the first usable device, bound to this thread."""
    from gpupool.agent._cupy import CupyBackend, probe_cuda

    devices = probe_cuda()
    assert devices
    chosen = CupyBackend(devices[0].index)
    chosen.bind_thread()
    return chosen


def test_probe_finds_every_device() -> None:
    import cupy

    from gpupool.agent._cupy import probe_cuda

    devices = probe_cuda()
    assert len(devices) == cupy.cuda.runtime.getDeviceCount()
    for device in devices:
        assert device.model
        assert device.memory_total > 0
        assert device.compute_capability.count(".") == 1
        assert device.bus_id.count(":") == 2


def test_cupy_round_trip_of_every_dtype(backend: Any) -> None:
    import cupy

    for dtype in SUPPORTED_DTYPES:
        for shape in [(1237, 3), (), (0, 4)]:
            host = sample(dtype, shape)
            on_device = backend.to_device(host.copy())
            assert isinstance(on_device, cupy.ndarray)
            assert on_device.dtype == host.dtype
            back = backend.to_host(on_device)
            assert isinstance(back, np.ndarray)
            assert back.flags.c_contiguous
            np.testing.assert_array_equal(back, host)
    backend.synchronize()


def test_cupy_staging_buffers_and_copy_in(backend: Any) -> None:
    import cupy

    for dtype in SUPPORTED_DTYPES:
        host = sample(dtype, (1001, 3))
        on_device = backend.empty(host.shape, host.dtype)
        assert isinstance(on_device, cupy.ndarray)
        assert (on_device.dtype, on_device.shape) == (host.dtype, host.shape)
        data = host.reshape(-1).view(np.uint8)
        block = backend.staging_buffer(1000)
        assert (block.dtype, block.shape) == (np.uint8, (1000,))
        for offset in range(0, data.nbytes, 1000):  # one block reused, as an upload does
            piece = data[offset : offset + 1000]
            block[: piece.nbytes] = piece
            backend.copy_in(on_device, offset, block[: piece.nbytes])
        np.testing.assert_array_equal(backend.to_host(on_device), host)
    assert backend.empty((0, 4), np.dtype("float32")).shape == (0, 4)
    assert backend.empty((), np.dtype("int64")).shape == ()


def test_uploads_to_cupy_stream_through_staging_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's upload path on CuPy: blocks of 64 KiB, page-locked, copied while the stream goes on."""
    import cupy

    from gpupool.agent import service as agent_service
    from gpupool.agent._cupy import CupyBackend, probe_cuda

    monkeypatch.setattr(agent_service, "STAGING_BYTES", 64 << 10)
    index = probe_cuda()[0].index

    async def body() -> None:
        async with agent_in_process(CupyBackend(index), memory_limit=1 << 30) as (endpoint, registry):
            channel = AgentChannel("gpu", endpoint, Timeouts())
            try:
                for dtype in SUPPORTED_DTYPES:
                    for shape in [(300_001, 3), (1237, 3), (), (0, 4), (7,)]:
                        host = sample(dtype, shape)
                        buffer_id = f"s.{dtype}.{len(shape)}.{host.size}"
                        await channel.upload(buffer_id, 0, host, "s")
                        stored = registry.get(buffer_id).array
                        assert isinstance(stored, cupy.ndarray)
                        assert stored.device.id == index
                        back = np.empty(host.shape, host.dtype)
                        await channel.download_into(buffer_id, back)
                        np.testing.assert_array_equal(back, host)
                assert channel._raw
            finally:
                await channel.close()
            async with agent_stub(endpoint) as stub:
                host = sample("float64", (100_003,))
                await upload(stub, "s.pb", host, session="s", chunk_bytes=1000)  # chunks straddle blocks
                np.testing.assert_array_equal(await download(stub, "s.pb"), host)
                request = header("s.short", host, session="s")

                async def short() -> Any:
                    yield request
                    yield agent_pb2.UploadRequest(chunk=host.tobytes()[:-8])

                code, kind, _ = await refused(stub.Upload(short(), timeout=20))
                assert (code, kind) == (grpc.StatusCode.INVALID_ARGUMENT, "bad-request")
            assert registry.usage(0).reserved == 0
            assert not registry.contains("s.short")

    run(body(), timeout=120)


def _expected(array: np.ndarray) -> Expected:
    return Expected(array.dtype, tuple(array.shape), array.nbytes)


@pytest.mark.parametrize("name", sorted(BINARY | UNARY | REDUCTIONS))
def test_cupy_ops_match_numpy(backend: Any, name: str) -> None:
    a = RNG.uniform(-2, 2, (33, 17))
    b = RNG.uniform(0.5, 2, (33, 17))
    operands = [a] if name in UNARY or name in REDUCTIONS else [a, b]
    want = apply_op(np, name, operands, _expected(np.asarray(_numpy(name, operands))))
    got = backend.to_host(
        apply_op(backend.xp, name, [backend.to_device(x) for x in operands], _expected(want))
    )
    assert got.dtype == want.dtype
    if want.dtype == np.bool_:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, equal_nan=True)
    if name in REDUCTIONS:
        along = np.asarray(_numpy(name, operands, axis=0))
        got = backend.to_host(apply_op(backend.xp, name, [backend.to_device(a)], _expected(along), axis=0))
        np.testing.assert_allclose(
            got.astype(np.float64), along.astype(np.float64), rtol=1e-6, equal_nan=True
        )


def _numpy(name: str, operands: list[np.ndarray], **kwargs: int) -> Any:
    with np.errstate(all="ignore"):
        return getattr(np, name)(*operands, **kwargs)


def test_cupy_where_matmul_astype_and_weak_scalars(backend: Any) -> None:
    xp = backend.xp
    a = RNG.standard_normal((64, 32)).astype(np.float32)
    b = RNG.standard_normal((32, 16)).astype(np.float32)
    da, db = backend.to_device(a), backend.to_device(b)
    got = apply_op(xp, "matmul", [da, db], Expected(np.dtype("float32"), (64, 16), 64 * 16 * 4))
    np.testing.assert_allclose(backend.to_host(got), a @ b, rtol=1e-4, atol=1e-4)
    got = apply_op(xp, "where", [da > 0, da, 0.0], Expected(np.dtype("float32"), (64, 32), 64 * 32 * 4))
    np.testing.assert_array_equal(backend.to_host(got), np.where(a > 0, a, np.float32(0)))
    got = apply_op(xp, "astype", [da * 10], Expected(np.dtype("int32"), (64, 32), 64 * 32 * 4))
    np.testing.assert_array_equal(backend.to_host(got), (a * 10).astype(np.int32))
    assert xp.multiply(da, 2.0).dtype == np.float32  # Python scalars stay weak, as in NumPy 2


def test_cupy_refusals(backend: Any) -> None:
    a = backend.to_device(np.ones((4, 3)))
    with pytest.raises(RpcRefusal) as caught:
        apply_op(
            backend.xp, "add", [a, backend.to_device(np.ones(5))], Expected(np.dtype("float64"), (4, 3), 96)
        )
    assert caught.value.kind == "kernel-failed"
    with pytest.raises(RpcRefusal) as caught:
        apply_op(backend.xp, "add", [a, a], Expected(np.dtype("float64"), (3, 4), 96))
    assert caught.value.kind == "bad-request"


def test_cupy_program_and_device_out_of_memory(backend: Any) -> None:
    x = RNG.standard_normal((1000, 64)).astype(np.float32)
    w = RNG.standard_normal((64, 8)).astype(np.float32)
    registry = BufferRegistry([1 << 62])
    for buffer_id, array in (("x", x), ("w", w)):
        registry.commit(
            registry.reserve(worker=0, buffer_id=buffer_id, nbytes=array.nbytes, session="s"),
            backend.to_device(array),
        )
    request = agent_pb2.ExecuteRequest(
        worker=0,
        session="s",
        fetch=["total"],
        free=["xw"],
        ops=[
            op("matmul", [buffer("x"), buffer("w")], "xw", "float32", (1000, 8)),
            op("tanh", [buffer("xw")], "y", "float32", (1000, 8)),
            op("add", [buffer("y"), constant(np.arange(8, dtype=np.float32))], "z", "float32", (1000, 8)),
            op("multiply", [buffer("z"), scalar(0.5)], "h", "float32", (1000, 8)),
            op("sum", [buffer("h")], "total", "float64", ()),
        ],
    )
    reply = run_program(request, backend=backend, registry=registry)
    want = (np.tanh(x @ w) + np.arange(8, dtype=np.float32)) * 0.5
    np.testing.assert_allclose(fetched_array(reply.fetched[0]), want.sum(dtype=np.float64), rtol=1e-3)
    np.testing.assert_allclose(backend.to_host(registry.get("h").array), want, rtol=1e-4, atol=1e-5)
    assert not registry.contains("xw")
    before = registry.usage(0)
    n = 1 << 21  # a (n, n) float32 result: 16 TiB, more than any GPU holds
    huge = agent_pb2.ExecuteRequest(
        worker=0,
        session="s",
        ops=[
            op(
                "add",
                [constant(np.zeros((1, n), np.float32)), constant(np.zeros((n, 1), np.float32))],
                "huge",
                "float32",
                (n, n),
            )
        ],
    )
    with pytest.raises(RpcRefusal) as caught:
        run_program(huge, backend=backend, registry=registry)
    assert caught.value.kind == "out-of-memory"
    assert registry.usage(0) == before
    assert not registry.contains("huge")


def test_nvml_reports_the_gpu() -> None:
    import cupy

    from gpupool.agent.discovery import Nvml

    nvml = Nvml.open()
    try:
        gpus = nvml.gpus()
        assert len(gpus) >= cupy.cuda.runtime.getDeviceCount()
        info = gpus[0].info
        assert info.model
        assert info.uuid.startswith("GPU-")
        assert info.memory_total > 0
        assert 0 < info.memory_free <= info.memory_total
        assert info.compute_capability.count(".") == 1
        assert info.driver_version
        assert gpus[0].bus_id.count(":") == 2
        telemetry = nvml.telemetry(0)
        assert telemetry.memory_free > 0
        assert 0 <= telemetry.utilization_percent <= 100
    finally:
        nvml.close()


def test_auto_chooses_cupy_with_nvml_details() -> None:
    import cupy

    from gpupool.agent.workers import plan_workers

    setup = plan_workers("auto", "50%")
    try:
        assert setup.backend == "cupy"
        assert len(setup.workers) == cupy.cuda.runtime.getDeviceCount()
        for worker in setup.workers:
            assert worker.backend.name == "cupy"
            assert worker.gpu is not None
            assert worker.gpu.model
            assert worker.nvml_index is not None  # matched by PCI bus id
            assert worker.memory_limit == worker.gpu.memory_total // 2
        assert setup.nvml is not None
    finally:
        setup.close()


@pytest.fixture(scope="module")
def gpu_agent(embedded_broker: Child) -> Iterator[tuple[Child, str, str]]:
    """An agent process on the CuPy backend, on the embedded broker (Mosquitto, else amqtt)."""
    url = str(embedded_broker.ready["url"])
    prefix = new_prefix()
    child = start_agent(url, prefix, "--backend", "cupy", "--memory-limit", "50%")
    yield child, url, prefix
    child.stop()
    run(clear_retained(url, Topics(prefix).status(child.ready["agent_id"])))


def test_agent_process_on_cupy(gpu_agent: tuple[Child, str, str]) -> None:
    import cupy

    agent, url, prefix = gpu_agent
    assert agent.ready["backend"] == "cupy"
    assert agent.ready["workers"] == cupy.cuda.runtime.getDeviceCount()
    status_topic = Topics(prefix).status(agent.ready["agent_id"])
    telemetry_topic = Topics(prefix).telemetry(agent.ready["agent_id"])
    x = RNG.standard_normal((300_001, 4)).astype(np.float32)  # 4.6 MiB, a ragged last chunk
    w = RNG.standard_normal((4, 3)).astype(np.float32)

    async def body() -> None:
        async with mqtt_watch(url, status_topic) as mqtt:
            status = await next_matching(mqtt, status_topic, control_pb2.AgentStatus)
            assert status.backend == "cupy"
            assert status.note == ""
            assert status.workers[0].gpu.model
            assert status.workers[0].gpu.memory_total > 0
            assert status.workers[0].memory_limit == status.workers[0].gpu.memory_total // 2
        async with agent_stub(agent.ready["endpoint"]) as stub:
            for dtype in SUPPORTED_DTYPES:
                array = sample(dtype, (1001, 3))
                await upload(stub, f"g.{dtype}", array, session="g", chunk_bytes=1000)
                np.testing.assert_array_equal(await download(stub, f"g.{dtype}"), array)
            await upload(stub, "g.x", x, session="g")
            await upload(stub, "g.w", w, session="g")
            np.testing.assert_array_equal(await download(stub, "g.x"), x)
            reply = await stub.Execute(
                agent_pb2.ExecuteRequest(
                    worker=0,
                    session="g",
                    fetch=["g.colmax"],
                    ops=[
                        op("matmul", [buffer("g.x"), buffer("g.w")], "g.xw", "float32", (300_001, 3)),
                        op("exp", [buffer("g.xw")], "g.e", "float32", (300_001, 3)),
                        op("max", [buffer("g.e")], "g.colmax", "float32", (3,), axis=0),
                    ],
                ),
                timeout=60,
            )
            want = np.exp(x @ w)
            np.testing.assert_allclose(fetched_array(reply.fetched[0]), want.max(axis=0), rtol=1e-4)
            np.testing.assert_allclose(await download(stub, "g.e"), want, rtol=1e-4)
            health = await stub.Health(agent_pb2.HealthRequest(), timeout=10)
            limit = health.status.workers[0].memory_limit

            request = header("g.huge", np.zeros(1, np.float32), session="g")
            request.header.meta.shape[:] = [limit // 4 + 1]

            async def over_limit() -> Any:
                yield request

            code, kind, _ = await refused(stub.Upload(over_limit(), timeout=20))
            assert (code, kind) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "out-of-memory")
            freed = await stub.Free(agent_pb2.FreeRequest(session="g"), timeout=10)
            assert freed.freed == len(SUPPORTED_DTYPES) + 5
        async with mqtt_watch(url, telemetry_topic) as mqtt:
            report = await next_matching(
                mqtt, telemetry_topic, control_pb2.AgentTelemetry, lambda t: t.ops_executed >= 3
            )
            assert report.workers[0].gpu_memory_free > 0

    run(body(), timeout=120)


def test_agent_module_is_importable_without_loading_cupy() -> None:
    import subprocess

    code = "import sys, gpupool.agent.main; assert 'cupy' not in sys.modules and 'pynvml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
