"""New homes for a drained agent's buffers (gpupool.homes): pure, no network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpupool.homes import Room, plan_homes


def test_largest_first_each_to_the_worker_with_most_room() -> None:
    rooms = [Room(free=100), Room(free=60)]
    assert plan_homes([50, 40, 30], ["", "", ""], rooms) == [0, 1, 0]


def test_a_buffer_no_worker_can_hold_stays_and_the_rest_still_move() -> None:
    assert plan_homes([500, 10], ["", ""], [Room(free=100)]) == [None, 0]
    assert plan_homes([10], [""], []) == [None]


def test_the_buffer_s_own_backend_first_then_any() -> None:
    rooms = [Room(free=1000, backend="numpy"), Room(free=100, backend="cupy")]
    assert plan_homes([80, 80], ["cupy", "cupy"], rooms) == [1, 0]  # the GPU while it has room


def test_workers_that_refused_a_buffer_are_avoided() -> None:
    rooms = [Room(free=100), Room(free=50)]
    assert plan_homes([10], [""], rooms, avoid={0: {0}}) == [1]
    assert plan_homes([10], [""], rooms, avoid={0: {0, 1}}) == [None]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="2 sizes but 1 backends"):
        plan_homes([1, 2], [""], [Room(free=10)])
    with pytest.raises(ValueError, match="negative size"):
        plan_homes([-1], [""], [Room(free=10)])


@given(
    st.lists(st.integers(0, 1000), max_size=30),
    st.lists(st.integers(-100, 3000), max_size=6),
)
def test_no_worker_takes_more_than_its_room_and_a_homeless_buffer_fits_nowhere(
    sizes: list[int], frees: list[int]
) -> None:
    rooms = [Room(free=free) for free in frees]
    homes = plan_homes(sizes, [""] * len(sizes), rooms)
    taken = [0] * len(rooms)
    for size, home in zip(sizes, homes, strict=True):
        if home is not None:
            taken[home] += size
    assert all(taken[w] <= max(frees[w], 0) for w in range(len(rooms)))
    left = [max(frees[w], 0) - taken[w] for w in range(len(rooms))]
    for size, home in zip(sizes, homes, strict=True):
        if home is None:
            assert all(room < size for room in left)


def test_a_sessions_buffers_on_one_worker_move_together_or_not_at_all() -> None:
    rooms = [Room(free=100), Room(free=90)]
    # Group "a" (60 + 30) fits only the first worker whole; "b" (50) then goes to the second.
    homes = plan_homes([60, 30, 50], ["", "", ""], rooms, groups=["a", "a", "b"])
    assert homes == [0, 0, 1]
    # A group no worker can hold whole stays, however its buffers would fit apart.
    assert plan_homes([60, 60], ["", ""], rooms, groups=["a", "a"]) == [None, None]
    # Where the group went before wins if it has room.
    assert plan_homes([10], [""], rooms, groups=["a"], prefer={"a": 1}) == [1]
    # A buffer refused by a worker keeps its whole group off it.
    assert plan_homes([10, 10], ["", ""], rooms, groups=["a", "a"], avoid={1: {0}}) == [1, 1]
