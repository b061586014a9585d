"""The row-move planner (gpupool.moves): pure, no network."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpupool._errors import PlacementError
from gpupool.moves import Segment, Span, moved_rows, plan_moves

AGENTS = ("a", "b", "c")


def spans(counts: list[int], agents: list[str]) -> list[Span]:
    out, start = [], 0
    for count, agent in zip(counts, agents, strict=True):
        out.append(Span(agent_id=agent, start=start, stop=start + count))
        start += count
    return out


@st.composite
def layouts(draw: st.DrawFn, rows: int) -> list[Span]:
    """A layout of ``rows`` rows: 1-5 spans, some possibly empty, on random agents."""
    cuts = sorted(draw(st.lists(st.integers(0, rows), min_size=0, max_size=4)))
    bounds = [0, *cuts, rows]
    counts = [b - a for a, b in itertools.pairwise(bounds)]
    agents = draw(st.lists(st.sampled_from(AGENTS), min_size=len(counts), max_size=len(counts)))
    return spans(counts, agents)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[list[Span], list[Span]]:
    rows = draw(st.integers(0, 40))
    return draw(layouts(rows)), draw(layouts(rows))


@given(pairs())
def test_every_target_row_comes_from_exactly_one_source_row(pair: tuple[list[Span], list[Span]]) -> None:
    source, target = pair
    segments = plan_moves(source, target)
    filled: dict[int, int] = {}
    for segment in segments:
        span, origin = target[segment.target], source[segment.source]
        assert span.start <= segment.start < segment.stop <= span.stop
        assert origin.start <= segment.start
        assert segment.stop <= origin.stop
        for row in range(segment.start, segment.stop):
            assert row not in filled, f"row {row} filled twice"
            filled[row] = segment.source
    assert sorted(filled) == list(range(target[-1].stop if target else 0))


@given(pairs())
def test_nothing_that_stays_is_moved(pair: tuple[list[Span], list[Span]]) -> None:
    source, target = pair
    segments = plan_moves(source, target)
    for segment in segments:
        same_agent = source[segment.source].agent_id == target[segment.target].agent_id
        assert segment.moved is not same_agent
    # the rows moved are exactly those whose agent changes
    stays = sum(
        max(0, min(s.stop, t.stop) - max(s.start, t.start))
        for s in source
        for t in target
        if s.agent_id == t.agent_id
    )
    assert moved_rows(segments) == (source[-1].stop if source else 0) - stays


@given(pairs())
def test_segments_are_in_target_then_row_order(pair: tuple[list[Span], list[Span]]) -> None:
    source, target = pair
    segments = plan_moves(source, target)
    keys = [(s.target, s.start) for s in segments]
    assert keys == sorted(keys)
    assert all(s.rows > 0 for s in segments)


def test_same_layout_moves_nothing() -> None:
    layout = spans([3, 0, 4], ["a", "b", "a"])
    assert moved_rows(plan_moves(layout, layout)) == 0


def test_a_split_across_two_sources() -> None:
    source = spans([4, 4], ["a", "b"])
    target = spans([2, 6], ["b", "a"])
    assert plan_moves(source, target) == [
        Segment(target=0, source=0, start=0, stop=2, moved=True),
        Segment(target=1, source=0, start=2, stop=4, moved=False),
        Segment(target=1, source=1, start=4, stop=8, moved=True),
    ]


def test_layouts_of_different_rows_are_refused() -> None:
    with pytest.raises(PlacementError, match="cover 3 rows"):
        plan_moves(spans([4], ["a"]), spans([3], ["a"]))
    with pytest.raises(PlacementError, match="expected to start at 2"):
        plan_moves(
            spans([4], ["a"]), [Span(agent_id="a", start=0, stop=2), Span(agent_id="a", start=3, stop=4)]
        )
