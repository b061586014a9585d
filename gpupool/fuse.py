"""``@gp.fuse``: a function of elementwise ops, run as one program per shard (CuPy's ``cupy.fuse``).

gpupool already defers elementwise ops and runs each chain as one program per shard when a result is
needed; ``@gp.fuse`` makes that explicit at the function's edge: the call records the function's ops on its
remote arguments and computes every remote array it returns together, in one round of programs. On a CuPy
agent started with ``--fuse-kernels`` the chain becomes one generated kernel (``gpupool/agent/cufuse.py``);
on NumPy agents it runs in cache-sized blocks. Called with host arrays or scalars only, the function runs
here, on NumPy (as ``cupy.fuse`` runs a fused function on NumPy inputs); inside a traced task it is traced
like any other code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

from gpupool.client.array import RemoteArray, persist

__all__ = ["fuse"]

F = TypeVar("F", bound=Callable[..., Any])


@overload
def fuse(function: F) -> F: ...


@overload
def fuse(function: None = None) -> Callable[[F], F]: ...


def fuse(function: Callable[..., Any] | None = None) -> Any:
    """Decorate a function of elementwise ops so that a call computes its remote results in one round.

    Usable as ``@gp.fuse`` or ``@gp.fuse()``. The results may be one array, or a tuple, list or dict of them
    (any nesting); remote ones come back computed and resident, as after :func:`gpupool.persist`.

    Raises (at the call):
        RemoteError: an agent refused a program (nothing of that round is kept).
    """

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def fused(*args: Any, **kwargs: Any) -> Any:
            result = body(*args, **kwargs)
            pending = [item for item in _leaves(result) if isinstance(item, RemoteArray)]
            if pending:
                persist(*pending)
            return result

        fused.__wrapped__ = body
        return fused

    return wrap(function) if function is not None else wrap


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value
