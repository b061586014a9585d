"""Reprs show layout and placement at a glance (pure functions, then a real pool's arrays and pool)."""

from __future__ import annotations

import numpy as np

import gpupool as gp
from gpupool.client.layout import Piece
from gpupool.client.reprs import array_html, array_repr, size_text


def piece(agent: str, start: int, stop: int, worker: int = 0) -> Piece:
    return Piece(agent_id=agent, endpoint="127.0.0.1:1", worker=worker, start=start, stop=stop, buffer_id="b")


def test_sizes_read_in_binary_units() -> None:
    assert [size_text(n) for n in (0, 1023, 1024, 3 << 20, 5 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "3.0 MiB",
        "5.0 TiB",
    ]


def test_a_few_shards_are_listed_with_their_rows() -> None:
    pieces = [piece("3f2a1b0c9d8e", 0, 600), piece("9c81d07e5a4b", 600, 1000, worker=1)]
    text = array_repr((1000, 8), np.dtype(np.float32), pieces, freed=False, pending_op="tanh")
    assert text == (
        "<gpupool.RemoteArray shape=(1000, 8) dtype=float32 31.2 KiB, pending tanh; "
        "2 shards on 2 agents: 3f2a1b0c rows 0:600, 9c81d07e/1 rows 600:1000>"
    )


def test_many_shards_are_counted_per_agent() -> None:
    pieces = [piece("aaaaaaaaaaaa" if i % 3 else "bbbbbbbbbbbb", 10 * i, 10 * i + 10) for i in range(9)]
    text = array_repr((90,), np.dtype(np.int64), pieces, freed=False, pending_op=None)
    assert text.endswith("resident; 9 shards on 2 agents: rows 10 each; aaaaaaaa: 6, bbbbbbbb: 3>")
    html = array_html((90,), np.dtype(np.int64), pieces, freed=True, pending_op=None)
    assert html.count("<tr>") == 10
    assert "freed" in html


def test_real_arrays_and_pools_show_where_they_are(pool: gp.Pool) -> None:
    x = pool.asarray(np.zeros((64, 4), np.float32), rows=[40, 24])
    agents = sorted({s.agent_id for s in x.shards})
    assert repr(x).startswith("<gpupool.RemoteArray shape=(64, 4) dtype=float32 1.0 KiB, resident; 2 shards")
    assert all(agent[:8] in repr(x) for agent in agents)
    assert "pending exp" in repr(np.exp(x))
    assert f"using {len(agents)} agent" in repr(pool)
    assert all(agent[:8] in repr(pool) for agent in agents)
