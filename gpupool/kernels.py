"""Users' CUDA kernels with CuPy's signatures, run on the pool's CuPy agents shard by shard.

``gp.ElementwiseKernel``, ``gp.ReductionKernel`` and ``gp.RawKernel`` take CuPy's arguments, in CuPy's
order; their parameter lists are parsed and checked here, before anything is sent. A call sends the
kernel's source as data (op ``kernel``, docs/contracts.md) to the agents that hold the operands' rows,
which compile it once (cached on disk) and run it on each row shard:

- an elementwise kernel runs per shard; its result has the shards of its first row-carrying remote
  operand; small host operands and scalars go to every shard whole, as for ``x * w``.
- a reduction kernel over every element reduces each shard to a partial on its agent, then reduces the
  partials in one more small launch; over an axis other than the rows' (``axis=1``), each shard reduces
  its own rows. The partials travel in ``reduce_type``, which must be a type NumPy knows.
- a raw kernel is launched on each shard with the grid and block given (``None``: one thread per
  element of the shard's output, in blocks of 128); its arguments are ``args`` followed by the output,
  which the pool allocates zero-filled (shape and dtype given, or the first array argument's).

Each shard's launch sees that shard only: ``i`` and ``_ind.size()`` count its elements, and a raw kernel
gets the shard's arrays (pass :class:`ShardSize` for the shard's element count). Kernels run only on
agents whose workers run CuPy (``pool.asarray(..., backend="cupy")``) and whose owners allow them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool._errors import ShapeMismatch, UsageError
from gpupool._proto.v1 import agent_pb2
from gpupool.client.array import RemoteArray, from_spec
from gpupool.client.dispatch import kernel_op
from gpupool.client.graph import GraphArray, Program, make_op, run_programs
from gpupool.client.layout import Piece
from gpupool.client.operands import constant_operand, scalar_operand
from gpupool.client.session import Session
from gpupool.client.values import PendingValue

__all__ = ["ElementwiseKernel", "RawKernel", "ReductionKernel", "ShardSize", "parse_params"]

_KEYWORDS: Final = ("raw", "_non_const")
#: C types CuPy users name as a reduce_type, and the NumPy dtype partials travel in.
_C_TYPES: Final = {
    "bool": "bool",
    "signed char": "int8",
    "unsigned char": "uint8",
    "short": "int16",
    "unsigned short": "uint16",
    "int": "int32",
    "unsigned int": "uint32",
    "long": "int64",
    "unsigned long": "uint64",
    "long long": "int64",
    "unsigned long long": "uint64",
    "float16": "float16",
    "half": "float16",
    "float": "float32",
    "double": "float64",
    "complex<float>": "complex64",
    "complex<double>": "complex128",
}


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a CuPy parameter list.

    Attributes:
        name: its name.
        dtype: its type, or None for a placeholder (``T``).
        placeholder: the placeholder's letter (``""`` for a concrete type).
        raw: ``raw``: the whole array, indexed by the kernel itself.
    """

    name: str
    dtype: np.dtype[Any] | None
    placeholder: str
    raw: bool


def parse_params(text: str, *, what: str = "params") -> tuple[Param, ...]:
    """CuPy's parameter list (``"float32 x, raw T y"``) as :class:`Param` s.

    Raises:
        UsageError: a parameter that is not ``[raw] TYPE NAME``, an unknown keyword or type, or a name
            that is not an identifier or is used twice.
    """
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a string such as 'float32 x, T y', not {type(text).__name__}")
    params: list[Param] = []
    for item in text.split(",") if text.strip() else []:
        words = item.split()
        if len(words) < 2:
            raise UsageError(f"{what}: {item.strip()!r} needs a type and a name (e.g. 'float32 x')")
        keywords, type_name, name = words[:-2], words[-2], words[-1]
        unknown = [k for k in keywords if k not in _KEYWORDS]
        if unknown:
            raise UsageError(f"{what}: unknown keyword {unknown[0]!r} in {item.strip()!r} (known: raw)")
        if not (name.isidentifier() and name.isascii()):
            raise UsageError(f"{what}: {name!r} is not a valid parameter name")
        if len(type_name) == 1 and type_name.isalpha():
            params.append(Param(name, None, type_name, "raw" in keywords))
            continue
        try:
            dtype = np.dtype(type_name)
        except TypeError:
            dtype = None
        if dtype is None or dtype.name != type_name or dtype.kind not in "biufc":
            raise UsageError(
                f"{what}: unknown type {type_name!r} in {item.strip()!r}; use a NumPy dtype name "
                "(float32, int64, bool, ...) or a one-letter placeholder such as T"
            )
        params.append(Param(name, dtype, "", "raw" in keywords))
    names = [p.name for p in params]
    if len(set(names)) < len(names):
        raise UsageError(f"{what}: a parameter name is used twice in {text!r}")
    return tuple(params)


class ShardSize:
    """A raw kernel argument that each shard's launch receives as its own output's element count.

    Args:
        dtype: the integer type the kernel takes it as (default int32, CUDA's ``int``).
    """

    def __init__(self, dtype: object = np.int32) -> None:
        self.dtype = np.dtype(dtype)  # type: ignore[call-overload]
        if self.dtype.kind not in "iu":
            raise UsageError(f"ShardSize needs an integer dtype, not {self.dtype}")


def _options(options: object) -> list[str]:
    if isinstance(options, str):
        return [options]
    items: list[object] = list(options)  # type: ignore[call-overload]
    strings = [o for o in items if isinstance(o, str)]
    if len(strings) < len(items):
        raise UsageError("options must be strings, e.g. ('-std=c++17', '--use_fast_math')")
    return strings


def _name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
        raise UsageError(f"a kernel's name must be an identifier, not {name!r}")
    return name


def _shape_of(value: object) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else np.asarray(value).shape


def _dtype_of(value: object) -> np.dtype[Any]:
    if isinstance(value, GraphArray | np.ndarray | np.generic | PendingValue):
        return np.dtype(value.dtype)
    return np.asarray(value).dtype


def _bind(params: Sequence[Param], args: Sequence[object], *, kernel: str) -> dict[str, np.dtype[Any]]:
    """The placeholders' types: from array arguments first, then from scalars (as CuPy does)."""
    bound: dict[str, np.dtype[Any]] = {}
    for scalars in (False, True):
        for param, arg in zip(params, args, strict=True):
            if param.placeholder and param.placeholder not in bound:
                is_scalar = not _shape_of(arg) and not isinstance(arg, GraphArray | np.ndarray)
                if is_scalar == scalars:
                    bound[param.placeholder] = _dtype_of(arg)
    return bound


def _out_dtype(param: Param, bound: dict[str, np.dtype[Any]], *, kernel: str) -> np.dtype[Any]:
    if param.dtype is not None:
        return param.dtype
    if param.placeholder not in bound:
        raise UsageError(
            f"{kernel}: cannot decide the type {param.placeholder} of output {param.name!r}: no input of "
            "that type was given"
        )
    return bound[param.placeholder]


def _lead(params: Sequence[Param], args: Sequence[object], *, kernel: str) -> RemoteArray:
    """The remote array whose rows the kernel's shards follow: the one with the most dimensions among
    the non-raw remote arguments (the first of those)."""
    remotes = [a for p, a in zip(params, args, strict=True) if isinstance(a, RemoteArray) and not p.raw]
    if not remotes:
        raw = any(isinstance(a, RemoteArray) for a in args)
        raise UsageError(
            f"{kernel}: needs a remote array (pool.asarray(..., backend='cupy')) as a non-raw argument"
            + ("; raw arguments go whole to every shard and cannot lead" if raw else "")
        )
    lead = max(remotes, key=lambda a: a.ndim)
    if lead.ndim == 0:
        raise UsageError(f"{kernel}: the remote arguments are 0-d; nothing to shard")
    return lead


def _check_cupy(session: Session, arrays: Sequence[object], *, kernel: str) -> None:
    """Raise before anything is sent if a remote argument has a shard on a worker that does not run CuPy."""
    pieces = [p for a in arrays if isinstance(a, RemoteArray) for p in a.layout]
    backends = _backends(session, {p.agent_id for p in pieces})
    wrong = sorted(
        {
            f"{p.agent_id} ({backends.get(p.agent_id, 'unknown')})"
            for p in pieces
            if backends.get(p.agent_id) != "cupy"
        }
    )
    if wrong:
        raise UsageError(
            f"{kernel}: user kernels run only on CuPy agents, and these arrays have shards on "
            f"{', '.join(wrong)}; upload them with pool.asarray(data, backend='cupy') (an agent on a "
            "GPU host, started by its owner with --allow-kernels)"
        )


#: Agents' backends by session, as the coordinator listed them (an agent's backend does not change
#: while it runs): asked again only for agents not seen yet.
_BACKENDS: weakref.WeakKeyDictionary[Session, dict[str, str]] = weakref.WeakKeyDictionary()


def _backends(session: Session, agent_ids: set[str]) -> dict[str, str]:
    known = _BACKENDS.setdefault(session, {})
    if not agent_ids <= known.keys():
        for record in session.list_agents(include_offline=True):
            status = record.status
            kinds = {w.backend or status.backend for w in status.workers} or {status.backend}
            known[status.agent_id] = kinds.pop() if len(kinds) == 1 else "mixed"
    return known


def _one_output(params: Sequence[Param], *, kernel: str) -> Param:
    if len(params) != 1:
        raise UsageError(
            f"{kernel}: {len(params)} outputs; gpupool runs kernels with one output for now (see README, "
            "Not supported yet)"
        )
    return params[0]


class ElementwiseKernel:
    """A user's elementwise kernel, with CuPy's signature (``cupy.ElementwiseKernel``).

    Args:
        in_params: input parameters, e.g. ``"float32 x, T y"`` (``raw`` ones go whole to every shard).
        out_params: output parameters (one, for now).
        operation: the loop body, in CUDA C++, over element ``i`` of the shard.
        name: the kernel's name.
        reduce_dims: accepted for CuPy's signature; CuPy decides on the agent.
        preamble: code before the kernel (helper functions).
        no_return, return_tuple: as CuPy's (the result, or ``None``, or a one-tuple).
        options: compiler options (the agents allow ``-std=c++NN``, ``--use_fast_math``, ``-DNAME=VALUE``).

    Raises:
        UsageError: malformed parameter lists, a bad name, options that are not strings, or CuPy
            keywords gpupool does not carry (``loop_prep``, ``after_loop``).
    """

    def __init__(
        self,
        in_params: str,
        out_params: str,
        operation: str,
        name: str = "kernel",
        reduce_dims: bool = True,
        preamble: str = "",
        no_return: bool = False,
        return_tuple: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - {"options", "loop_prep", "after_loop"}
        if unknown:
            raise UsageError(f"ElementwiseKernel got unexpected keywords {sorted(unknown)}")
        if kwargs.get("loop_prep") or kwargs.get("after_loop"):
            raise UsageError("ElementwiseKernel: loop_prep and after_loop are not supported by gpupool yet")
        self.name = _name(name)
        self.in_params = parse_params(in_params, what="in_params")
        self.out_params = parse_params(out_params, what="out_params")
        if not isinstance(operation, str) or not operation.strip():
            raise UsageError("ElementwiseKernel needs its operation (CUDA C++ source)")
        if any(p.raw for p in self.out_params):
            raise UsageError("ElementwiseKernel: outputs cannot be raw")
        clash = {p.name for p in self.in_params} & {p.name for p in self.out_params}
        if clash:
            raise UsageError(f"ElementwiseKernel: {sorted(clash)} named both as input and output")
        self.no_return = no_return
        self.return_tuple = return_tuple
        self.kernel = agent_pb2.Kernel(
            kind="elementwise",
            name=self.name,
            in_params=in_params,
            out_params=out_params,
            operation=operation,
            preamble=preamble,
            options=_options(kwargs.get("options", ())),
        )

    def __call__(self, *args: object, size: int | None = None, block_size: int | None = None) -> Any:
        """Run the kernel on remote arrays (and host values, scalars); returns a new remote array.

        Raises:
            UsageError: wrong argument count, outputs given (the pool makes them), ``size``, no remote
                array, arrays on workers that do not run CuPy, an output type no input decides.
            ShapeMismatch: the operands do not broadcast.
            RemoteError: an agent refused the kernel (``RemoteKernelError``: the compiler's log).
        """
        what = f"ElementwiseKernel {self.name!r}"
        if size is not None:
            raise UsageError(f"{what}: size= is not supported; pass a remote array to size the launch")
        if len(args) == len(self.in_params) + len(self.out_params) and self.out_params:
            raise UsageError(f"{what}: pass only the inputs; the pool allocates the outputs")
        if len(args) != len(self.in_params):
            raise UsageError(f"{what}: takes {len(self.in_params)} inputs, got {len(args)}")
        out = _one_output(self.out_params, kernel=what)
        lead = _lead(self.in_params, args, kernel=what)
        _check_cupy(lead.session, args, kernel=what)
        bound = _bind(self.in_params, args, kernel=what)
        dtype = _out_dtype(out, bound, kernel=what)
        shapes = [_shape_of(a) for p, a in zip(self.in_params, args, strict=True) if not p.raw]
        try:
            shape = np.broadcast_shapes(*shapes)
        except ValueError as exc:
            raise ShapeMismatch(self.name, tuple(shapes), "operands do not broadcast") from exc
        if len(shape) != lead.ndim or shape[0] != lead.shape[0]:
            raise UsageError(
                f"{what}: broadcasting would spread {lead.shape}'s rows; pool.asarray the larger operand"
            )
        whole = [p.raw for p in self.in_params]
        spec = kernel_op(self.kernel, args, lead, dtype, shape, lambda rows: (rows, *shape[1:]), whole=whole)
        result = from_spec(spec)
        if self.no_return:
            return None
        return (result,) if self.return_tuple else result


class ReductionKernel:
    """A user's reduction kernel, with CuPy's signature (``cupy.ReductionKernel``).

    Args:
        in_params: input parameters.
        out_params: the output parameter (one).
        map_expr: maps each element (``in_params`` by name) to a value of ``reduce_type``.
        reduce_expr: combines ``a`` and ``b``.
        post_map_expr: sets the output from the reduced ``a``.
        identity: the reduction's identity, as CUDA source (``"0"``); None for none.
        name: the kernel's name.
        reduce_type: the C type of ``a`` and ``b`` (``"float"``, ``"double"``, ``"T"``); default: the
            output's type. Partials travel between agents in it, so it must be one NumPy knows.
        reduce_dims: accepted for CuPy's signature.
        preamble: code before the kernel.
        options: compiler options.

    Raises:
        UsageError: malformed parameter lists, more than one output, a bad name or reduce_type.
    """

    def __init__(
        self,
        in_params: str,
        out_params: str,
        map_expr: str,
        reduce_expr: str,
        post_map_expr: str,
        identity: str | None,
        name: str = "reduce_kernel",
        reduce_type: str | None = None,
        reduce_dims: bool = True,
        preamble: str = "",
        options: Sequence[str] = (),
    ) -> None:
        self.name = _name(name)
        self.in_params = parse_params(in_params, what="in_params")
        self.out_params = parse_params(out_params, what="out_params")
        self.out = _one_output(self.out_params, kernel=f"ReductionKernel {self.name!r}")
        if any(p.raw for p in self.in_params):
            raise UsageError("ReductionKernel: raw inputs are not supported by gpupool yet")
        for label, text in (("map_expr", map_expr), ("reduce_expr", reduce_expr)):
            if not isinstance(text, str) or not text.strip():
                raise UsageError(f"ReductionKernel needs its {label}")
        if reduce_type is not None and not isinstance(reduce_type, str):
            raise UsageError(f"reduce_type must be a C type name such as 'float', not {reduce_type!r}")
        self.reduce_type = " ".join(reduce_type.split()) if reduce_type else None
        placeholder = (
            self.reduce_type is not None and len(self.reduce_type) == 1 and self.reduce_type.isalpha()
        )
        if self.reduce_type is not None and self.reduce_type not in _C_TYPES and not placeholder:
            raise UsageError(
                f"ReductionKernel: reduce_type {reduce_type!r}: partials travel between agents, so it "
                f"must be one of {', '.join(sorted(_C_TYPES))} or a placeholder such as T"
            )
        self.map_expr, self.reduce_expr = map_expr, reduce_expr
        self.post_map_expr, self.identity = post_map_expr or "", identity or ""
        self.preamble, self.options = preamble, _options(options)

    def _kernel(self, in_params: str, out_params: str, map_expr: str, post_map_expr: str) -> agent_pb2.Kernel:
        return agent_pb2.Kernel(
            kind="reduction",
            name=self.name,
            in_params=in_params,
            out_params=out_params,
            map_expr=map_expr,
            reduce_expr=self.reduce_expr,
            post_map_expr=post_map_expr,
            identity=self.identity,
            preamble=self.preamble,
            options=self.options,
        )

    def _reduce_dtype(self, bound: dict[str, np.dtype[Any]], out: np.dtype[Any], what: str) -> np.dtype[Any]:
        if self.reduce_type is None:
            return out
        if self.reduce_type in _C_TYPES:
            return np.dtype(_C_TYPES[self.reduce_type])
        if self.reduce_type not in bound:
            raise UsageError(f"{what}: no input decides reduce_type {self.reduce_type}")
        return bound[self.reduce_type]

    def __call__(
        self,
        *args: object,
        out: object = None,
        axis: int | Sequence[int] | None = None,
        keepdims: bool = False,
        stream: object = None,
    ) -> Any:
        """Reduce remote arrays: over every element (a 0-d NumPy array, computed now), or over axes other
        than the rows' (a new remote array with the rows' shards).

        Raises:
            UsageError: wrong argument count, ``out=`` or ``stream=``, an axis that includes the rows,
                arrays on workers that do not run CuPy.
            RemoteError: an agent refused the kernel.
        """
        what = f"ReductionKernel {self.name!r}"
        if out is not None or stream is not None:
            raise UsageError(f"{what}: out= and stream= are not supported; the pool allocates the result")
        if len(args) != len(self.in_params):
            raise UsageError(f"{what}: takes {len(self.in_params)} inputs, got {len(args)}")
        lead = _lead(self.in_params, args, kernel=what)
        _check_cupy(lead.session, args, kernel=what)
        bound = _bind(self.in_params, args, kernel=what)
        out_dtype = _out_dtype(self.out, bound, kernel=what)
        reduce_dtype = self._reduce_dtype(bound, out_dtype, what)
        ndim = lead.ndim
        axes = _axes(axis, ndim, what)
        # The output is computed in the reduce type (CuPy's reduce_type) and cast to the out type.
        in_params = ", ".join(_param_text(p) for p in self.in_params)
        out_params = f"{reduce_dtype.name} {self.out.name}"
        if 0 not in axes:
            shape = tuple(
                1 if i in axes else n for i, n in enumerate(lead.shape) if keepdims or i not in axes
            )
            kernel = self._kernel(in_params, out_params, self.map_expr, self.post_map_expr)
            spec = kernel_op(
                kernel,
                args,
                lead,
                out_dtype,
                shape,
                lambda rows: (rows, *shape[1:]),
                whole=[False] * len(args),
                axes=axes,
                keepdims=keepdims,
            )
            return from_spec(spec)
        if axes != tuple(range(ndim)):
            raise UsageError(
                f"{what}: axis {axis} reduces the sharded rows with other axes; reduce over every axis "
                "(axis=None) or over axes other than 0"
            )
        partial = "_gpupool_partial"
        phase1 = self._kernel(in_params, f"{reduce_dtype.name} {partial}", self.map_expr, f"{partial} = a")
        shard = (1,) * ndim
        spec = kernel_op(
            phase1,
            args,
            lead,
            reduce_dtype,
            (len(lead.layout), *shard[1:]),
            lambda rows: shard,
            whole=[False] * len(args),
            keepdims=True,
            one_row_each=True,
        )
        partials = from_spec(spec).get().reshape(-1)
        phase2 = self._kernel(f"{reduce_dtype.name} {partial}", out_params, partial, self.post_map_expr)
        value = _combine(lead.session, lead.layout[0], phase2, partials, reduce_dtype)
        result = np.asarray(value.astype(out_dtype, copy=False))
        return result.reshape((1,) * ndim) if keepdims else result.reshape(())


def _axes(axis: int | Sequence[int] | None, ndim: int, what: str) -> tuple[int, ...]:
    """``axis`` as sorted non-negative axes (None: all of them)."""
    if axis is None:
        return tuple(range(ndim))
    given = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    for a in given:
        if not isinstance(a, int | np.integer) or not -ndim <= a < ndim:
            raise UsageError(f"{what}: axis {a!r} is out of range for {ndim} dimensions")
    return tuple(sorted({int(a) % ndim for a in given}))


def _param_text(param: Param) -> str:
    kind = param.dtype.name if param.dtype is not None else param.placeholder
    return f"{'raw ' if param.raw else ''}{kind} {param.name}"


def _combine(
    session: Session, piece: Piece, kernel: agent_pb2.Kernel, partials: np.ndarray, dtype: np.dtype[Any]
) -> np.ndarray:
    """The partials reduced by ``kernel`` in one launch on ``piece``'s worker (sent inline), fetched."""
    out = session.new_buffer_id()
    op = make_op("kernel", [constant_operand(np.ascontiguousarray(partials, dtype))], out, dtype, ())
    op.kernel.CopyFrom(kernel)
    program = Program(piece, ops=[op], fetch=[out], free=[out])
    fetched = run_programs(session, [program], what=f"kernel {kernel.name}")
    return np.asarray(fetched[0][out])


class RawKernel:
    """A user's CUDA kernel from source, with CuPy's signature (``cupy.RawKernel``).

    Args:
        code: the CUDA C++ source, with the ``extern "C" __global__`` function ``name``.
        name: the function to launch.
        options: compiler options (an allow-list on the agents).
        backend: ``"nvrtc"`` only.
        translate_cucomplex, enable_cooperative_groups, jitify: CuPy's; only their defaults are supported.

    Raises:
        UsageError: no code, a bad name, another compiler backend or CuPy feature.
    """

    def __init__(
        self,
        code: str,
        name: str,
        options: Sequence[str] = (),
        backend: str = "nvrtc",
        translate_cucomplex: bool = False,
        *,
        enable_cooperative_groups: bool = False,
        jitify: bool = False,
    ) -> None:
        if not isinstance(code, str) or not code.strip():
            raise UsageError("RawKernel needs its CUDA source")
        if backend != "nvrtc" or translate_cucomplex or enable_cooperative_groups or jitify:
            raise UsageError(
                "RawKernel: only backend='nvrtc' without translate_cucomplex, cooperative groups or jitify "
                "is supported by gpupool"
            )
        self.name = _name(name)
        self.code = code
        self.options = _options(options)

    def __call__(
        self,
        grid: int | Sequence[int] | None,
        block: int | Sequence[int] | None,
        args: Sequence[object],
        *,
        shared_mem: int = 0,
        shape: Sequence[int] | None = None,
        dtype: object = None,
    ) -> RemoteArray:
        """Launch on each shard: the kernel's parameters are ``args``, then the output (a new remote array
        of ``shape`` and ``dtype``, default the first array argument's, zero-filled before the launch),
        which is returned. ``grid`` and ``block`` apply to each shard's launch; both None: one thread per
        element of the shard's output, in blocks of 128.

        Raises:
            UsageError: no remote array among ``args``, grid or block of more than 3 dims or given alone,
                an output whose rows differ from the lead's, arrays on workers that do not run CuPy.
            RemoteError: an agent refused the kernel (``RemoteKernelError``: the compiler's log).
        """
        what = f"RawKernel {self.name!r}"
        if not isinstance(args, tuple | list):
            raise UsageError(f"{what}: args must be a tuple of arguments, as CuPy's")
        dims = [_dims(grid, "grid", what), _dims(block, "block", what)]
        if bool(dims[0]) != bool(dims[1]):
            raise UsageError(f"{what}: give grid and block together, or neither")
        remotes = [a for a in args if isinstance(a, RemoteArray)]
        if not remotes:
            raise UsageError(
                f"{what}: needs a remote array among its arguments (pool.asarray(..., backend='cupy'))"
            )
        lead = next((a for a in remotes if a.ndim > 0), None)
        if lead is None:
            raise UsageError(f"{what}: the remote arguments are 0-d; nothing to shard")
        _check_cupy(lead.session, args, kernel=what)
        out_shape = tuple(int(n) for n in shape) if shape is not None else lead.shape
        out_dtype = np.dtype(dtype) if dtype is not None else lead.dtype  # type: ignore[call-overload]
        if not out_shape or out_shape[0] != lead.shape[0]:
            raise UsageError(
                f"{what}: the output's shape {out_shape} must have the lead's {lead.shape[0]} rows"
            )
        if not 0 <= shared_mem <= 256 * 1024:
            raise UsageError(f"{what}: shared_mem {shared_mem} out of range")
        rest = out_shape[1:]
        kernel = agent_pb2.Kernel(
            kind="raw",
            name=self.name,
            code=self.code,
            options=self.options,
            grid=dims[0],
            block=dims[1],
            shared_mem=shared_mem,
        )
        values = [_ShardSizeOperand(a, rest) if isinstance(a, ShardSize) else a for a in args]
        spec = kernel_op(
            kernel,
            values,
            lead,
            out_dtype,
            out_shape,
            lambda rows: (rows, *rest),
            whole=[
                not (isinstance(a, RemoteArray) and a.ndim > 0 and a.shape[0] == lead.shape[0])
                for a in values
            ],
        )
        return from_spec(spec)


class _ShardSizeOperand:
    """A :class:`ShardSize` bound to an output's trailing shape: the operand for each shard."""

    def __init__(self, size: ShardSize, rest: tuple[int, ...]) -> None:
        self.size, self.rest = size, rest

    def __call__(self, piece: Piece) -> agent_pb2.Operand:
        count = (piece.stop - piece.start) * math.prod(self.rest)
        return scalar_operand(self.size.dtype.type(count))


def _dims(value: int | Sequence[int] | None, what: str, kernel: str) -> list[int]:
    if value is None:
        return []
    dims = [value] if isinstance(value, int) else list(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int | np.integer) and d >= 1 for d in dims):
        raise UsageError(f"{kernel}: {what} must be one to three positive integers, not {value!r}")
    return [int(d) for d in dims]
