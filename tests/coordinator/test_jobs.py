"""Jobs over the state store: Connect starts one owned by a token, calls renew it, leases end it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupool._errors import AuthError, PlacementError
from gpupool.coordinator.jobs import Jobs
from gpupool.security.store import StateStore, TokenRecord


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(tmp_path) as opened:
        yield opened


def _caller(store: StateStore, role: str = "client", name: str = "ann") -> TokenRecord:
    _, record = store.create_token(role=role, name=name, ttl=None, now=0.0)  # type: ignore[arg-type]
    return record


def test_a_job_runs_from_connect_to_disconnect(store: StateStore):
    jobs = Jobs(store, lease=60)
    ann = _caller(store)
    job = jobs.connect(ann, "ann@laptop", "0.1.0", now=10.0)
    assert job.session_id.startswith("job-")
    assert (job.client, job.state, job.started, job.token_id) == ("ann@laptop", "running", 10.0, ann.token_id)
    jobs.record_placement(job.session_id, 400, ["a1"])
    jobs.record_placement(job.session_id, 100, ["a2", "a1"])
    now = jobs.get(job.session_id, ann)
    assert (now.arrays_placed, now.bytes_placed, sorted(now.agents)) == (2, 500, ["a1", "a2"])
    assert jobs.running_count() == 1
    ended = jobs.end(job.session_id, reason="disconnected", now=20.0)
    assert (ended.state, ended.ended, ended.ended_reason) == ("ended", 20.0, "disconnected")
    assert jobs.running_count() == 0
    again = jobs.end(job.session_id, reason="lease expired", now=30.0)
    assert (again.ended, again.ended_reason) == (20.0, "disconnected")  # twice is harmless


def test_unknown_ended_and_foreign_sessions_are_refused(store: StateStore):
    jobs = Jobs(store)
    ann, bob, root = _caller(store), _caller(store, name="bob"), _caller(store, "admin", "root")
    with pytest.raises(PlacementError, match="unknown session 'job-nope'"):
        jobs.running("job-nope", ann, now=0)
    with pytest.raises(PlacementError, match="unknown session"):
        jobs.end("job-nope", reason="x", now=0)
    job = jobs.connect(ann, "", "", now=0)
    assert job.client == "unknown"
    with pytest.raises(AuthError, match="belongs to another token"):
        jobs.running(job.session_id, bob, now=1)
    assert jobs.running(job.session_id, root, now=1).session_id == job.session_id  # admins see all
    jobs.end(job.session_id, reason="disconnected", now=1)
    with pytest.raises(PlacementError, match=r"has ended \(disconnected\)"):
        jobs.running(job.session_id, ann, now=2)


def test_leases_expire_unless_renewed_and_listing_is_per_token(store: StateStore):
    jobs = Jobs(store, lease=10)
    ann, bob = _caller(store), _caller(store, name="bob")
    quiet = jobs.connect(ann, "quiet", "", now=0).session_id
    busy = jobs.connect(ann, "busy", "", now=0).session_id
    other = jobs.connect(bob, "bob", "", now=0).session_id
    jobs.running(busy, ann, now=8)  # any call of the session renews it
    assert {r.session_id for r in jobs.expired(now=15)} == {quiet, other}
    assert [r.client for r in jobs.list(ann)] == ["quiet", "busy"]
    assert {r.client for r in jobs.list(ann, all_sessions=True)} == {"quiet", "busy", "bob"}


def test_sessions_survive_a_new_store_on_the_same_file(tmp_path: Path):
    with StateStore.open(tmp_path) as first:
        ann = _caller(first)
        session = Jobs(first).connect(ann, "ann", "", now=1).session_id
    with StateStore.open(tmp_path) as second:
        assert Jobs(second).running(session, ann, now=2).state == "running"
