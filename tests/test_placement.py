"""Row placement: exact splits for chosen cases, and invariants over many random ones."""

from __future__ import annotations

import itertools
import random

import pytest

from gpupool._errors import NoCapacity, PlacementError
from gpupool.placement import RowShard, WorkerCapacity, place_rows, split_rows


def workers(*free: int) -> list[WorkerCapacity]:
    """Workers on agents named a, b, c, ... with the given free bytes."""
    return [WorkerCapacity(chr(ord("a") + i), f"127.0.0.1:{5000 + i}", 0, f) for i, f in enumerate(free)]


def split(shards: list[RowShard]) -> list[tuple[str, int, int]]:
    return [(s.agent_id, s.start, s.stop) for s in shards]


def test_equal_workers_split_evenly_with_the_remainder_on_the_first():
    assert split(place_rows(10, 1, workers(1000, 1000, 1000))) == [("a", 0, 4), ("b", 4, 7), ("c", 7, 10)]


def test_split_is_proportional_to_free_memory():
    assert split(place_rows(8, 4, workers(3000, 1000))) == [("a", 0, 6), ("b", 6, 8)]


def test_largest_remainder_gets_the_leftover_row():
    # Shares 3.5, 2.1 and 1.4: floors 3, 2, 1; the one leftover row goes to the largest remainder (a).
    assert split(place_rows(7, 1, workers(500, 300, 200))) == [("a", 0, 4), ("b", 4, 6), ("c", 6, 7)]


def test_fewer_rows_than_workers_go_one_each_to_the_most_free():
    assert split(place_rows(2, 8, workers(100, 300, 200))) == [("b", 0, 1), ("c", 1, 2)]


def test_zero_rows_give_one_empty_shard_on_the_most_free():
    assert split(place_rows(0, 8, workers(100, 300, 200))) == [("b", 0, 0)]


def test_a_full_worker_passes_its_leftover_row_on():
    # Rows of 3 bytes; shares 1.36, 1.36 and 3.27. a and b have the largest remainders but hold one row
    # each, so the leftover row goes to c.
    assert split(place_rows(6, 3, workers(5, 5, 12))) == [("a", 0, 1), ("b", 1, 2), ("c", 2, 6)]


def test_rows_clipped_by_capacity_go_to_the_roomiest_worker():
    # Rows of 24 bytes fill every worker exactly; proportional shares overshoot the small ones, whose
    # rows all end up on c, the only one with room.
    shards = place_rows(10, 24, workers(40, 42, 145, 38, 32))
    assert split(shards) == [("a", 0, 1), ("b", 1, 2), ("c", 2, 8), ("d", 8, 9), ("e", 9, 10)]


def test_a_worker_too_small_for_one_row_gets_none():
    assert split(place_rows(5, 4, workers(9, 3, 4, 0, 8))) == [("a", 0, 2), ("c", 2, 3), ("e", 3, 5)]


def test_same_inputs_in_any_order_give_the_same_split():
    pool = workers(700, 100, 300, 900, 250)
    expected = place_rows(701, 3, pool)
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(pool)
        assert place_rows(701, 3, pool) == expected


def test_workers_of_one_agent_are_laid_out_by_index():
    pool = [WorkerCapacity("x", "h:1", 1, 100), WorkerCapacity("x", "h:1", 0, 100)]
    assert [(s.worker, s.start, s.stop) for s in place_rows(4, 1, pool)] == [(0, 0, 2), (1, 2, 4)]


def test_negative_free_memory_counts_as_none():
    assert split(place_rows(4, 1, workers(-50, 100))) == [("b", 0, 4)]


def test_zero_byte_rows_fit_anywhere():
    assert split(place_rows(6, 0, workers(0, 0))) == [("a", 0, 3), ("b", 3, 6)]
    assert split(place_rows(6, 0, workers(100, 200))) == [("a", 0, 2), ("b", 2, 6)]


def test_no_capacity_names_what_was_needed_and_what_was_free():
    with pytest.raises(NoCapacity) as caught:
        place_rows(10, 100, workers(300, 400))
    assert (caught.value.needed, caught.value.available, caught.value.ready_workers) == (1000, 700, 2)
    assert "need 1000 bytes" in str(caught.value)


def test_no_capacity_when_rows_do_not_divide_into_the_free_memory():
    # 300 bytes free in all, but neither worker holds two rows of 100.
    with pytest.raises(NoCapacity) as caught:
        place_rows(3, 100, workers(150, 150))
    assert (caught.value.needed, caught.value.available) == (300, 300)


def test_no_workers_is_a_placement_error():
    with pytest.raises(PlacementError, match="no ready workers"):
        place_rows(4, 4, [])


def test_bad_requests_are_placement_errors():
    with pytest.raises(PlacementError):
        place_rows(-1, 4, workers(100))
    with pytest.raises(PlacementError):
        place_rows(1, -4, workers(100))
    with pytest.raises(PlacementError, match="twice"):
        place_rows(1, 4, [WorkerCapacity("a", "h:1", 0, 100), WorkerCapacity("a", "h:2", 0, 50)])


def test_random_placements_are_contiguous_complete_and_within_capacity():
    rng = random.Random(20261126)
    for case in range(3000):
        n = rng.randint(1, 8)
        pool = [
            WorkerCapacity(f"agent-{rng.randint(0, 3)}", "h:1", i, rng.choice([0, rng.randint(-50, 10_000)]))
            for i in range(n)
        ]
        rows = rng.choice([0, 1, rng.randint(0, 20), rng.randint(0, 5000)])
        row_bytes = rng.choice([0, 1, rng.randint(1, 64)])
        capacity = {
            (w.agent_id, w.worker): max(w.free_bytes, 0) // row_bytes if row_bytes else rows for w in pool
        }
        if sum(capacity.values()) < rows:
            with pytest.raises(NoCapacity):
                place_rows(rows, row_bytes, pool)
            continue
        shards = place_rows(rows, row_bytes, pool)
        assert shards, case
        assert shards[0].start == 0, case
        assert shards[-1].stop == rows, case
        assert all(a.stop == b.start for a, b in itertools.pairwise(shards)), case
        assert all(s.rows > 0 for s in shards) or rows == 0, case
        assert all(s.rows <= capacity[(s.agent_id, s.worker)] for s in shards), case
        assert len({(s.agent_id, s.worker) for s in shards}) == len(shards), case
        assert place_rows(rows, row_bytes, list(reversed(pool))) == shards, case
        # Where no worker is filled to capacity, every share is its exact proportion rounded up or down.
        usable = [w for w in pool if capacity[(w.agent_id, w.worker)] > 0]
        total = sum(max(w.free_bytes, 0) for w in usable)
        got = {(s.agent_id, s.worker): s.rows for s in shards}
        if rows >= len(usable) and total > 0 and all(c < capacity[k] for k, c in got.items()):
            for w in usable:
                ideal = rows * max(w.free_bytes, 0) / total
                assert abs(got.get((w.agent_id, w.worker), 0) - ideal) < 1, case


def test_split_rows_is_place_rows_on_workers_in_layout_order():
    rng = random.Random(1126)
    for case in range(2000):
        pool = sorted({(f"agent-{rng.randint(0, 9)}", rng.randint(0, 2)) for _ in range(rng.randint(1, 12))})
        workers = [WorkerCapacity(a, "h:1", w, rng.choice([0, -5, rng.randint(0, 5000)])) for a, w in pool]
        rows = rng.choice([0, 1, rng.randint(0, 20), rng.randint(0, 3000)])
        row_bytes = rng.choice([0, 1, rng.randint(1, 16)])
        free = [w.free_bytes for w in workers]
        try:
            shards = place_rows(rows, row_bytes, workers)
        except NoCapacity:
            with pytest.raises(NoCapacity):
                split_rows(rows, row_bytes, free)
            continue
        position = {(w.agent_id, w.worker): i for i, w in enumerate(workers)}
        expected = [(position[(s.agent_id, s.worker)], s.start, s.stop) for s in shards]
        assert split_rows(rows, row_bytes, free) == expected, case


def test_split_rows_refuses_what_place_rows_refuses():
    with pytest.raises(PlacementError, match="no ready workers"):
        split_rows(4, 4, [])
    with pytest.raises(PlacementError):
        split_rows(-1, 4, [100])
    with pytest.raises(NoCapacity):
        split_rows(3, 100, [150, 150])


def test_small_arrays_use_few_workers_with_a_minimum_shard_size() -> None:
    mib = 1 << 20
    # 4 KB: one worker (the one with most room), not two
    assert split_rows(1000, 4, [100 * mib, 200 * mib], min_shard_bytes=mib) == [(1, 0, 1000)]
    # 256 MiB over two workers: both, as without the minimum
    assert split_rows(64 << 20, 4, [mib << 10] * 2, min_shard_bytes=mib) == split_rows(
        64 << 20, 4, [mib << 10] * 2
    )
    # 3 MiB over 8 workers: three shards
    assert len(split_rows(3 * mib // 8, 8, [mib << 10] * 8, min_shard_bytes=mib)) == 3
    # more workers than the minimum asks for when the roomiest cannot hold it
    assert [p for p, _, _ in split_rows(1000, 4, [2000, 2500, 100], min_shard_bytes=mib)] == [0, 1]
    # zero turns the policy off
    assert len(split_rows(1000, 4, [mib, mib], min_shard_bytes=0)) == 2


# -- placement by measured speed (synthetic fleets) -------------------------------------------------------


def test_one_fast_and_three_slow_share_rows_by_speed() -> None:
    free = [1 << 30] * 4
    got = split_rows(1000, 4, free, speed=[400.0, 100.0, 100.0, 100.0])
    assert [stop - start for _, start, stop in got] == [571, 143, 143, 143]


def test_a_fast_worker_short_of_memory_keeps_what_fits_and_the_rest_goes_by_speed() -> None:
    # Memory-bound: the fast worker could take 80% of the rows by speed but holds only 100 of them.
    got = split_rows(1000, 4, [400, 1 << 30, 1 << 30], speed=[800.0, 100.0, 100.0])
    counts = [stop - start for _, start, stop in got]
    assert counts[0] == 100
    assert sum(counts) == 1000
    assert abs(counts[1] - counts[2]) <= 1


def test_an_unmeasured_worker_makes_free_memory_decide_for_all() -> None:
    by_memory = split_rows(8, 4, [3000, 1000])
    assert split_rows(8, 4, [3000, 1000], speed=[10.0, 0.0]) == by_memory
    assert split_rows(8, 4, [3000, 1000], speed=[10.0, 30.0]) == [(0, 0, 2), (1, 2, 8)]


def test_a_minimum_shard_size_picks_the_fastest_workers() -> None:
    got = split_rows(4, 1 << 20, [1 << 30] * 4, min_shard_bytes=2 << 20, speed=[1.0, 5.0, 2.0, 9.0])
    assert [position for position, _, _ in got] == [1, 3]


def test_speeds_must_match_the_workers() -> None:
    with pytest.raises(PlacementError, match="speeds"):
        split_rows(10, 1, [100, 100], speed=[1.0])


def test_a_thousand_agents_of_mixed_speeds_get_rows_in_proportion_within_memory() -> None:
    rng = random.Random(9)
    speed = [rng.choice([50.0, 100.0, 400.0]) for _ in range(1000)]
    free = [rng.choice([1 << 20, 1 << 30]) for _ in range(1000)]
    rows, row_bytes = 1_000_000, 1024
    got = split_rows(rows, row_bytes, free, speed=speed)
    counts = {position: stop - start for position, start, stop in got}
    assert sum(counts.values()) == rows
    assert all(counts[p] * row_bytes <= free[p] for p in counts)
    # Workers with room to spare hold rows in proportion to their speed (within one row).
    roomy = [p for p in counts if free[p] == 1 << 30]
    per_gflop = {round(counts[p] / speed[p]) for p in roomy}
    assert max(per_gflop) - min(per_gflop) <= 1, per_gflop


def test_speeds_within_the_tolerance_count_as_one_speed() -> None:
    # Two like cards measured 12% apart while they shared a host's cores: an even split, not 47/53.
    assert split_rows(1000, 4, [1 << 30, 1 << 30], speed=[99.0, 87.0]) == [(0, 0, 500), (1, 500, 1000)]
    # Groups form from the slowest up: 100 and 120 together, 400 apart.
    got = split_rows(1000, 4, [1 << 30] * 3, speed=[100.0, 120.0, 400.0])
    counts = [stop - start for _, start, stop in got]
    assert abs(counts[0] - counts[1]) <= 1
    assert counts[2] > 3 * counts[0]
