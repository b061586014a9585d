"""``fori_loop`` on the agent (gpupool/agent/compound.py, run by gpupool/agent/program.py): malformed loops
refused before anything runs and nothing kept, a loop that outgrows the worker's memory refused, a caller
that gives up stopping a long loop between trips, and results that never alias their inputs."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.compound import MAX_NESTING
from gpupool.agent.program import ProgramCancelled, estimate_work, run_program
from gpupool.protocol.codec import array_from_bytes, meta_of
from gpupool.protocol.errors import RpcRefusal

META = meta_of(np.dtype(np.float32), (4,))


def buffer(name: str) -> agent_pb2.Operand:
    return agent_pb2.Operand(buffer=name)


def add(a: str, b: str, out: str, meta: agent_pb2.ArrayMeta = META) -> agent_pb2.Op:
    return agent_pb2.Op(op="add", inputs=[buffer(a), buffer(b)], output=out, expect=meta)


def loop(
    trips: int, body: list[agent_pb2.Op], *, init: str = "x", out: str = "y", **fields: Any
) -> agent_pb2.Op:
    spec = {"carry": ["c"], "next": ["n"], "counter": "", **fields}
    return agent_pb2.Op(
        op="fori_loop",
        inputs=[buffer(init)],
        outputs=[out],
        expects=[META],
        loop=agent_pb2.Loop(trips=trips, body=body, **spec),
    )


def registry_with_x(limit: int = 1 << 20) -> BufferRegistry:
    registry = BufferRegistry([limit])
    for name, value in (("x", np.arange(4, dtype=np.float32)), ("one", np.ones(4, np.float32))):
        registry.commit(registry.reserve(worker=0, buffer_id=name, nbytes=value.nbytes, session="s"), value)
    return registry


def run(op: agent_pb2.Op, registry: BufferRegistry, **kwargs: Any) -> np.ndarray:
    outputs = list(op.outputs) or [op.output]
    reply = run_program(
        agent_pb2.ExecuteRequest(ops=[op], fetch=outputs, free=outputs, session="s"),
        backend=NumpyBackend(),
        registry=registry,
        **kwargs,
    )
    return array_from_bytes(reply.fetched[0].data, reply.fetched[0].meta)


def test_a_loop_adds_a_resident_buffer_each_trip_and_keeps_nothing_else() -> None:
    registry = registry_with_x()
    held = registry.usage(0).used
    np.testing.assert_array_equal(run(loop(5, [add("c", "one", "n")]), registry), np.arange(4) + 5)
    assert registry.usage(0).used == held
    # no trips, or the carry passed through unchanged: the result is a copy, not the input itself
    for op in (loop(0, [add("c", "one", "n")]), loop(3, [], next=["c"])):
        request = agent_pb2.ExecuteRequest(ops=[op], session="s")
        run_program(request, backend=NumpyBackend(), registry=registry)
        assert registry.get("y").array is not registry.get("x").array
        np.testing.assert_array_equal(registry.get("y").array, np.arange(4))
        registry.free(["y"])


def test_the_counter_is_the_trip_number() -> None:
    registry = registry_with_x()
    counter_meta = meta_of(np.dtype(np.float32), (4,))
    body = [agent_pb2.Op(op="add", inputs=[buffer("c"), buffer("i")], output="n", expect=counter_meta)]
    np.testing.assert_array_equal(run(loop(4, body, counter="i"), registry), np.arange(4) + 0 + 1 + 2 + 3)


def malformed() -> dict[str, agent_pb2.Op]:
    wide = meta_of(np.dtype(np.float64), (4,))
    nest = loop(1, [add("c", "one", "n")])
    for _ in range(MAX_NESTING):
        nest = loop(1, [nest], next=["y"], out="y2")
        nest.loop.body[0].inputs[0].buffer = "c"
        nest.outputs[0] = "y"
    return {
        "negative trips": loop(-1, [add("c", "one", "n")]),
        "next names nothing": loop(1, [add("c", "one", "n")], next=["nowhere"]),
        "carry changes dtype": loop(1, [add("c", "one", "n", wide)]),
        "carry and next disagree": loop(1, [add("c", "one", "n")], next=["n", "n"]),
        "counter is a carry": loop(1, [add("c", "one", "n")], counter="c"),
        "body remakes a carry": loop(1, [add("c", "one", "c")]),
        "output and outputs": agent_pb2.Op(
            op="fori_loop", output="z", outputs=["y"], expects=[META], inputs=[buffer("x")]
        ),
        "no loop": agent_pb2.Op(op="fori_loop", outputs=["y"], expects=[META], inputs=[buffer("x")]),
        "unknown body op": loop(
            1, [agent_pb2.Op(op="os.system", inputs=[buffer("c")], output="n", expect=META)]
        ),
        "too deep": nest,
    }


@pytest.mark.parametrize("case", sorted(malformed()))
def test_malformed_loops_are_refused_before_anything_runs(case: str) -> None:
    registry = registry_with_x()
    held = (len(registry), registry.usage(0).used)
    with pytest.raises(RpcRefusal) as refused:
        run(malformed()[case], registry)
    assert refused.value.kind == "bad-request", refused.value.message
    assert (len(registry), registry.usage(0).used) == held


def test_an_initial_value_of_another_shape_is_refused() -> None:
    registry = registry_with_x()
    op = loop(1, [add("c", "one", "n")])
    op.expects[0].CopyFrom(meta_of(np.dtype(np.float32), (2, 2)))
    op.loop.body[0].expect.CopyFrom(op.expects[0])
    with pytest.raises(RpcRefusal, match="starts as float32"):
        run(op, registry)


def test_a_body_that_outgrows_the_worker_is_refused_out_of_memory() -> None:
    registry = registry_with_x(limit=4096)
    huge = meta_of(np.dtype(np.float32), (4096,))
    body = [
        agent_pb2.Op(
            op="full", inputs=[agent_pb2.Operand(scalar=agent_pb2.Scalar(f=1.0))], output="big", expect=huge
        ),
        add("c", "one", "n"),
    ]
    with pytest.raises(RpcRefusal) as refused:
        run(loop(1, body), registry)
    assert refused.value.kind == "out-of-memory"
    assert len(registry) == 2


def test_a_caller_that_gives_up_stops_a_long_loop_between_trips() -> None:
    registry = registry_with_x()
    cancelled = threading.Event()
    timer = threading.Timer(0.3, cancelled.set)
    timer.start()
    with pytest.raises(ProgramCancelled):
        run(loop(10**9, [add("c", "one", "n")]), registry, cancelled=cancelled)
    timer.join()
    assert len(registry) == 2


def test_a_loops_deadline_grows_with_its_trips() -> None:
    def work(trips: int) -> tuple[int, int]:
        request = agent_pb2.ExecuteRequest(ops=[loop(trips, [add("c", "one", "n")])])
        return estimate_work(request, lambda _: 16)

    assert work(1000)[0] == 1000 * work(1)[0]
    assert work(1000)[1] == 1000 * work(1)[1]


def test_a_kernel_op_on_a_numpy_worker_is_refused_and_keeps_nothing() -> None:
    registry = registry_with_x()
    kernel = agent_pb2.Kernel(
        kind="elementwise", name="twice", in_params="float32 x", out_params="float32 y", operation="y = 2 * x"
    )
    op = agent_pb2.Op(op="kernel", inputs=[buffer("x")], output="y", expect=META, kernel=kernel)
    with pytest.raises(RpcRefusal, match="CuPy worker") as refused:
        run(op, registry, allow_kernels=True)
    assert refused.value.kind == "bad-request"
    assert len(registry) == 2
    kernel.options.append("-Xlinker=/etc/passwd")  # not on the allow-list: refused before anything runs
    with pytest.raises(RpcRefusal) as refused:
        run(op, registry, allow_kernels=True)
    assert refused.value.kind == "bad-request"


def test_a_loop_result_that_views_another_value_is_copied() -> None:
    registry = BufferRegistry([1 << 20])
    square = np.arange(16, dtype=np.float32).reshape(4, 4)
    registry.commit(registry.reserve(worker=0, buffer_id="m", nbytes=square.nbytes, session="s"), square)
    meta = meta_of(np.dtype(np.float32), (4, 4))
    body = [agent_pb2.Op(op="transpose", inputs=[buffer("c")], output="n", expect=meta)]  # a view, inside
    op = agent_pb2.Op(
        op="fori_loop",
        inputs=[buffer("m")],
        outputs=["t"],
        expects=[meta],
        loop=agent_pb2.Loop(trips=3, carry=["c"], next=["n"], body=body),
    )
    run_program(agent_pb2.ExecuteRequest(ops=[op], session="s"), backend=NumpyBackend(), registry=registry)
    result = registry.get("t").array
    np.testing.assert_array_equal(result, square.T)
    assert result.base is None
    assert result.flags.c_contiguous
