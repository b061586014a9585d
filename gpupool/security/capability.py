"""Capabilities: short-lived grants the coordinator signs for one session on one agent.

A client shows an agent a capability with every call of a session; the agent checks it with the
coordinator's public key alone, so the coordinator is never on the data path. A capability reads
``<payload>.<signature>``, both base64url without padding: the payload is compact JSON with sorted keys,
``{"a":"<agent-id>","e":"<endpoint>","exp":<int>,"iat":<int>,"s":"<session>","v":1}``, and the signature is
ECDSA P-256 with SHA-256 (DER) over the payload's bytes. ``e``, the agent's data-plane address as the
coordinator's registry has it, is optional: another agent pulling rows for the session (``Pull``) dials
that address and no other, so where a peer is is the coordinator's word, not the client's.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gpupool._errors import AuthError, UsageError

__all__ = [
    "CAPABILITY_VERSION",
    "COORDINATOR_SESSION",
    "Capability",
    "CapabilityVerifier",
    "issue_capability",
]

#: The payload's ``v``.
CAPABILITY_VERSION: Final = 1
#: The session of the coordinator's own capabilities, for its calls to an agent whose buffers it moves away
#: (``Inventory``, ``Forward``): no client session can have this id (theirs are ``job-<hex>``), and an agent
#: takes it for those calls only.
COORDINATOR_SESSION: Final = "~coordinator"

_ALGORITHM: Final = ec.ECDSA(hashes.SHA256())
# Real capabilities are about 200 characters; anything much longer is refused before it is decoded.
_MAX_LENGTH: Final = 2048
_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_MAX_ENDED: Final = 65536


@dataclass(frozen=True, slots=True, kw_only=True)
class Capability:
    """A verified capability.

    Attributes:
        session: the session it was granted to.
        agent_id: the agent it is good on.
        expires: when it stops working, in seconds since the epoch.
        endpoint: the agent's data-plane address, as the coordinator signed it ("" if it did not).
    """

    session: str
    agent_id: str
    expires: float
    endpoint: str = ""


def issue_capability(
    private_key: ec.EllipticCurvePrivateKey,
    *,
    session: str,
    agent_id: str,
    ttl: float,
    now: float,
    endpoint: str = "",
) -> tuple[str, float]:
    """A capability for ``session`` on ``agent_id`` (serving at ``endpoint``, if given), good for ``ttl``
    seconds, and when it expires.

    Times are whole seconds: ``expires`` is ``now + ttl`` rounded down.

    Raises:
        UsageError: a lifetime that is not positive, or an empty session or agent id.
    """
    if not ttl > 0:
        raise UsageError(f"capability lifetime must be positive, not {ttl!r}")
    if not session or not agent_id:
        raise UsageError("a capability needs a session and an agent id")
    expires = int(now + ttl)
    claims: dict[str, object] = {
        "a": agent_id,
        "exp": expires,
        "iat": int(now),
        "s": session,
        "v": CAPABILITY_VERSION,
    }
    if endpoint:
        claims["e"] = endpoint
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    signature = private_key.sign(payload, _ALGORITHM)
    return f"{_encode(payload)}.{_encode(signature)}", float(expires)


class CapabilityVerifier:
    """An agent's check of the capabilities clients present. One thread (the agent's event loop) owns it.

    A token that verified once is remembered, so showing it again costs a dict lookup; its expiry, and
    whether its session has ended, are checked on every call all the same.

    Args:
        public_key: the coordinator's capability key.
        agent_id: this agent's id; a capability for any other agent is refused.
        cache_size: how many verified tokens to remember; the oldest is forgotten first.
    """

    def __init__(
        self, public_key: ec.EllipticCurvePublicKey, agent_id: str, *, cache_size: int = 4096
    ) -> None:
        if cache_size < 0:
            raise UsageError(f"cache_size must not be negative, not {cache_size}")
        self.agent_id = agent_id
        self._public_key = public_key
        self._cache_size = cache_size
        self._cache: dict[str, Capability] = {}  # insertion order is age
        self._ended: dict[str, float] = {}  # session -> refuse its capabilities until then

    def verify(self, token: str, *, now: float) -> Capability:
        """The capability ``token`` grants, if it is good for this agent at ``now``.

        Raises:
            AuthError: the token is malformed, its signature does not verify, it is for another agent,
                it has expired, or its session has ended; the agent answers UNAUTHENTICATED (or
                PERMISSION_DENIED for another agent's capability) and the client asks for a new one.
        """
        capability = self._cache.get(token)
        if capability is None:
            capability = self._decode(token)
            self._check_live(capability, now)
            if self._cache_size:
                if len(self._cache) >= self._cache_size:
                    del self._cache[next(iter(self._cache))]
                self._cache[token] = capability
            return capability
        try:
            self._check_live(capability, now)
        except AuthError:
            del self._cache[token]
            raise
        return capability

    def end_session(self, session: str, *, until: float) -> None:
        """Refuse every capability of ``session`` from now until ``until``, then forget the session.

        ``until`` should be no earlier than the last expiry the coordinator granted the session.
        """
        self._ended.pop(session, None)  # re-inserted at the end: it is now the youngest
        if len(self._ended) >= _MAX_ENDED:
            del self._ended[next(iter(self._ended))]
        self._ended[session] = until

    def _decode(self, token: str) -> Capability:
        if len(token) > _MAX_LENGTH or _SHAPE.fullmatch(token) is None:
            raise AuthError(
                "malformed capability: expected <payload>.<signature> in base64url", agent_id=self.agent_id
            )
        encoded_payload, _, encoded_signature = token.partition(".")
        try:
            payload, signature = _decode(encoded_payload), _decode(encoded_signature)
        except binascii.Error as exc:
            raise AuthError(f"malformed capability: {exc}", agent_id=self.agent_id) from exc
        try:
            self._public_key.verify(signature, payload, _ALGORITHM)
        except (InvalidSignature, ValueError) as exc:
            raise AuthError(
                "capability signature does not verify: not issued by this pool's coordinator, or altered",
                agent_id=self.agent_id,
            ) from exc
        capability = _parse_claims(payload)
        if capability is None:
            raise AuthError(
                "malformed capability: signed, but its claims are unreadable", agent_id=self.agent_id
            )
        if capability.agent_id != self.agent_id:
            raise AuthError(
                f"capability is for agent {capability.agent_id}, not this agent ({self.agent_id})",
                agent_id=self.agent_id,
            )
        return capability

    def _check_live(self, capability: Capability, now: float) -> None:
        if now >= capability.expires:
            raise AuthError(
                f"capability for session {capability.session} expired {now - capability.expires:.0f} s ago; "
                "ask the coordinator for a new one",
                agent_id=self.agent_id,
            )
        until = self._ended.get(capability.session)
        if until is not None:
            if now < until:
                raise AuthError(f"session {capability.session} has ended", agent_id=self.agent_id)
            del self._ended[capability.session]


def _parse_claims(payload: bytes) -> Capability | None:
    try:
        claims = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(claims, dict) or claims.get("v") != CAPABILITY_VERSION:
        return None
    session, agent_id, expires = claims.get("s"), claims.get("a"), claims.get("exp")
    if not isinstance(session, str) or not isinstance(agent_id, str):
        return None
    if not isinstance(expires, int) or isinstance(expires, bool):
        return None
    endpoint = claims.get("e", "")
    if not isinstance(endpoint, str):
        return None
    return Capability(session=session, agent_id=agent_id, expires=float(expires), endpoint=endpoint)


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
