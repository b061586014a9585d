"""Capabilities: issued by the coordinator's key, checked by one agent's verifier."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from gpupool._errors import AuthError, UsageError
from gpupool.security.capability import Capability, CapabilityVerifier, issue_capability

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
AGENT = "a1b2c3d4e5f6"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verifier(**kwargs) -> CapabilityVerifier:
    return CapabilityVerifier(KEY.public_key(), AGENT, **kwargs)


def test_an_issued_capability_verifies_on_its_agent():
    token, expires = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=300.0, now=1000.5)
    assert expires == 1300.0
    assert verifier().verify(token, now=1001.0) == Capability(session="job-1", agent_id=AGENT, expires=1300.0)


def test_the_payload_is_compact_sorted_json():
    token, _ = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=60.0, now=100.0)
    payload, _, signature = token.partition(".")
    assert unb64(payload) == b'{"a":"a1b2c3d4e5f6","exp":160,"iat":100,"s":"job-1","v":1}'
    assert "=" not in token
    KEY.public_key().verify(unb64(signature), unb64(payload), ec.ECDSA(hashes.SHA256()))


def test_an_expired_capability_is_refused_even_when_cached():
    check = verifier()
    token, expires = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=60.0, now=0.0)
    check.verify(token, now=1.0)
    check.verify(token, now=59.0)
    with pytest.raises(AuthError, match="capability for session job-1 expired 0 s ago") as caught:
        check.verify(token, now=expires)
    assert caught.value.agent_id == AGENT
    with pytest.raises(AuthError, match="expired 40 s ago"):
        verifier().verify(token, now=100.0)


def test_a_capability_for_another_agent_is_refused():
    token, _ = issue_capability(KEY, session="job-1", agent_id="b0b0b0b0b0b0", ttl=60.0, now=0.0)
    with pytest.raises(AuthError, match=f"for agent b0b0b0b0b0b0, not this agent \\({AGENT}\\)"):
        verifier().verify(token, now=1.0)


def test_a_capability_signed_by_another_key_is_refused():
    token, _ = issue_capability(OTHER_KEY, session="job-1", agent_id=AGENT, ttl=60.0, now=0.0)
    with pytest.raises(AuthError, match="signature does not verify"):
        verifier().verify(token, now=1.0)


def test_an_altered_payload_is_refused():
    check = verifier()
    token, _ = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=60.0, now=0.0)
    check.verify(token, now=1.0)
    payload, _, signature = token.partition(".")
    claims = json.loads(unb64(payload))
    claims["exp"] = 10**9
    longer = b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()) + "." + signature
    with pytest.raises(AuthError, match="signature does not verify"):
        check.verify(longer, now=1.0)


def test_signed_but_unreadable_claims_are_malformed():
    payload = b'{"v":1,"s":"job-1","a":"a1b2c3d4e5f6","exp":"soon"}'
    token = b64(payload) + "." + b64(KEY.sign(payload, ec.ECDSA(hashes.SHA256())))
    with pytest.raises(AuthError, match="claims are unreadable"):
        verifier().verify(token, now=1.0)


@pytest.mark.parametrize(
    "token", ["", ".", "abc", "abc.", ".abc", "a.b.c", "a b.c", "a=.b", "a.b", "x" * 3000]
)
def test_malformed_capabilities_are_refused(token):
    with pytest.raises(AuthError, match="malformed capability"):
        verifier().verify(token, now=1.0)


def test_a_short_signature_is_a_bad_signature():
    with pytest.raises(AuthError, match="signature does not verify"):
        verifier().verify("e30.AAAA", now=1.0)


@given(st.text())
def test_verify_raises_nothing_but_auth_error_for_arbitrary_text(text):
    with pytest.raises(AuthError):
        verifier().verify(text, now=1.0)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", max_size=300))
def test_verify_raises_nothing_but_auth_error_for_base64ish_text(text):
    with pytest.raises(AuthError):
        verifier().verify(text, now=1.0)


TOKEN, _ = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=60.0, now=0.0)


@given(st.integers(min_value=0, max_value=len(TOKEN) - 1), st.sampled_from("AQgw_-."))
def test_any_changed_character_is_refused(position, replacement):
    changed = TOKEN[:position] + replacement + TOKEN[position + 1 :]
    try:
        capability = verifier().verify(changed, now=1.0)
    except AuthError:
        return
    # Base64 spares the last character's low bits, and ECDSA signatures are malleable: a changed
    # character may decode to the same bytes, or to another valid signature, of the same claims.
    assert capability == verifier().verify(TOKEN, now=1.0)


def test_an_ended_session_is_refused_until_the_given_time():
    check = verifier()
    token, _ = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=600.0, now=0.0)
    other, _ = issue_capability(KEY, session="job-2", agent_id=AGENT, ttl=600.0, now=0.0)
    check.verify(token, now=1.0)  # cached from here on
    check.end_session("job-1", until=100.0)
    with pytest.raises(AuthError, match="session job-1 has ended"):
        check.verify(token, now=2.0)
    fresh, _ = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=700.0, now=0.0)
    with pytest.raises(AuthError, match="session job-1 has ended"):
        check.verify(fresh, now=50.0)
    assert check.verify(other, now=2.0).session == "job-2"
    assert check.verify(token, now=100.0).session == "job-1"  # the end was forgotten


def test_an_ended_session_is_refused_for_tokens_never_seen_before():
    check = verifier()
    check.end_session("job-1", until=100.0)
    token, _ = issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=600.0, now=0.0)
    with pytest.raises(AuthError, match="has ended"):
        check.verify(token, now=1.0)


def test_the_cache_is_bounded_and_forgets_the_oldest():
    check = verifier(cache_size=2)
    tokens = [
        issue_capability(KEY, session=f"job-{i}", agent_id=AGENT, ttl=60.0, now=0.0)[0] for i in range(3)
    ]
    for token in tokens:
        check.verify(token, now=1.0)
    assert list(check._cache) == tokens[1:]
    no_cache = verifier(cache_size=0)
    no_cache.verify(tokens[0], now=1.0)
    assert no_cache._cache == {}
    with pytest.raises(UsageError):
        verifier(cache_size=-1)


def test_failures_are_not_cached():
    check = verifier()
    token, _ = issue_capability(KEY, session="job-1", agent_id="b0b0b0b0b0b0", ttl=60.0, now=0.0)
    for _ in range(2):
        with pytest.raises(AuthError, match="for agent b0b0b0b0b0b0"):
            check.verify(token, now=1.0)
    assert check._cache == {}


def test_issuing_needs_a_positive_lifetime_and_ids():
    for ttl in (0.0, -1.0, float("nan")):
        with pytest.raises(UsageError, match="lifetime"):
            issue_capability(KEY, session="job-1", agent_id=AGENT, ttl=ttl, now=0.0)
    with pytest.raises(UsageError, match="session and an agent id"):
        issue_capability(KEY, session="", agent_id=AGENT, ttl=1.0, now=0.0)
