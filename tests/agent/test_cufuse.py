"""Generated kernels for elementwise chains on CuPy workers (gpupool/agent/cufuse.py): the CUDA source
generated for chains (what can be said exactly, and None for the rest), and the program's fallback to op
by op where a chain cannot be generated, on a backend posing as CuPy. The kernels themselves compile and
run only on a GPU: tests/agent/test_cufuse_gpu.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.cufuse import generate
from gpupool.agent.ops import Expected
from gpupool.agent.program import run_program
from gpupool.protocol.codec import array_from_bytes, meta_of

SHAPE = (8, 4)


def op(name: str, *inputs: agent_pb2.Operand, out: str, dtype: str = "float32") -> agent_pb2.Op:
    return agent_pb2.Op(op=name, inputs=list(inputs), output=out, expect=meta_of(np.dtype(dtype), SHAPE))


def buf(name: str) -> agent_pb2.Operand:
    return agent_pb2.Operand(buffer=name)


def weak(value: float) -> agent_pb2.Operand:
    return agent_pb2.Operand(scalar=agent_pb2.Scalar(f=value))


def expected(chain: list[agent_pb2.Op]) -> dict[str, Expected]:
    return {o.output: Expected(np.dtype(o.expect.dtype), SHAPE, 0) for o in chain}


def generated(chain: list[agent_pb2.Op], dtypes: dict[str, str], needed: set[str]) -> Any:
    return generate(
        chain, expected(chain), dtype_of=lambda b: np.dtype(dtypes[b]), needed=lambda b: b in needed
    )


def test_a_chain_becomes_one_kernel_with_its_scalars_as_parameters() -> None:
    chain = [
        op("multiply", buf("x"), weak(2.0), out="a"),
        op("add", buf("a"), weak(1.0), out="b"),
        op("power", buf("b"), weak(2.0), out="c"),
    ]
    kernel = generated(chain, {"x": "float32"}, {"c"})
    assert kernel.in_params == "float32 in0, float64 in1, float64 in2"
    assert kernel.out_params == "float32 out0"
    assert kernel.inputs == ((True, "x"), (False, 2.0), (False, 1.0))  # the second 2.0 reuses in1
    assert kernel.outputs == ("c",)
    assert kernel.operation.splitlines() == [
        "float t0 = (((float)in0) * ((float)in1));",
        "float t1 = (((float)t0) + ((float)in2));",
        "float t2 = pow(((float)t1), ((float)in1));",
        "out0 = t2;",
    ]


def test_comparisons_where_and_nan_propagating_extremes() -> None:
    chain = [
        op("greater_equal", buf("z"), weak(0.0), out="c", dtype="bool"),
        op("maximum", buf("z"), buf("w"), out="m", dtype="float64"),
        op("where", buf("c"), buf("m"), buf("w"), out="r", dtype="float64"),
    ]
    kernel = generated(chain, {"z": "float32", "w": "float64"}, {"r", "c"})
    lines = kernel.operation.splitlines()
    assert lines[0] == "bool t0 = (((float)in0) >= ((float)in1));"
    assert lines[1] == "double t1 = gp_max<double>(((double)in0), ((double)in2));"
    assert lines[2] == "double t2 = (((bool)t0) ? ((double)t1) : ((double)in2));"
    assert kernel.out_params == "bool out0, float64 out1"
    assert kernel.outputs == ("c", "r")


@pytest.mark.parametrize(
    ("chain", "dtypes"),
    [
        ([op("add", buf("x"), weak(1.0), out="a", dtype="int32")], {"x": "int32"}),  # integers: op by op
        ([op("add", buf("x"), weak(1.0), out="a", dtype="float16")], {"x": "float16"}),
        ([op("sort", buf("x"), out="a")], {"x": "float32"}),
        (
            [op("add", buf("x"), agent_pb2.Operand(scalar=agent_pb2.Scalar(i=1)), out="a")],
            {"x": "float32"},
        ),
        (
            [
                op(
                    "add",
                    buf("x"),
                    agent_pb2.Operand(scalar=agent_pb2.Scalar(f=1.0, dtype="float64")),
                    out="a",
                )
            ],
            {"x": "float32"},
        ),
        ([op("add", buf("x"), buf("y"), out="a")], {"x": "float32", "y": "int64"}),
    ],
    ids=["int32", "float16", "not elementwise", "int scalar", "typed scalar", "int64 input"],
)
def test_what_cannot_be_said_exactly_is_not_generated(
    chain: list[agent_pb2.Op], dtypes: dict[str, str]
) -> None:
    assert generated(chain, dtypes, {"a"}) is None


def test_nothing_needed_nothing_generated() -> None:
    chain = [op("exp", buf("x"), out="a"), op("negative", buf("a"), out="b")]
    assert generated(chain, {"x": "float32"}, set()) is None


class CupyPosing(NumpyBackend):
    """NumPy posing as a CuPy worker: generation is attempted; these chains fall back to op by op."""

    @property
    def name(self) -> str:
        return "cupy"


def test_chains_that_cannot_be_generated_run_op_by_op_on_a_cupy_worker() -> None:
    registry = BufferRegistry([1 << 20])
    x = np.arange(32, dtype=np.int32).reshape(SHAPE)
    registry.commit(registry.reserve(worker=0, buffer_id="x", nbytes=x.nbytes, session="s"), x)
    chain = [
        op("multiply", buf("x"), agent_pb2.Operand(scalar=agent_pb2.Scalar(i=3)), out="a", dtype="int32"),
        op("add", buf("a"), agent_pb2.Operand(scalar=agent_pb2.Scalar(i=1)), out="b", dtype="int32"),
        agent_pb2.Op(op="sum", inputs=[buf("b")], output="s", expect=meta_of(np.dtype(np.int64), ())),
    ]
    request = agent_pb2.ExecuteRequest(ops=chain, fetch=["s", "b"], free=["a", "s", "b"], session="s")
    reply = run_program(request, backend=CupyPosing(), registry=registry, fuse_kernels=True)
    got = {f.buffer_id: array_from_bytes(f.data, f.meta) for f in reply.fetched}
    np.testing.assert_array_equal(got["b"], x * 3 + 1)
    assert got["s"] == (x * 3 + 1).sum()
    assert len(registry) == 1
