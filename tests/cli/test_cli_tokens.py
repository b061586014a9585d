"""``gpupool token`` on a coordinator's state dir, and what a running coordinator makes of the tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gpupool._errors import AuthError
from gpupool._process import spawn
from gpupool._proto.v1 import coordinator_pb2
from gpupool.transport.coordinator import CoordinatorClient, PoolCredentials


def token_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gpupool.cli.main", "token", "--state-dir", str(state_dir), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_tokens_are_created_listed_and_revoked_and_only_their_hash_is_kept(tmp_path: Path) -> None:
    made = token_cli(tmp_path, "create", "--role", "client", "--name", "ann", "--ttl", "30d")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("gpt_")
    assert "shown only now" in made.stderr
    listed = json.loads(token_cli(tmp_path, "list", "--json").stdout)
    assert [(t["role"], t["name"], t["active"]) for t in listed] == [("client", "ann", True)]
    assert listed[0]["expires"] - listed[0]["created"] == pytest.approx(30 * 86400)
    secret = token.rsplit("_", 1)[1]
    assert secret.encode() not in (tmp_path / "state.sqlite3").read_bytes()  # only its SHA-256
    table = token_cli(tmp_path, "list").stdout
    for word in ("client", "ann", "active"):
        assert word in table
    revoked = token_cli(tmp_path, "revoke", listed[0]["id"])
    assert revoked.returncode == 0
    assert "revoked" in revoked.stdout
    assert json.loads(token_cli(tmp_path, "list", "--json").stdout)[0]["active"] is False


def test_bad_token_commands_are_one_clear_line(tmp_path: Path) -> None:
    wrong_role = token_cli(tmp_path, "create", "--role", "root")
    assert wrong_role.returncode == 2
    assert "invalid choice" in wrong_role.stderr
    bad_ttl = token_cli(tmp_path, "create", "--role", "client", "--ttl", "soon")
    assert bad_ttl.returncode == 1
    assert "Traceback" not in bad_ttl.stderr
    unknown = token_cli(tmp_path, "revoke", "ffffffff")
    assert unknown.returncode == 1
    assert "Traceback" not in unknown.stderr


def test_a_running_coordinator_honours_new_and_revoked_tokens(tmp_path: Path, system_broker_url: str) -> None:
    coordinator = spawn(
        "coordinator",
        [
            sys.executable,
            "-m",
            "gpupool.coordinator",
            "--broker",
            system_broker_url,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path),
            "--topic-prefix",
            f"gpupool-test-{uuid.uuid4().hex[:10]}",
        ],
        timeout=30,
    )
    try:
        address = str(coordinator.ready["listen"])
        request = coordinator_pb2.ListAgentsRequest()
        with (
            CoordinatorClient(PoolCredentials(address=address)) as anonymous,
            pytest.raises(AuthError, match="GPUPOOL_TOKEN"),
        ):
            anonymous.call("ListAgents", request)
        token = token_cli(tmp_path, "create", "--role", "client").stdout.strip()  # while it runs
        with CoordinatorClient(PoolCredentials(address=address, token=token)) as client:
            client.call("ListAgents", request)
            with pytest.raises(AuthError, match="needs a token of role admin"):
                client.call("Drain", coordinator_pb2.AdminRequest(agent_id="x"))
            token_id = json.loads(token_cli(tmp_path, "list", "--json").stdout)[0]["id"]
            assert token_cli(tmp_path, "revoke", token_id).returncode == 0
            deadline = time.monotonic() + 10  # the coordinator trusts a checked token for 2 s
            refusal: AuthError | None = None
            while refusal is None:
                try:
                    client.call("ListAgents", request)
                except AuthError as exc:
                    refusal = exc
                assert time.monotonic() < deadline, "a revoked token still works"
                time.sleep(0.2)
            assert "revoked" in str(refusal)
    finally:
        coordinator.stop(timeout=10)
