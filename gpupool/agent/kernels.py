"""The agent's side of op ``kernel``: a user's CuPy kernel, vetted, compiled through a cache, launched.

:func:`check_kernel` runs before anything of a program runs (pure: no CuPy); :func:`run_kernel` runs one
kernel on a worker. Kernel sources arrive as text in :class:`~gpupool._proto.v1.agent_pb2.Kernel`, never as
compiled or pickled code; they run only on CuPy workers, and only on an agent whose owner allowed user
kernels (``gpupool-agent --allow-kernels``): a CUDA kernel runs in the agent's process and can read any
device memory there, other sessions' buffers included (SECURITY.md).

Refusals are :class:`~gpupool.protocol.errors.RpcRefusal`: ``bad-request`` (a malformed kernel, a NumPy
worker), ``permission-denied`` (kernels not allowed here), ``kernel-failed`` (the compiler's log, or CUDA's
error at launch).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import ArrayBackend
from gpupool.agent.kernel_cache import KernelCache, cache_key, canonical_source, check_options, shared_cache
from gpupool.agent.opargs import Expected
from gpupool.protocol.errors import RpcRefusal

__all__ = ["KINDS", "MAX_SOURCE_BYTES", "check_kernel", "compile_errors", "run_kernel"]

#: The kinds of kernel, as CuPy's classes: ElementwiseKernel, ReductionKernel, RawKernel.
KINDS: Final = ("elementwise", "reduction", "raw")
#: The most text one kernel may carry, all its source fields together.
MAX_SOURCE_BYTES: Final = 256 * 1024
#: The most operands and results a kernel may take.
MAX_ARGUMENTS: Final = 64
#: The most dynamic shared memory a raw launch may ask for (CUDA allows up to 227 KiB per block).
MAX_SHARED_MEM: Final = 256 * 1024
#: Threads per block of a launch whose grid the agent derives (one thread per element of the output).
DERIVED_BLOCK: Final = 128
#: The most of a compiler log a refusal carries.
MAX_LOG: Final = 8000

_SOURCE_FIELDS: Final = (
    "in_params",
    "out_params",
    "operation",
    "map_expr",
    "reduce_expr",
    "post_map_expr",
    "identity",
    "preamble",
    "code",
)
_FIELDS_OF: Final = {
    "elementwise": {"in_params", "out_params", "operation", "preamble"},
    "reduction": {
        "in_params",
        "out_params",
        "map_expr",
        "reduce_expr",
        "post_map_expr",
        "identity",
        "preamble",
    },
    "raw": {"code"},
}
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: ``#include <name>`` / ``"name"``: relative names of plain characters only, so a source cannot read the
#: rig's files through the preprocessor (and show them in a compiler log).
_INCLUDE: Final = re.compile(r"^\s*#\s*include\b(.*)$", re.MULTILINE)
_INCLUDE_TARGET: Final = re.compile(r"\s*[<\"]([A-Za-z0-9_][A-Za-z0-9_./\-]*)[>\"]\s*(//.*)?")


def _refuse(message: str) -> RpcRefusal:
    return RpcRefusal("bad-request", f"kernel: {message}")


def param_names(text: str, *, what: str) -> list[tuple[str, bool]]:
    """The ``(name, raw)`` of each parameter of a CuPy parameter list (``"float32 x, raw T y"``).

    Raises:
        RpcRefusal: ``bad-request`` for a malformed list.
    """
    if not text.strip():
        return []
    params = []
    for item in text.split(","):
        words = item.split()
        if len(words) < 2:
            raise _refuse(f"{what}: {item.strip()!r} needs a type and a name")
        keywords, type_name, name = words[:-2], words[-2], words[-1]
        if any(k not in ("raw", "_non_const") for k in keywords):
            raise _refuse(f"{what}: unknown keyword in {item.strip()!r} (only 'raw' is known)")
        if not _IDENTIFIER.fullmatch(name) or not _IDENTIFIER.fullmatch(type_name):
            raise _refuse(f"{what}: {item.strip()!r} is not '[raw] TYPE NAME' with identifiers")
        params.append((name, "raw" in keywords))
    return params


def check_kernel(kernel: agent_pb2.Kernel, n_inputs: int, n_outputs: int) -> None:
    """Refuse a kernel this agent would not compile, before anything of its program runs.

    Checks: the kind is known; the name is an identifier; the source fields belong to the kind and come
    to at most :data:`MAX_SOURCE_BYTES`; ``#include`` names relative files only; the options are on the
    allow-list (:func:`~gpupool.agent.kernel_cache.check_options`); grid and block have at most three
    positive dimensions, given together, and only for raw kernels; the parameter lists parse and
    match ``n_inputs`` and ``n_outputs`` (a reduction has one output; a raw kernel takes its inputs then
    its outputs as its parameters).

    Raises:
        RpcRefusal: ``bad-request``, saying what is wrong.
    """
    kind = kernel.kind
    if kind not in KINDS:
        raise _refuse(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if not _IDENTIFIER.fullmatch(kernel.name):
        raise _refuse(f"name {kernel.name[:64]!r} is not an identifier of at most 128 characters")
    total = 0
    for field in _SOURCE_FIELDS:
        text: str = getattr(kernel, field)
        total += len(text.encode())
        if text and field not in _FIELDS_OF[kind]:
            raise _refuse(f"a {kind} kernel takes no {field}")
    if total > MAX_SOURCE_BYTES:
        raise _refuse(f"source of {total} bytes; at most {MAX_SOURCE_BYTES}")
    for source in (kernel.preamble, kernel.code, kernel.operation):
        for match in _INCLUDE.finditer(source):
            target = _INCLUDE_TARGET.fullmatch(match.group(1))
            if target is None or ".." in target.group(1).split("/"):
                raise _refuse(f"#include{match.group(1)[:80]} is not allowed: name a relative header")
    try:
        check_options(list(kernel.options))
    except ValueError as exc:
        raise _refuse(str(exc)) from exc
    _check_launch(kernel)
    if not 0 <= n_inputs <= MAX_ARGUMENTS or not 1 <= n_outputs <= MAX_ARGUMENTS:
        raise _refuse(f"{n_inputs} inputs and {n_outputs} outputs (1 to {MAX_ARGUMENTS} outputs)")
    if kind == "raw":
        if not kernel.code.strip():
            raise _refuse("a raw kernel needs its code")
        return
    inputs = param_names(kernel.in_params, what="in_params")
    outputs = param_names(kernel.out_params, what="out_params")
    names = [name for name, _ in inputs + outputs]
    if len(set(names)) < len(names):
        raise _refuse("a parameter name is used twice")
    if len(inputs) != n_inputs or len(outputs) != n_outputs:
        raise _refuse(
            f"the kernel declares {len(inputs)} inputs and {len(outputs)} outputs; the op gives "
            f"{n_inputs} and {n_outputs}"
        )
    if any(raw for _, raw in outputs):
        raise _refuse("outputs cannot be raw")
    if kind == "elementwise" and not kernel.operation.strip():
        raise _refuse("an elementwise kernel needs its operation")
    if kind == "reduction":
        if n_outputs != 1:
            raise _refuse("a reduction kernel has one output")
        if not kernel.map_expr.strip() or not kernel.reduce_expr.strip():
            raise _refuse("a reduction kernel needs map_expr and reduce_expr")


def _check_launch(kernel: agent_pb2.Kernel) -> None:
    grid, block = list(kernel.grid), list(kernel.block)
    if kernel.kind != "raw":
        if grid or block or kernel.shared_mem:
            raise _refuse("only raw kernels take grid, block or shared_mem")
        return
    if bool(grid) != bool(block):
        raise _refuse("give grid and block together, or neither (one thread per output element)")
    for what, dims in (("grid", grid), ("block", block)):
        if len(dims) > 3 or any(d < 1 for d in dims):
            raise _refuse(f"{what} {dims} must have one to three positive dimensions")
    if math.prod(block) > 1024:
        raise _refuse(f"block {block} has {math.prod(block)} threads; at most 1024")
    if kernel.shared_mem > MAX_SHARED_MEM:
        raise _refuse(f"shared_mem {kernel.shared_mem}; at most {MAX_SHARED_MEM} bytes")


def run_kernel(
    backend: ArrayBackend,
    kernel: agent_pb2.Kernel,
    inputs: list[Any],
    expects: list[Expected],
    *,
    allowed: bool = False,
    axes: Sequence[int] = (),
    keepdims: bool = False,
    cache: KernelCache | None = None,
) -> list[Any]:
    """Run a checked kernel (:func:`check_kernel`) on a worker; returns its outputs, as ``expects`` says.

    ``inputs`` are device arrays or scalars, in the kernel's parameter order. Outputs are allocated with
    the expected dtype and shape, zero-filled (a raw kernel may write only some of them); a raw kernel
    takes them after its inputs. A reduction reduces over ``axes`` (none: every axis), keeping them with
    length 1 if ``keepdims``, computes in its out_params' type and is cast to the expected dtype.
    ``allowed`` is the agent's ``--allow-kernels``.

    Call on the worker's thread (as every use of ``backend.xp``).

    Raises:
        RpcRefusal: ``bad-request`` on a NumPy worker or for a result not as expected;
            ``permission-denied`` unless ``allowed``; ``kernel-failed`` with the compiler's log when the
            source does not compile. CUDA errors at launch pass through, for the caller's
            ``backend.kernel_errors`` handling.
    """
    if backend.name != "cupy":
        raise RpcRefusal(
            "bad-request",
            f"user kernels need a CuPy worker; this one runs {backend.name} (place the arrays on "
            "CuPy agents: pool.asarray(..., backend='cupy'))",
        )
    if not allowed:
        raise RpcRefusal(
            "permission-denied",
            "this agent runs no user kernels: its owner did not start it with --allow-kernels",
        )
    cp = backend.xp
    cache = cache if cache is not None else shared_cache()
    capability = str(cp.cuda.Device(backend.device_index).compute_capability)
    options = check_options(list(kernel.options))
    fields = {f: getattr(kernel, f) for f in _SOURCE_FIELDS if getattr(kernel, f)}
    source = canonical_source({**fields, "kind": kernel.kind, "name": kernel.name})
    signature = [_type_of(value) for value in inputs] + [e.dtype.str for e in expects]
    key = cache_key(source, options, capability, signature if kernel.kind != "raw" else ())
    errors = compile_errors()
    try:
        if kernel.kind == "raw":
            built = cache.get(key, lambda: _build_raw(cp, kernel, options))
            outputs = [cp.zeros(e.shape, e.dtype) for e in expects]
            grid, block = _launch_shape(kernel, outputs[0].size)
            arguments = tuple(_raw_argument(value) for value in (*inputs, *outputs))
            built(grid, block, arguments, shared_mem=kernel.shared_mem)
        elif kernel.kind == "elementwise":
            built = cache.get(key, lambda: _build_elementwise(cp, kernel, options))
            outputs = [cp.empty(e.shape, e.dtype) for e in expects]
            built(*inputs, *outputs)
        else:
            built = cache.get(key, lambda: _build_reduction(cp, kernel, options))
            result = built(*inputs, axis=tuple(axes) or None, keepdims=keepdims)
            outputs = [cp.asarray(result).astype(expects[0].dtype, copy=False)]
    except errors as exc:
        cache.forget(key)
        raise RpcRefusal("kernel-failed", _compile_message(kernel.name, exc)) from exc
    for output, expect in zip(outputs, expects, strict=True):
        if tuple(output.shape) != expect.shape:
            raise RpcRefusal(
                "bad-request",
                f"kernel {kernel.name!r} gave shape {tuple(output.shape)}; the client expected "
                f"{expect.shape}",
            )
    return outputs


def _type_of(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    return str(dtype.str) if dtype is not None else type(value).__name__


def _raw_argument(value: Any) -> Any:
    """A raw kernel's argument: arrays as they are, scalars as NumPy scalars (CuPy passes their C type)."""
    if isinstance(value, bool | int | float):
        return np.asarray(value)[()]  # bool, int64 or float64, as CuPy would type a Python scalar
    return value


def _launch_shape(kernel: agent_pb2.Kernel, elements: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if kernel.grid:
        return tuple(kernel.grid), tuple(kernel.block)
    return (max(1, -(-elements // DERIVED_BLOCK)),), (DERIVED_BLOCK,)


def _build_raw(cp: Any, kernel: agent_pb2.Kernel, options: list[str]) -> Any:
    built = cp.RawKernel(kernel.code, kernel.name, options=tuple(options))
    built.compile()  # here, so that a compile error is the compiler's, not the launch's
    return built


def _build_elementwise(cp: Any, kernel: agent_pb2.Kernel, options: list[str]) -> Any:
    return cp.ElementwiseKernel(
        kernel.in_params,
        kernel.out_params,
        kernel.operation,
        kernel.name,
        preamble=kernel.preamble,
        options=tuple(options),
    )


def _build_reduction(cp: Any, kernel: agent_pb2.Kernel, options: list[str]) -> Any:
    return cp.ReductionKernel(
        kernel.in_params,
        kernel.out_params,
        kernel.map_expr,
        kernel.reduce_expr,
        kernel.post_map_expr or "",
        kernel.identity or None,
        kernel.name,
        preamble=kernel.preamble,
        options=tuple(options),
    )


def compile_errors() -> tuple[type[BaseException], ...]:
    """CuPy's compiler errors (none without CuPy)."""
    try:
        compiler = importlib.import_module("cupy.cuda.compiler")
    except ImportError:
        return ()
    found = getattr(compiler, "CompileException", None)
    return (found,) if isinstance(found, type) and issubclass(found, BaseException) else ()


def _compile_message(name: str, exc: BaseException) -> str:
    log = str(exc)
    if len(log) > MAX_LOG:
        log = log[:MAX_LOG] + f"... ({len(log) - MAX_LOG} more characters)"
    return f"kernel {name!r} did not compile: {log}"
