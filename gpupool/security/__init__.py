"""Security primitives: pure, synchronous, no network.

Modules:
    :mod:`~gpupool.security.tokens`      bearer tokens (``gpt_<id>_<secret>``), roles and lifetimes.
    :mod:`~gpupool.security.store`       the coordinator's SQLite state: token digests, enrolled agents,
                                         client sessions.
    :mod:`~gpupool.security.pki`         the pool CA, agent certificates and an agent's saved identity.
    :mod:`~gpupool.security.capability`  short-lived capabilities the coordinator signs for a session on
                                         one agent, and the agent's verifier.
    :mod:`~gpupool.security.signing`     ECDSA signatures over control-plane protobuf messages.

Everything is ECDSA P-256 with SHA-256, from the ``cryptography`` package.
"""

from __future__ import annotations

__all__: list[str] = []
