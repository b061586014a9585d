"""Jobs as pure state: Connect starts one, Place counts, Disconnect ends it."""

from __future__ import annotations

import pytest

from gpupool._errors import PlacementError
from gpupool.coordinator.jobs import Jobs


def test_a_job_runs_from_connect_to_disconnect():
    jobs = Jobs()
    job = jobs.connect("ann@laptop", "0.1.0", now=10.0)
    assert job.job_id.startswith("job-")
    assert (job.client, job.state, job.started) == ("ann@laptop", "running", 10.0)
    jobs.record_placement(job.job_id, 400)
    jobs.record_placement(job.job_id, 100)
    assert (job.arrays_placed, job.bytes_placed) == (2, 500)
    assert jobs.running_count() == 1
    ended = jobs.disconnect(job.job_id, now=20.0)
    assert (ended.state, ended.ended) == ("ended", 20.0)
    assert jobs.running_count() == 0
    assert jobs.disconnect(job.job_id, now=30.0).ended == 20.0  # twice is harmless


def test_unknown_and_ended_sessions_are_refused():
    jobs = Jobs()
    with pytest.raises(PlacementError, match="unknown session 'job-nope'"):
        jobs.record_placement("job-nope", 1)
    with pytest.raises(PlacementError, match="unknown session"):
        jobs.disconnect("job-nope", now=0)
    job = jobs.connect("", "", now=0)
    assert job.client == "unknown"
    jobs.disconnect(job.job_id, now=1)
    with pytest.raises(PlacementError, match="has ended"):
        jobs.record_placement(job.job_id, 1)


def test_jobs_are_listed_oldest_first_and_old_ended_ones_dropped():
    jobs = Jobs(keep_ended=2)
    ids = [jobs.connect(f"user{i}", "", now=float(i)).job_id for i in range(5)]
    for i, job_id in enumerate(ids[:4]):
        jobs.disconnect(job_id, now=10.0 + i)
    assert [j.client for j in jobs.list()] == ["user2", "user3", "user4"]
    assert [j.state for j in jobs.list()] == ["ended", "ended", "running"]
