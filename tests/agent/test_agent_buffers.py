"""Buffer registry: ids, owners, memory against the limit, reservations."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpupool.agent.buffers import BufferRegistry
from gpupool.protocol.errors import RpcRefusal


def kind_of(call: object) -> str:
    assert callable(call)
    with pytest.raises(RpcRefusal) as caught:
        call()
    return caught.value.kind


def test_reserve_commit_free_accounts_memory() -> None:
    registry = BufferRegistry([1000, 500])
    reservation = registry.reserve(worker=0, buffer_id="s.1", nbytes=800, session="s")
    assert registry.usage(0).reserved == 800
    buffer = registry.commit(reservation, np.zeros(100))
    assert buffer.nbytes == 800
    assert buffer.shape == (100,)
    assert buffer.dtype == np.float64
    usage = registry.usage(0)
    assert (usage.used, usage.reserved, usage.buffers, usage.limit) == (800, 0, 1, 1000)
    assert registry.get("s.1").array is buffer.array
    assert registry.free(["s.1", "unknown"]) == (1, 800)
    assert registry.usage(0).used == 0
    assert len(registry) == 0


def test_limit_counts_reservations() -> None:
    registry = BufferRegistry([1000])
    registry.reserve(worker=0, buffer_id="a", nbytes=600, session="")
    with pytest.raises(RpcRefusal) as caught:
        registry.reserve(worker=0, buffer_id="b", nbytes=600, session="")
    assert caught.value.kind == "out-of-memory"
    assert caught.value.extra == {"needed": "600", "available": "400"}
    registry.reserve(worker=0, buffer_id="c", nbytes=400, session="")


def test_ids_are_unique_while_reserved_or_resident() -> None:
    registry = BufferRegistry([1000])
    reservation = registry.reserve(worker=0, buffer_id="a", nbytes=8, session="")
    assert kind_of(lambda: registry.reserve(worker=0, buffer_id="a", nbytes=8, session="")) == "buffer-exists"
    registry.release(reservation)
    registry.release(reservation)  # twice is harmless
    assert registry.usage(0).reserved == 0
    registry.commit(registry.reserve(worker=0, buffer_id="a", nbytes=8, session=""), np.zeros(1))
    assert kind_of(lambda: registry.reserve(worker=0, buffer_id="a", nbytes=8, session="")) == "buffer-exists"


def test_unknown_worker_empty_id_and_missing_buffer() -> None:
    registry = BufferRegistry([1000])
    assert kind_of(lambda: registry.reserve(worker=1, buffer_id="a", nbytes=8, session="")) == "not-accepting"
    assert kind_of(lambda: registry.reserve(worker=0, buffer_id="", nbytes=8, session="")) == "bad-request"
    assert kind_of(lambda: registry.get("nope")) == "buffer-not-found"


def test_buffer_on_another_worker_is_not_found() -> None:
    registry = BufferRegistry([1000, 1000])
    registry.commit(registry.reserve(worker=1, buffer_id="a", nbytes=8, session=""), np.zeros(1))
    assert registry.get("a", worker=1).worker == 1
    assert kind_of(lambda: registry.get("a", worker=0)) == "buffer-not-found"


def test_free_by_session() -> None:
    registry = BufferRegistry([1000, 1000])
    for worker, buffer_id, session in [(0, "a", "s1"), (1, "b", "s1"), (0, "c", "s2")]:
        registry.commit(
            registry.reserve(worker=worker, buffer_id=buffer_id, nbytes=8, session=session), np.zeros(1)
        )
    assert registry.free_session("s1") == (2, 16)
    assert registry.contains("c")
    assert not registry.contains("a")
    assert registry.usage(1).buffers == 0


def test_commit_all_is_skipped_once_cancelled() -> None:
    registry = BufferRegistry([1000])
    first = registry.reserve(worker=0, buffer_id="a", nbytes=8, session="")
    second = registry.reserve(worker=0, buffer_id="b", nbytes=8, session="")
    cancelled = threading.Event()
    cancelled.set()
    assert registry.commit_all([(first, np.zeros(1)), (second, np.zeros(1))], unless=cancelled) == []
    registry.release(first)
    registry.release(second)
    assert len(registry) == 0
    assert registry.usage(0).reserved == 0
    with pytest.raises(RuntimeError):
        registry.commit(first, np.zeros(1))
