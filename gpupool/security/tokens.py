"""Bearer tokens, their roles and lifetimes: pure functions, no storage.

A token reads ``gpt_<id>_<secret>``: ``id`` is 8 lowercase hex digits that name the token in listings
and logs, ``secret`` is 32 random bytes in base64url without padding (43 characters, which may
themselves contain ``_`` and ``-``). Only the SHA-256 digest of the whole string is ever stored.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
from typing import Final, Literal, get_args

from gpupool._errors import AuthError, UsageError

__all__ = [
    "ROLES",
    "TOKEN_PREFIX",
    "Role",
    "new_token",
    "parse_role",
    "parse_token",
    "parse_ttl",
    "role_allows",
    "token_digest",
]

Role = Literal["client", "agent", "admin"]

#: Every role, least privileged first.
ROLES: Final[tuple[Role, ...]] = get_args(Role)

#: What every gpupool token starts with, so a leaked one is easy to recognise (and to grep for).
TOKEN_PREFIX: Final = "gpt_"

_SECRET_BYTES: Final = 32
_SECRET_CHARS: Final = 43  # base64url of 32 bytes, unpadded
# fullmatch with ASCII classes only: `$` would accept a trailing newline, `\d` other scripts' digits.
_TOKEN: Final = re.compile(rf"gpt_([0-9a-f]{{8}})_[A-Za-z0-9_-]{{{_SECRET_CHARS}}}")
_TTL: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)")
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NO_EXPIRY: Final = frozenset({"", "0", "never", "none"})


def new_token() -> tuple[str, str]:
    """A fresh token and its id, as ``(token, token_id)``."""
    token_id = secrets.token_hex(4)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=").decode()
    return f"{TOKEN_PREFIX}{token_id}_{secret}", token_id


def parse_token(token: str) -> str:
    """The id of a well-formed token; nothing is looked up.

    Messages never quote the token, so they are safe to log and to send back to the caller.

    Raises:
        AuthError: anything that is not ``gpt_<8 hex digits>_<43 base64url characters>``; the caller
            answers the request as unauthenticated.
    """
    match = _TOKEN.fullmatch(token)
    if match is not None:
        return match.group(1)
    if not token:
        raise AuthError("no token given: pass one issued by `gpupool token create`")
    if token != token.strip():
        raise AuthError("malformed token: it has leading or trailing whitespace (a newline from a file?)")
    if token.lower().startswith("bearer "):
        raise AuthError("malformed token: give the token itself, without 'Bearer '")
    if not token.startswith(TOKEN_PREFIX):
        raise AuthError(f"not a gpupool token: gpupool tokens start with {TOKEN_PREFIX!r}")
    raise AuthError(
        f"malformed token ({len(token)} characters): expected gpt_<8 hex digits>_<43 base64url characters>"
    )


def token_digest(token: str) -> str:
    """The SHA-256 hex digest of the whole token string, which is what a store keeps."""
    # A fast hash is right here: the secret is 256 random bits, so there is nothing to brute-force and
    # no need for a salt. A slow KDF (scrypt, argon2) is for low-entropy human passwords, and would only
    # make every authenticated call slower.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_ttl(text: str) -> float | None:
    """Seconds from a lifetime such as ``"30d"``, ``"12h"``, ``"90m"``, ``"45s"`` or ``"3600"``.

    ``""``, ``"0"`` (in any unit) and ``"never"`` mean no expiry, and give ``None``.

    Raises:
        UsageError: a negative lifetime, or text that is not one (for the CLI to show).
    """
    cleaned = text.strip().lower()
    if cleaned in _NO_EXPIRY:
        return None
    if cleaned.startswith("-"):
        raise UsageError(f"lifetime {text!r} is negative; use 0 or 'never' for a token that never expires")
    match = _TTL.fullmatch(cleaned)
    if match is None:
        raise UsageError(
            f"cannot read lifetime {text!r}: use a number with an optional unit s, m, h or d "
            "(30d, 12h, 90m, 45s, 3600), or 'never'"
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise UsageError(f"lifetime {text!r} is too long; use 'never' for a token that never expires")
    return seconds or None


def parse_role(text: str) -> Role:
    """``text`` as a :data:`Role`.

    Raises:
        UsageError: not one of :data:`ROLES`.
    """
    for role in ROLES:
        if text == role:
            return role
    raise UsageError(f"unknown role {text!r}: use one of {', '.join(ROLES)}")


def role_allows(have: Role, need: Role) -> bool:
    """Whether a token of role ``have`` may make a call that needs ``need`` (admin may make any)."""
    return have == "admin" or have == need
