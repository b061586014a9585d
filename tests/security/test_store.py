"""The coordinator's SQLite state on real files: tokens, enrolled agents, sessions, meta."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupool._errors import AuthError, UsageError
from gpupool.security.store import SCHEMA_VERSION, STATE_FILE, StateStore
from gpupool.security.tokens import parse_token, token_digest


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(tmp_path / "state") as opened:
        yield opened


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_open_makes_a_private_directory_and_file_in_wal_mode(tmp_path):
    state_dir = tmp_path / "deep" / "state"
    with StateStore.open(state_dir) as store:
        assert store.path == state_dir / STATE_FILE
    assert mode(state_dir) == 0o700
    assert mode(state_dir / STATE_FILE) == 0o600
    with sqlite3.connect(state_dir / STATE_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_an_existing_file_is_made_private(tmp_path):
    (tmp_path / STATE_FILE).touch(mode=0o644)
    (tmp_path / STATE_FILE).chmod(0o644)
    StateStore.open(tmp_path).close()
    assert mode(tmp_path / STATE_FILE) == 0o600


def test_a_file_from_a_newer_gpupool_is_refused(tmp_path):
    StateStore.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / STATE_FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(UsageError, match="newer than this gpupool"):
        StateStore.open(tmp_path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"not a database, just some text " * 100)
    with pytest.raises(UsageError, match="not a gpupool state file"):
        StateStore.open(tmp_path)


def test_a_state_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "state").write_text("oops")
    with pytest.raises(UsageError, match="cannot open the state file"):
        StateStore.open(tmp_path / "state")


def test_a_closed_store_closes_twice_harmlessly(tmp_path):
    store = StateStore.open(tmp_path)
    store.close()
    store.close()


# -- tokens


def test_a_created_token_authenticates_and_only_its_digest_is_stored(store):
    token, record = store.create_token(role="client", name="ann", ttl=None, now=100.0)
    assert parse_token(token) == record.token_id
    assert (record.role, record.name, record.created, record.expires, record.revoked) == (
        "client",
        "ann",
        100.0,
        None,
        None,
    )
    assert store.authenticate(token, now=1e9) == record
    assert store.list_tokens() == [record]
    raw = store.path.read_bytes() + store.path.with_name(STATE_FILE + "-wal").read_bytes()
    assert token.encode() not in raw
    assert token_digest(token).encode() in raw


def test_authentication_refusals_are_distinct(store):
    token, record = store.create_token(role="agent", ttl=60.0, now=1000.0)
    assert record.expires == 1060.0
    with pytest.raises(AuthError, match="malformed token"):
        store.authenticate(token[:-1], now=1000.0)
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(AuthError, match=f"unknown token {record.token_id}"):
        store.authenticate(wrong_secret, now=1000.0)
    with pytest.raises(AuthError, match="unknown token 00000000"):
        store.authenticate("gpt_00000000_" + "A" * 43, now=1000.0)
    assert store.authenticate(token, now=1059.9) == record
    with pytest.raises(AuthError, match=f"token {record.token_id} expired at 1970-01-01 00:17:40 UTC"):
        store.authenticate(token, now=1060.0)
    store.revoke_token(record.token_id, now=1010.0)
    with pytest.raises(AuthError, match=f"token {record.token_id} was revoked"):
        store.authenticate(token, now=1020.0)


def test_a_wrong_secret_does_not_learn_that_a_token_is_revoked(store):
    _, record = store.create_token(role="client", ttl=None, now=0.0)
    store.revoke_token(record.token_id, now=1.0)
    forged = f"gpt_{record.token_id}_" + "x" * 43
    with pytest.raises(AuthError, match="unknown token"):
        store.authenticate(forged, now=2.0)


def test_active_means_neither_revoked_nor_expired(store):
    _, lasting = store.create_token(role="client", ttl=None, now=0.0)
    _, brief = store.create_token(role="client", ttl=10.0, now=0.0)
    assert lasting.active(1e12)
    assert brief.active(9.0)
    assert not brief.active(10.0)
    assert not store.revoke_token(lasting.token_id, now=5.0).active(1.0)


def test_tokens_need_a_known_role_and_a_positive_lifetime(store):
    with pytest.raises(UsageError, match="unknown role"):
        store.create_token(role="root", ttl=None, now=0.0)  # type: ignore[arg-type]
    for ttl in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(UsageError, match="lifetime"):
            store.create_token(role="client", ttl=ttl, now=0.0)
    assert store.list_tokens() == []


def test_revoke_by_id_prefix_or_whole_token_and_keep_the_first_time(store):
    token, record = store.create_token(role="admin", ttl=None, now=0.0)
    revoked = store.revoke_token(record.token_id[:8], now=5.0)
    assert revoked.revoked == 5.0
    assert store.revoke_token(token, now=9.0).revoked == 5.0
    assert store.revoke_token(record.token_id.upper(), now=9.0).revoked == 5.0
    assert store.list_tokens()[0].revoked == 5.0


def test_revoking_an_unknown_or_ambiguous_prefix_is_a_usage_error(store):
    records = [store.create_token(role="client", ttl=None, now=float(i))[1] for i in range(17)]
    firsts = [r.token_id[0] for r in records]
    shared = next(c for c in firsts if firsts.count(c) > 1)  # 17 ids, 16 hex digits
    with pytest.raises(UsageError, match=f"token id '{shared}' matches"):
        store.revoke_token(shared, now=1.0)
    unused = next(c for c in "0123456789abcdef" if c not in firsts) if len(set(firsts)) < 16 else None
    if unused is not None:
        with pytest.raises(UsageError, match="no token with id"):
            store.revoke_token(unused, now=1.0)
    with pytest.raises(UsageError, match="is not a token id"):
        store.revoke_token("", now=1.0)
    with pytest.raises(UsageError, match="is not a token id"):
        store.revoke_token("%", now=1.0)
    assert all(r.revoked is None for r in store.list_tokens())
    assert [r.token_id for r in store.list_tokens()] == [r.token_id for r in records]


def test_two_stores_on_one_file_see_each_others_tokens(tmp_path):
    with StateStore.open(tmp_path) as coordinator, StateStore.open(tmp_path) as cli:
        token, record = cli.create_token(role="client", name="from the cli", ttl=None, now=1.0)
        assert coordinator.authenticate(token, now=2.0) == record
        coordinator.revoke_token(record.token_id, now=3.0)
        with pytest.raises(AuthError, match="revoked"):
            cli.authenticate(token, now=4.0)


def test_another_process_adds_a_token_while_the_store_is_open(tmp_path):
    script = (
        "import sys; from pathlib import Path; from gpupool.security.store import StateStore\n"
        "with StateStore.open(Path(sys.argv[1])) as store:\n"
        "    print(store.create_token(role='admin', ttl=None, now=5.0)[0])\n"
    )
    with StateStore.open(tmp_path) as coordinator:
        start(coordinator, "job-1", now=1.0)
        command = [sys.executable, "-c", script, str(tmp_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        assert coordinator.authenticate(done.stdout.strip(), now=6.0).role == "admin"
        assert coordinator.renew_session("job-1", now=7.0) is not None


def test_one_store_is_safe_to_share_between_threads(store):
    tokens: list[str] = []
    lock = threading.Lock()

    def issue() -> None:
        for _ in range(20):
            token, _ = store.create_token(role="client", ttl=None, now=0.0)
            store.authenticate(token, now=0.0)
            with lock:
                tokens.append(token)

    threads = [threading.Thread(target=issue) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.list_tokens()) == len(set(tokens)) == 160


# -- agents


def test_agents_enrol_list_and_revoke(store):
    first = store.enrol_agent(
        agent_id="a1", name="box", certificate_pem=b"PEM1", fingerprint="f1", token_id="t1", now=10.0
    )
    store.enrol_agent(
        agent_id="a0", name="other", certificate_pem=b"PEM0", fingerprint="f0", token_id="t1", now=20.0
    )
    assert store.get_agent("a1") == first
    assert store.get_agent("nope") is None
    assert [a.agent_id for a in store.list_agents()] == ["a1", "a0"]
    revoked = store.revoke_agent("a1", now=30.0)
    assert (revoked.revoked, revoked.certificate_pem) == (30.0, b"PEM1")
    assert store.revoke_agent("a1", now=40.0).revoked == 30.0
    with pytest.raises(UsageError, match="no enrolled agent 'nope'"):
        store.revoke_agent("nope", now=0.0)


def test_enrolling_again_replaces_the_certificate_and_clears_revocation(store):
    store.enrol_agent(
        agent_id="a1", name="box", certificate_pem=b"old", fingerprint="f1", token_id="t1", now=1.0
    )
    store.revoke_agent("a1", now=2.0)
    again = store.enrol_agent(
        agent_id="a1", name="box2", certificate_pem=b"new", fingerprint="f2", token_id="t2", now=3.0
    )
    assert store.get_agent("a1") == again
    assert (again.revoked, again.certificate_pem, again.fingerprint) == (None, b"new", "f2")
    assert len(store.list_agents()) == 1


# -- sessions


def start(store: StateStore, session_id: str, *, now: float, token_id: str = "t1"):
    return store.create_session(
        session_id=session_id,
        token_id=token_id,
        token_name="ann",
        client="ann@box",
        client_version="0.1",
        now=now,
    )


def test_a_session_runs_renews_counts_and_ends_once(store):
    created = start(store, "job-1", now=10.0)
    assert store.get_session("job-1") == created
    assert (created.state, created.renewed, created.agents) == ("running", 10.0, ())
    renewed = store.renew_session("job-1", now=15.0)
    assert renewed is not None
    assert renewed.renewed == 15.0
    store.record_placement("job-1", 400)
    store.record_placement("job-1", 100)
    store.add_session_agents("job-1", ["b", "a"])
    store.add_session_agents("job-1", iter(["a", "c"]))
    store.add_session_agents("job-1", [])
    ended = store.end_session("job-1", reason="disconnected", now=20.0)
    assert ended is not None
    assert (ended.state, ended.ended, ended.ended_reason) == ("ended", 20.0, "disconnected")
    assert (ended.arrays_placed, ended.bytes_placed, ended.agents) == (2, 500, ("a", "b", "c"))
    again = store.end_session("job-1", reason="lease expired", now=30.0)
    assert again == ended
    assert store.renew_session("job-1", now=40.0) is None
    assert store.get_session("job-1") == ended


def test_unknown_sessions(store):
    assert store.get_session("nope") is None
    assert store.renew_session("nope", now=1.0) is None
    assert store.end_session("nope", reason="x", now=1.0) is None
    store.record_placement("nope", 1)
    start(store, "job-1", now=1.0)
    with pytest.raises(UsageError, match="exists already"):
        start(store, "job-1", now=2.0)


def test_sessions_are_listed_oldest_first_with_the_latest_ended_ones(store):
    for i in range(6):
        start(store, f"job-{i}", now=float(i), token_id="t1" if i % 2 else "t2")
    for i in (4, 0, 2):  # job-2 ends last
        store.end_session(f"job-{i}", reason="done", now=10.0 + i)
    assert [s.session_id for s in store.list_sessions()] == [f"job-{i}" for i in range(6)]
    assert [s.session_id for s in store.list_sessions(include_ended=False)] == ["job-1", "job-3", "job-5"]
    assert [s.session_id for s in store.list_sessions(limit_ended=1)] == ["job-1", "job-3", "job-4", "job-5"]
    assert [s.session_id for s in store.list_sessions(token_id="t2")] == ["job-0", "job-2", "job-4"]
    assert [s.session_id for s in store.list_sessions(token_id="t2", limit_ended=0)] == []


def test_expired_sessions_are_running_ones_not_renewed_within_the_ttl(store):
    start(store, "old", now=0.0)
    start(store, "renewed", now=0.0)
    start(store, "ended", now=0.0)
    start(store, "new", now=25.0)
    store.renew_session("renewed", now=25.0)
    store.end_session("ended", reason="done", now=1.0)
    assert [s.session_id for s in store.expired_sessions(ttl=10.0, now=30.0)] == ["old"]
    assert store.expired_sessions(ttl=100.0, now=30.0) == []


def test_sessions_persist_across_reopening(tmp_path):
    with StateStore.open(tmp_path) as store:
        start(store, "job-1", now=1.0)
        store.add_session_agents("job-1", ["a"])
    with StateStore.open(tmp_path) as store:
        session = store.get_session("job-1")
        assert session is not None
        assert session.agents == ("a",)


# -- meta


def test_meta_values_are_stored_and_replaced(store):
    assert store.get_meta("pool_id") is None
    store.set_meta("pool_id", "p1")
    store.set_meta("pool_id", "p2")
    assert store.get_meta("pool_id") == "p2"
