"""The current pool, as CuPy's current device: ``with pool:``, ``pool.use()``, and the default pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

import gpupool as gp
from gpupool.client import pool as pool_module
from gpupool.client.current import close_default_pool
from gpupool.client.pool import active_pool
from gpupool.local import LocalPool


@pytest.fixture(autouse=True)
def no_current_pool() -> Iterator[None]:
    """Each test starts, and leaves, with no current pool and no default pool."""
    token = pool_module._CURRENT.set(())
    try:
        yield
    finally:
        pool_module._CURRENT.reset(token)
        close_default_pool()


def test_a_with_block_makes_the_pool_current_and_nested_blocks_restore_the_outer(
    local_pool: LocalPool,
) -> None:
    assert active_pool() is None
    with local_pool.connect() as outer:
        assert gp.current_pool() is outer
        with local_pool.connect() as inner:
            assert gp.current_pool() is inner
            x = gp.zeros(5)
            assert x.session is inner._session
        assert inner.closed
        assert gp.current_pool() is outer
        assert gp.zeros(5).session is outer._session
    assert active_pool() is None


def test_use_makes_a_pool_current_until_another_is_used_or_it_closes(local_pool: LocalPool) -> None:
    first = local_pool.connect()
    second = local_pool.connect()
    try:
        assert first.use() is first
        assert gp.current_pool() is first
        second.use()
        assert gp.current_pool() is second
        first.use()
        assert gp.current_pool() is first
        first.close()
        assert gp.current_pool() is second  # a closed pool is never current: the one before it is
        second.close()
        assert active_pool() is None
    finally:
        first.close()
        second.close()


def test_a_block_restores_what_was_current_before_it(local_pool: LocalPool) -> None:
    with local_pool.connect() as used:
        used.use()
        with local_pool.connect() as block:
            assert gp.current_pool() is block
            used.use()  # inside the block, as cupy.cuda.Device(n).use(): undone when the block ends
            assert gp.current_pool() is used
        assert gp.current_pool() is used


def test_a_closed_pool_cannot_be_made_current(local_pool: LocalPool) -> None:
    pool = local_pool.connect()
    pool.close()
    with pytest.raises(gp.UsageError, match="closed"):
        pool.use()
    with pytest.raises(gp.UsageError, match="closed"), pool:
        pass
    assert active_pool() is None


def test_the_current_pool_is_per_thread(local_pool: LocalPool) -> None:
    seen: list[object] = []
    with local_pool.connect():
        thread = threading.Thread(target=lambda: seen.append(active_pool()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_with_no_current_pool_the_environment_is_connected_once(
    local_pool: LocalPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUPOOL_COORDINATOR", local_pool.coordinator_address)
    monkeypatch.setenv("GPUPOOL_TOKEN", local_pool.client_token)
    monkeypatch.delenv("GPUPOOL_CA", raising=False)
    x = gp.arange(6)  # connects the default pool
    default = gp.current_pool()
    assert default.address == local_pool.coordinator_address
    assert x.session is default._session
    np.testing.assert_array_equal(x.get(), np.arange(6))
    assert gp.current_pool() is default  # kept, not connected again
    with local_pool.connect() as pool:
        assert gp.current_pool() is pool  # a current pool wins over the default
    assert gp.current_pool() is default
    default.close()
    again = gp.current_pool()  # a closed default pool is replaced
    assert again is not default
    assert not again.closed


def test_with_no_pool_anywhere_creation_raises_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPOOL_COORDINATOR", "127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setenv("GPUPOOL_TOKEN", "nothing")
    with pytest.raises(gp.ConnectError):
        gp.zeros(3)
