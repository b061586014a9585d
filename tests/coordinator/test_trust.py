"""Clients' verification reports as pure state: trust scores, quarantine, who may report, rate limits;
and the network throughput clients observe, smoothed per agent."""

from __future__ import annotations

import math

import pytest

from gpupool._errors import AuthError, UsageError
from gpupool.coordinator.netspeed import MIN_SAMPLE_BYTES, NetworkSpeeds
from gpupool.coordinator.trust import AgentQuarantined, TrustBook, TrustRecord

MiB = 1 << 20


def book(**options: object) -> TrustBook:
    trust = TrustBook(**options)  # type: ignore[arg-type]
    trust.placed("job-1", ["aaa", "bbb", "ccc"])
    return trust


def test_the_score_is_the_laplace_smoothed_share_of_checks_that_agreed() -> None:
    assert TrustRecord().score == 0.5
    assert TrustRecord(checks=8, mismatches=0).score == 0.9
    assert TrustRecord(checks=2, mismatches=2).score == 0.25


def test_agreements_raise_the_score_and_the_second_mismatch_quarantines() -> None:
    trust = book()
    for _ in range(3):
        verdict = trust.report("job-1", "aaa", "bbb", agreed=True, now=0.0)
    assert verdict.counted
    assert verdict.trust == TrustRecord(checks=3)
    assert verdict.trust.score == pytest.approx(0.8)
    first = trust.report("job-1", "aaa", "bbb", agreed=False, detail="row 7: 1.0 vs 2.0", now=1.0)
    assert first.counted
    assert first.quarantined is None
    assert first.trust == TrustRecord(checks=4, mismatches=1)
    second = trust.report("job-1", "aaa", "ccc", agreed=False, detail="row 9: 3.0 vs -3.0", now=2.0)
    assert second.trust.quarantined
    assert second.trust.mismatches == 2
    assert second.quarantined == AgentQuarantined("aaa", second.trust.reason)
    assert second.trust.reason.startswith("2 of 5 verified results disagreed")
    assert "row 9: 3.0 vs -3.0" in second.trust.reason
    assert trust.quarantined() == ["aaa"]
    # A third mismatch is counted but quarantines nothing new.
    third = trust.report("job-1", "aaa", "bbb", agreed=False, now=3.0)
    assert third.quarantined is None
    assert third.trust.mismatches == 3
    # The reference agent's record is untouched: a report is about the agent checked.
    assert trust.get("bbb") == TrustRecord()


def test_the_limit_is_the_coordinators_to_set() -> None:
    trust = book(quarantine_after=1)
    assert trust.report("job-1", "bbb", "aaa", agreed=False, now=0.0).quarantined is not None
    with pytest.raises(UsageError, match="at least 1"):
        TrustBook(quarantine_after=0)


def test_release_takes_a_quarantined_agent_back_with_a_clean_record() -> None:
    trust = book(quarantine_after=1)
    assert trust.release("aaa", now=0.0) is None  # not quarantined: nothing to take back
    trust.report("job-1", "aaa", "bbb", agreed=True, now=0.0)
    assert trust.release("aaa", now=0.0) is None
    assert trust.get("aaa").checks == 1
    trust.report("job-1", "aaa", "bbb", agreed=False, now=1.0)
    released = trust.release("aaa", now=2.0)
    assert released is not None
    assert released.quarantined
    assert released.checks == 2
    assert trust.get("aaa") == TrustRecord()
    assert trust.quarantined() == []


def test_a_session_reports_only_on_agents_it_was_placed_on() -> None:
    trust = book()
    with pytest.raises(AuthError, match="never placed on zzz"):
        trust.report("job-1", "zzz", "aaa", agreed=False, now=0.0)
    with pytest.raises(AuthError, match="never placed on zzz"):
        trust.report("job-1", "aaa", "zzz", agreed=False, now=0.0)
    # Another session, placed elsewhere, cannot report on job-1's agents.
    trust.placed("job-2", ["ccc"])
    with pytest.raises(AuthError, match="never placed on aaa, bbb"):
        trust.report("job-2", "aaa", "bbb", agreed=False, now=0.0)
    with pytest.raises(UsageError, match="its own result"):
        trust.report("job-1", "aaa", "aaa", agreed=False, now=0.0)
    with pytest.raises(UsageError, match="names the agent checked"):
        trust.report("job-1", "aaa", "", agreed=True, now=0.0)
    # An ended session reports on nothing.
    trust.session_ended("job-1")
    with pytest.raises(AuthError):
        trust.report("job-1", "aaa", "bbb", agreed=True, now=0.0)
    assert trust.get("aaa") == TrustRecord()
    assert trust.get("zzz") == TrustRecord()


def test_a_sessions_mismatch_reports_are_rate_limited() -> None:
    trust = book(quarantine_after=100, burst=3, interval=10.0)
    counted = [trust.report("job-1", "aaa", "bbb", agreed=False, now=0.0).counted for _ in range(5)]
    assert counted == [True, True, True, False, False]
    refused = trust.report("job-1", "bbb", "aaa", agreed=False, now=1.0)  # the limit is the session's
    assert not refused.counted
    assert "limit of 3 mismatch reports" in refused.note
    assert refused.trust == TrustRecord()
    assert trust.get("aaa").mismatches == 3
    # Agreements are not limited, and the allowance comes back with time, one per interval.
    assert trust.report("job-1", "aaa", "bbb", agreed=True, now=2.0).counted
    assert trust.report("job-1", "aaa", "bbb", agreed=False, now=10.5).counted
    assert not trust.report("job-1", "aaa", "bbb", agreed=False, now=11.0).counted
    # Another session has its own allowance.
    trust.placed("job-2", ["aaa", "bbb"])
    assert trust.report("job-2", "aaa", "bbb", agreed=False, now=11.0).counted


def test_records_are_saved_and_loaded_back() -> None:
    saved: list[str] = []
    trust = book(quarantine_after=2, save=saved.append)
    trust.report("job-1", "aaa", "bbb", agreed=True, now=0.0)
    trust.report("job-1", "aaa", "bbb", agreed=True, now=1.0)  # agreements: saved at most every 10 s
    assert len(saved) == 1
    trust.report("job-1", "aaa", "bbb", agreed=False, now=2.0)
    trust.report("job-1", "aaa", "bbb", agreed=False, now=3.0)
    trust.report("job-1", "ccc", "bbb", agreed=False, now=4.0)
    assert len(saved) == 4  # every mismatch at once
    restarted = TrustBook()
    assert restarted.load(saved[-1]) == ["aaa"]
    assert restarted.get("aaa") == trust.get("aaa")
    assert restarted.get("ccc") == TrustRecord(checks=1, mismatches=1)
    trust.forget("aaa", now=5.0)
    assert TrustBook().load(saved[-1]) == []
    with pytest.raises(UsageError, match="unreadable"):
        TrustBook().load('{"aaa": 3}')


def test_network_speeds_are_smoothed_and_implausible_reports_ignored() -> None:
    speeds = NetworkSpeeds(smoothing=0.5)
    assert speeds.get("aaa") == 0.0
    assert speeds.observe("aaa", 100 * MiB, 1.0)
    assert speeds.get("aaa") == 100 * MiB
    assert speeds.observe("aaa", 50 * MiB, 1.0)
    assert speeds.get("aaa") == 75 * MiB
    for nbytes, seconds in [
        (MIN_SAMPLE_BYTES - 1, 0.001),  # latency, not throughput
        (10 * MiB, 0.0),
        (10 * MiB, -1.0),
        (10 * MiB, math.nan),
        (10 * MiB, math.inf),
        (2**62, 1e-6),  # faster than any link
    ]:
        assert not speeds.observe("aaa", nbytes, seconds)
    assert speeds.get("aaa") == 75 * MiB
    speeds.forget("aaa")
    assert speeds.get("aaa") == 0.0
