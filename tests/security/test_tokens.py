"""Bearer tokens: their shape, digests, lifetimes and roles."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpupool._errors import AuthError, UsageError
from gpupool.security.tokens import (
    ROLES,
    new_token,
    parse_role,
    parse_token,
    parse_ttl,
    role_allows,
    token_digest,
)


def test_a_new_token_has_the_documented_shape_and_parses_to_its_id():
    token, token_id = new_token()
    assert re.fullmatch(r"gpt_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", token)
    assert token.startswith(f"gpt_{token_id}_")
    assert parse_token(token) == token_id


def test_new_tokens_differ():
    tokens = {new_token()[0] for _ in range(200)}
    assert len(tokens) == 200


def test_a_secret_that_contains_underscores_still_parses():
    token = "gpt_0123abcd_" + "_" * 43
    assert parse_token(token) == "0123abcd"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no token given"),
        ("{token}\n", "whitespace"),
        (" {token}", "whitespace"),
        ("Bearer {token}", "without 'Bearer '"),
        ("ghp_{secret}", "not a gpupool token"),
        ("gpt_0123ABCD_{secret}", "malformed token"),
        ("gpt_0123abc_{secret}", "malformed token"),
        ("gpt_0123abcd_{secret}x", "malformed token"),
        ("gpt_0123abcd_{secret}=", "malformed token"),
        ("gpt_0123abcd-{secret}", "malformed token"),
    ],
)
def test_malformed_tokens_are_refused_without_echoing_the_secret(text, message):
    token, _ = new_token()
    secret = token[len("gpt_0123abcd_") :]
    with pytest.raises(AuthError, match=message) as caught:
        parse_token(text.format(token=token, secret=secret))
    assert secret not in str(caught.value)


@given(st.text() | st.builds("gpt_{}".format, st.text()))
def test_parse_token_raises_nothing_but_auth_error(text):
    try:
        token_id = parse_token(text)
    except AuthError:
        return
    assert re.fullmatch(r"[0-9a-f]{8}", token_id)
    assert text == text.strip()


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=24))
def test_refusals_never_quote_what_was_presented(secret):
    for text in (secret, f"gpt_{secret}", f"gpt_0123abcd_{secret}", f"{secret}\n"):
        if re.fullmatch(r"gpt_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", text):
            continue  # a well-formed token: nothing is refused
        with pytest.raises(AuthError) as caught:
            parse_token(text)
        assert secret not in str(caught.value)


def test_the_digest_is_sha256_of_the_whole_token():
    token, _ = new_token()
    assert token_digest(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token_digest(token) != token_digest(new_token()[0])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400.0),
        ("12h", 12 * 3600.0),
        ("90m", 5400.0),
        ("45s", 45.0),
        ("3600", 3600.0),
        ("1.5h", 5400.0),
        (" 2D ", 2 * 86400.0),
        ("0", None),
        ("0s", None),
        ("never", None),
        ("Never", None),
        ("", None),
    ],
)
def test_lifetimes_are_read_in_seconds(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["-5", "-1d", "10y", "d", "1h30m", "abc", "1e3", "nan", "inf", "1" * 400])
def test_junk_and_negative_lifetimes_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_ttl(text)


@given(st.text())
def test_parse_ttl_raises_nothing_but_usage_error(text):
    try:
        seconds = parse_ttl(text)
    except UsageError:
        return
    assert seconds is None or seconds > 0


def test_admin_may_do_anything_and_other_roles_only_their_own():
    for need in ROLES:
        assert role_allows("admin", need)
    assert role_allows("client", "client")
    assert role_allows("agent", "agent")
    assert not role_allows("client", "admin")
    assert not role_allows("client", "agent")
    assert not role_allows("agent", "client")
    assert not role_allows("agent", "admin")


def test_roles_are_parsed_strictly():
    assert [parse_role(role) for role in ROLES] == list(ROLES)
    with pytest.raises(UsageError, match="unknown role 'root'"):
        parse_role("root")
    with pytest.raises(UsageError):
        parse_role("Admin")
