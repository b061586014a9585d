"""Verification with real agents (issue 9, item 4): ``gp.connect(..., verify=...)`` re-runs programs on a
second agent; an agent started to corrupt results (fault injection) is caught, its work redone, reported
and quarantined, and every result the user sees matches NumPy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import gpupool as gp
from gpupool._proto.v1 import coordinator_pb2
from gpupool.agent.corruption import CORRUPT_ENV, LOG_MARK
from gpupool.agent.workerproc import FAULT_INJECTION_ENV
from gpupool.client.verify import differs
from gpupool.local import LocalPool


@pytest.fixture
def pool_with_liar(tmp_path: Path) -> Iterator[tuple[LocalPool, str, Path]]:
    """Three honest agents and one that corrupts half its programs' results; quarantine after 3."""
    log = tmp_path / "pool.log"
    with (
        log.open("wb") as stream,
        LocalPool(
            agents=3,
            port=0,
            backend="numpy",
            memory_limit="128MiB",
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            coordinator_args=["--min-shard-bytes", "0", "--placement", "memory", "--quarantine-after", "3"],
            stderr=stream,
        ) as local,
    ):
        liar = local.add_agent(name="liar", env={FAULT_INJECTION_ENV: "1", CORRUPT_ENV: "0.5:11"})
        yield local, str(liar.ready["agent_id"]), log


def test_a_corrupting_agent_is_caught_redone_and_quarantined(
    pool_with_liar: tuple[LocalPool, str, Path],
) -> None:
    local, liar, log = pool_with_liar
    rng = np.random.default_rng(1)
    caught = 0
    sessions = 0
    while sessions < 8:
        sessions += 1
        host = rng.standard_normal((4000, 6))
        with local.connect(verify=1.0) as pool:
            x = pool.asarray(host)
            used_liar = liar in {s.agent_id for s in x.shards}
            y = (np.tanh(x) * 3 + 1).persist()
            np.testing.assert_allclose(y.get(), np.tanh(host) * 3 + 1, rtol=1e-12)
            np.testing.assert_allclose(float(y.sum()), float((np.tanh(host) * 3 + 1).sum()), rtol=1e-9)
            state = pool._session.verification
            caught += state.wrong
            assert state.checked >= 1
            if used_liar:
                assert liar not in {s.agent_id for s in y.shards}  # its work was redone elsewhere
            # Redone: the liar's own programs found wrong (a re-run on the liar that disagreed is not).
            assert state.redone <= state.wrong
        records = [
            r
            for r in local.coordinator_client().call("ListAgents", coordinator_pb2.ListAgentsRequest()).agents
            if r.status.agent_id == liar and r.trust.quarantined
        ]
        quarantined = bool(records)
        if quarantined:
            break
    injected = sum(LOG_MARK in line for line in log.read_text(errors="replace").splitlines())
    print(
        f"{sessions} sessions: {injected} corruptions injected, {caught} caught; quarantined: {quarantined}"
    )
    assert caught >= 1
    # Every corrupted result was checked (verify=1.0); a rebuild of a program's inputs on the liar (for
    # a re-run there) may be corrupted too, and shows as one wrong re-run.
    assert injected >= caught
    assert quarantined, "three mismatches quarantine the agent"
    record = records[0]
    assert record.trust.mismatches >= 3
    # Quarantined: new arrays go elsewhere.
    with local.connect() as pool:
        z = pool.asarray(rng.standard_normal((4000, 6)))
        assert liar not in {s.agent_id for s in z.shards}


def test_honest_agents_agree_and_nothing_is_redone(pool_with_liar: tuple[LocalPool, str, Path]) -> None:
    local, liar, _ = pool_with_liar
    local.coordinator_client().call(
        "Cordon", coordinator_pb2.AdminRequest(agent_id=liar, reason="test"), timeout=30
    )
    host = np.arange(24_000, dtype=np.int64).reshape(4000, 6)
    with local.connect(verify=1.0) as pool:
        x = pool.asarray(host)
        assert liar not in {s.agent_id for s in x.shards}
        np.testing.assert_array_equal((x * 7 - 3).get(), host * 7 - 3)
        assert int((x % 5).sum()) == int((host % 5).sum())
        state = pool._session.verification
        assert state.checked >= 2
        assert state.wrong == 0
        assert state.agreed == state.checked


def test_the_comparison_is_exact_for_integers_and_within_tolerance_for_floats() -> None:
    a = np.arange(6, dtype=np.int32)
    assert differs(a, a.copy()) == ""
    b = a.copy()
    b[4] += 1
    assert "1 element(s) differ, first at [4]" in differs(a, b)
    f = np.linspace(0, 1, 100, dtype=np.float32)
    assert differs(f, f * (1 + 1e-6)) == ""  # float32 rounding
    assert differs(f, f + np.float32(0.01)) != ""
    h = f.astype(np.float16)
    assert differs(h, (f * (1 + 1e-3)).astype(np.float16)) == ""
    assert differs(np.array([np.nan]), np.array([np.nan])) == ""
    assert "float32[2]" in differs(np.zeros(2, np.float32), np.zeros(3, np.float32))


def test_verify_must_be_a_fraction() -> None:
    with pytest.raises(gp.UsageError, match="fraction of programs"):
        gp.connect("127.0.0.1:1", verify=2.0)


def test_a_matmul_is_checked_by_freivalds_products(pool_with_liar: tuple[LocalPool, str, Path]) -> None:
    """``x @ w`` is re-run as ``x @ (w @ r)`` and compared with ``C @ r``: a matrix-vector product on the
    second agent; every result the user sees is right, liar or not."""
    local, _, _ = pool_with_liar
    rng = np.random.default_rng(4)
    host = rng.standard_normal((3000, 16)).astype(np.float32)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    with local.connect(verify=1.0) as pool:
        x = pool.asarray(host)
        c = (x @ w).persist()
        np.testing.assert_allclose(c.get(), host @ w, rtol=1e-4, atol=1e-4)
        state = pool._session.verification
        print(f"freivalds checks {state.freivalds}, checked {state.checked}, wrong {state.wrong}")
        assert state.freivalds >= 1
        assert state.checked >= 1


def test_freivalds_products_show_a_single_wrong_element_always() -> None:
    """With r of +-1s, one changed element of C changes one entry of C @ r by the whole error."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    c = x @ w
    for trial in range(20):
        r = rng.choice(np.array([-1.0, 1.0], np.float32), size=6)
        wrong = c.copy()
        wrong[trial % 50, trial % 6] += 1.0  # what the corrupting agent does: at least 1 away
        assert differs(c @ r, x @ (w @ r)) == ""
        assert differs(wrong @ r, x @ (w @ r)) != ""
