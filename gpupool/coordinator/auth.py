"""Who is calling: bearer tokens checked against the state store, and the role each RPC needs.

A servicer method decorated with :func:`requires` gets the caller's :class:`TokenRecord` as a fourth
argument; a call without a usable token ends UNAUTHENTICATED, one of the wrong role PERMISSION_DENIED,
before the handler runs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from gpupool._errors import AuthError
from gpupool._ratelog import RateLimitedLog
from gpupool.protocol.errors import RpcRefusal, abort
from gpupool.security.store import StateStore, TokenRecord
from gpupool.security.tokens import Role, role_allows
from gpupool.transport.rpc import AUTHORIZATION_KEY

__all__ = ["Authenticator", "requires"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S", bound="_HasAuth")
Req = TypeVar("Req")
Rep = TypeVar("Rep")

#: Refusals, which any caller can provoke: one line per method and kind a minute.
_refusals = RateLimitedLog(log.info)

#: Seconds a token that authenticated is trusted without asking the store again (a revocation made
#: with ``gpupool token revoke`` takes effect within this).
CACHE_SECONDS = 2.0


class Authenticator:
    """Checks bearer tokens against the store, with a short cache.

    Args:
        store: the coordinator's state store.
        clock: seconds since the epoch (tests pass their own).
    """

    def __init__(self, store: StateStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[float, TokenRecord]] = {}

    def authenticate(self, context: Context) -> TokenRecord:
        """The token record of the call's bearer token.

        Raises:
            RpcRefusal: ``unauthenticated``, saying what is wrong (missing, unknown, revoked, expired).
        """
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_KEY and isinstance(value, str):
                token = value.removeprefix("Bearer ").strip()
        if not token:
            raise RpcRefusal("unauthenticated", "no token: this pool needs a bearer token on every call")
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now:
            record = cached[1]
            if record.expires is None or record.expires > now:
                return record
        try:
            record = self._store.authenticate(token, now=now)
        except AuthError as exc:
            self._cache.pop(token, None)
            raise RpcRefusal("unauthenticated", str(exc)) from exc
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (now + CACHE_SECONDS, record)
        return record


class _HasAuth(Protocol):
    _auth: Authenticator


def requires(
    role: Role,
) -> Callable[
    [Callable[[S, Req, Context, TokenRecord], Awaitable[Rep]]], Callable[[S, Req, Context], Awaitable[Rep]]
]:
    """Run the handler only for a caller whose token has ``role`` (admin tokens pass everywhere).

    Refusals raised by the handler (:class:`RpcRefusal`) end the call with their status too.
    """

    def decorate(
        handler: Callable[[S, Req, Context, TokenRecord], Awaitable[Rep]],
    ) -> Callable[[S, Req, Context], Awaitable[Rep]]:
        @functools.wraps(handler)
        async def wrapper(self: S, request: Req, context: Context) -> Rep:
            try:
                caller = self._auth.authenticate(context)
                if not role_allows(caller.role, role):
                    raise RpcRefusal(
                        "permission-denied",
                        f"{handler.__name__} needs a token of role {role}; "
                        f"token {caller.token_id} has role {caller.role}",
                    )
                return await handler(self, request, context, caller)
            except RpcRefusal as refusal:
                _refusals.emit(
                    (handler.__name__, refusal.kind),
                    f"refused {handler.__name__}: {refusal.message} ({refusal.kind})",
                )
                await abort(context, refusal)

        return wrapper

    return decorate
