"""How arrays and pools show themselves: layout and placement at a glance, as Dask's reprs do.

Pure functions of what the client already knows (shape, dtype, pieces, the pending op): a repr never calls
the pool. :func:`array_repr` is the one-line text form; :func:`array_html` the table notebooks show.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from gpupool.client.layout import Piece

__all__ = ["array_html", "array_repr", "size_text"]

#: Shards listed one by one up to this many; beyond it, counted per agent.
_LISTED: Final = 4
_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")


def size_text(nbytes: int) -> str:
    """``nbytes`` in binary units: ``"195.3 MiB"``."""
    value, unit = float(nbytes), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def _sizes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[int, int]:
    """Bytes of one row (axis 0) and of the whole array."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    return row_bytes, row_bytes * (shape[0] if shape else 1)


def _agent(piece: Piece) -> str:
    return piece.agent_id[:8] + (f"/{piece.worker}" if piece.worker else "")


def _state(freed: bool, pending_op: str | None) -> str:
    if freed:
        return "freed"
    return f"pending {pending_op}" if pending_op else "resident"


def array_repr(
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    pieces: Sequence[Piece],
    *,
    freed: bool,
    pending_op: str | None,
) -> str:
    """One line: shape, dtype, size, state, and where the rows are (each shard's agent and rows, or the
    shards per agent when there are many)."""
    _, nbytes = _sizes(shape, dtype)
    state = _state(freed, pending_op)
    head = f"<gpupool.RemoteArray shape={shape} dtype={dtype.name} {size_text(nbytes)}, {state}"
    agents = Counter(p.agent_id for p in pieces)
    if len(pieces) <= _LISTED:
        where = ", ".join(f"{_agent(p)} rows {p.start}:{p.stop}" for p in pieces)
    else:
        counts = Counter(p.stop - p.start for p in pieces)
        rows = "rows " + "/".join(str(c) for c in sorted(counts)) + " each"
        per_agent = ", ".join(f"{agent[:8]}: {n}" for agent, n in agents.most_common(_LISTED))
        more = ", ..." if len(agents) > _LISTED else ""
        where = f"{rows}; {per_agent}{more}"
    shards = f"{len(pieces)} shard{'s' * (len(pieces) != 1)} on {len(agents)} agent{'s' * (len(agents) != 1)}"
    return f"{head}; {shards}: {where}>"


def array_html(
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    pieces: Sequence[Piece],
    *,
    freed: bool,
    pending_op: str | None,
) -> str:
    """A notebook's table: the array's summary, then one row per shard (agent, worker, rows, bytes)."""
    row_bytes, nbytes = _sizes(shape, dtype)
    cells = "".join(
        f"<tr><td>{index}</td><td>{html.escape(p.agent_id)}</td><td>{html.escape(p.endpoint)}</td>"
        f"<td>{p.worker}</td><td>{p.start}:{p.stop}</td>"
        f"<td>{size_text(row_bytes * (p.stop - p.start))}</td></tr>"
        for index, p in enumerate(pieces)
    )
    return (
        f"<p><b>gpupool.RemoteArray</b> shape={shape} dtype={dtype.name} {size_text(nbytes)}, "
        f"{html.escape(_state(freed, pending_op))}</p>"
        "<table><tr><th>shard</th><th>agent</th><th>endpoint</th><th>worker</th><th>rows</th><th>bytes</th></tr>"
        f"{cells}</table>"
    )
