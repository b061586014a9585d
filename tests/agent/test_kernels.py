"""Op ``kernel`` on the agent without a GPU: check_kernel's refusals, the NumPy worker's refusal, the cache's
pure parts (keys, allow-list, directory, counting), and placement of kernel work on CuPy agents only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpupool._errors import PlacementError
from gpupool._proto.v1 import agent_pb2, control_pb2
from gpupool._proto.v1.control_pb2 import AgentStatus, Worker
from gpupool.agent.backend import NumpyBackend
from gpupool.agent.kernel_cache import (
    KernelCache,
    cache_directory,
    cache_key,
    canonical_source,
    check_options,
)
from gpupool.agent.kernels import MAX_SOURCE_BYTES, check_kernel, run_kernel
from gpupool.agent.opargs import Expected
from gpupool.coordinator.registry import Registry
from gpupool.placement import agents_without_backend, split_rows
from gpupool.protocol.errors import RpcRefusal


def elementwise(**fields: object) -> agent_pb2.Kernel:
    base: dict[str, object] = {
        "kind": "elementwise",
        "name": "square",
        "in_params": "T x",
        "out_params": "T y",
        "operation": "y = x * x",
    }
    return agent_pb2.Kernel(**{**base, **fields})  # type: ignore[arg-type]


def refused(kernel: agent_pb2.Kernel, n_inputs: int = 1, n_outputs: int = 1) -> str:
    with pytest.raises(RpcRefusal) as caught:
        check_kernel(kernel, n_inputs, n_outputs)
    assert caught.value.kind == "bad-request"
    return caught.value.message


def test_well_formed_kernels_pass() -> None:
    check_kernel(elementwise(options=["-std=c++17", "-D", "N=4", "--use_fast_math"]), 1, 1)
    check_kernel(
        agent_pb2.Kernel(
            kind="reduction",
            name="l2",
            in_params="T x",
            out_params="float64 y",
            map_expr="x * x",
            reduce_expr="a + b",
            post_map_expr="y = sqrt(a)",
            identity="0",
        ),
        1,
        1,
    )
    check_kernel(
        agent_pb2.Kernel(kind="raw", name="k", code="#include <cuda_fp16.h>\n", grid=[2], block=[128]), 2, 1
    )


def test_check_kernel_refuses_what_it_should() -> None:
    assert "unknown kind 'python'" in refused(elementwise(kind="python"))
    assert "not an identifier" in refused(elementwise(name="a b"))
    assert f"at most {MAX_SOURCE_BYTES}" in refused(elementwise(preamble="x" * MAX_SOURCE_BYTES))
    assert "'-I/etc' is not allowed" in refused(elementwise(options=["-I/etc"]))
    assert "not allowed" in refused(elementwise(options=["-DX=$(id)"]))
    assert "declares 1 inputs and 1 outputs; the op gives 2 and 1" in refused(elementwise(), 2, 1)
    assert "takes no code" in refused(elementwise(code="__global__ void k() {}"))
    assert "only raw kernels take grid" in refused(elementwise(grid=[1], block=[1]))
    assert "#include" in refused(elementwise(preamble='#include "/etc/passwd"'))
    assert "#include" in refused(elementwise(preamble="#include <../../secret.h>"))
    assert "unknown keyword" in refused(elementwise(in_params="const T x"))
    raw = agent_pb2.Kernel(kind="raw", name="k", code="__global__ void k() {}")
    assert "grid and block together" in refused(agent_pb2.Kernel(kind="raw", name="k", code="x", grid=[1]))
    assert "one to three" in refused(
        agent_pb2.Kernel(kind="raw", name="k", code="x", grid=[1] * 4, block=[1])
    )
    assert "1024" in refused(agent_pb2.Kernel(kind="raw", name="k", code="x", grid=[1], block=[64, 32]))
    assert "outputs" in refused(raw, 1, 0)
    reduction = agent_pb2.Kernel(
        kind="reduction", name="r", in_params="T x", out_params="T y, T z", map_expr="x", reduce_expr="a + b"
    )
    assert "one output" in refused(reduction, 1, 2)


def test_run_kernel_on_a_numpy_worker_is_refused_before_anything_runs() -> None:
    expects = [Expected(np.dtype(np.float32), (4,), 16)]
    with pytest.raises(RpcRefusal, match="kernels need a CuPy worker") as caught:
        run_kernel(NumpyBackend(), elementwise(), [np.ones(4, np.float32)], expects, allowed=True)
    assert caught.value.kind == "bad-request"


def test_options_allow_list() -> None:
    assert check_options(["-D", "N=4", "-D M", "-DK", "--define-macro=X=1.5", "--std=c++20"]) == [
        "-DN=4",
        "-DM",
        "-DK",
        "--define-macro=X=1.5",
        "--std=c++20",
    ]
    for bad in (
        "-I/",
        "--pre-include=/etc/passwd",
        "-include",
        "-o",
        "-DX=a b",
        "-D1X",
        "-DX='q'",
        "-arch=sm_90",
    ):
        with pytest.raises(ValueError, match="not allowed"):
            check_options([bad])
    with pytest.raises(ValueError, match="at most 32"):
        check_options(["-lineinfo"] * 33)


def test_cache_keys_follow_the_source_not_its_spacing() -> None:
    source = canonical_source({"operation": "y = x;\r\n", "kind": "elementwise"})
    assert source == canonical_source({"kind": "elementwise", "operation": "y = x;   \n"})
    key = cache_key(source, ["-DN=1"], "86", ["<f4"])
    assert key == cache_key(source, ["-DN=1"], "86", ["<f4"])
    assert key[1] == "86"
    assert len(key[0]) == 64
    assert key != cache_key(source, ["-DN=2"], "86", ["<f4"])
    assert key != cache_key(source, ["-DN=1"], "90", ["<f4"])
    assert key != cache_key(source, ["-DN=1"], "86", ["<f8"])
    assert key != cache_key(canonical_source({"operation": "y = 2 * x;"}), ["-DN=1"], "86", ["<f4"])


def test_cache_directory_from_the_environment(tmp_path: Path) -> None:
    assert cache_directory({"GPUPOOL_KERNEL_CACHE": "/k", "XDG_CACHE_HOME": "/x"}) == Path("/k")
    assert cache_directory({"XDG_CACHE_HOME": "/x"}) == Path("/x/gpupool/kernels")
    assert cache_directory({}, home=tmp_path) == tmp_path / ".cache/gpupool/kernels"


def test_cache_counts_hits_compiles_and_hits_from_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUPY_CACHE_DIR", "unset")  # restored after the test
    built: list[int] = []
    first = KernelCache(tmp_path)
    key = cache_key("src", [], "86")
    assert first.get(key, lambda: built.append(1) or "kernel") == "kernel"
    assert first.get(key, lambda: built.append(2) or "other") == "kernel"
    assert built == [1]
    assert (first.counts.hits, first.counts.compiles) == (1, 1)
    assert Path(os.environ["CUPY_CACHE_DIR"]) == tmp_path / "cupy"
    # Another process on the same directory: the binary is on disk, so its first use is a hit.
    second = KernelCache(tmp_path)
    second.get(key, lambda: "kernel")
    assert (second.counts.hits, second.counts.disk_hits, second.counts.compiles) == (1, 1, 0)
    # A kernel whose compile failed when it ran is forgotten: the next use compiles again.
    second.forget(key)
    third = KernelCache(tmp_path)
    third.get(key, lambda: "kernel")
    assert third.counts.compiles == 1


def fleet() -> Registry:
    registry = Registry()
    for agent_id, backend in (("a-numpy", "numpy"), ("b-cupy", "cupy"), ("c-cupy", "cupy")):
        status = AgentStatus(
            agent_id=agent_id,
            name=agent_id,
            endpoint=f"10.0.0.1:{5000 + len(agent_id)}",
            state=control_pb2.AGENT_STATE_READY,
            backend=backend,
            workers=[Worker(index=i, backend=backend, memory_limit=1000) for i in range(2)],
        )
        registry.apply_status(status, now=0.0)
    return registry


def test_kernel_work_is_placed_on_cupy_agents_only() -> None:
    registry = fleet()
    agents = [
        (e.agent_id, e.status.backend, [w.backend for w in e.status.workers]) for e in registry.agents()
    ]
    assert agents_without_backend(agents, "cupy") == ["a-numpy"]
    assert agents_without_backend(agents, "") == []
    ready = registry.ready(exclude=agents_without_backend(agents, "cupy"))
    assert set(ready.agent_ids) == {"b-cupy", "c-cupy"}
    split = split_rows(40, 10, ready.free)
    assert {ready.agent_ids[position] for position, _, _ in split} == {"b-cupy", "c-cupy"}
    # An agent with one NumPy worker among CuPy ones cannot take kernel work.
    assert agents_without_backend([("m", "cupy", ["cupy", "numpy"])], "cupy") == ["m"]
    with pytest.raises(PlacementError, match="unknown backend 'tpu'"):
        agents_without_backend(agents, "tpu")


def test_a_numpy_only_fleet_has_nowhere_for_kernels() -> None:
    registry = Registry()
    registry.apply_status(
        AgentStatus(
            agent_id="n",
            endpoint="h:1",
            state=control_pb2.AGENT_STATE_READY,
            backend="numpy",
            workers=[Worker(index=0, backend="numpy", memory_limit=10)],
        ),
        now=0.0,
    )
    agents = [
        (e.agent_id, e.status.backend, [w.backend for w in e.status.workers]) for e in registry.agents()
    ]
    assert not registry.ready(exclude=agents_without_backend(agents, "cupy"))
