"""The agent's identity in the pool: enrolled once with a join token, then kept in its state dir.

Like kubelet TLS bootstrapping: on first start the agent makes its own key, sends a certificate request
with the join token (role ``agent``) to the coordinator's ``Enrol``, and keeps what comes back — its
agent id, a certificate naming it, the pool CA, the coordinator's public key for capabilities and
commands, its MQTT credentials — in ``<state-dir>``. Later starts load that and need no token; the id
survives restarts. The key never leaves the rig.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from gpupool._errors import UsageError
from gpupool._proto.v1 import coordinator_pb2
from gpupool.security.pki import AgentIdentity, load_identity, new_key_and_csr, save_identity
from gpupool.transport.coordinator import CoordinatorClient, PoolCredentials

__all__ = ["enrol", "load_or_enrol"]

log = logging.getLogger(__name__)


async def enrol(
    credentials: PoolCredentials,
    *,
    name: str,
    state_dir: Path,
    timeout: float = 30.0,  # noqa: ASYNC109 - the Enrol call's gRPC deadline
) -> AgentIdentity:
    """Enrol with the coordinator using a join token and keep the identity in ``state_dir``.

    Raises:
        AuthError: the coordinator refused the join token (unknown, revoked, expired, wrong role).
        ConnectError, DeadlineExceeded: the coordinator did not answer.
    """
    key_pem, csr_pem = new_key_and_csr(name or socket.gethostname())
    client = CoordinatorClient(credentials, timeout=timeout)
    try:
        reply: coordinator_pb2.EnrolReply = await client.acall(
            "Enrol", coordinator_pb2.EnrolRequest(csr_pem=csr_pem, name=name)
        )
    finally:
        await client.aclose()
    identity = AgentIdentity(
        agent_id=reply.agent_id,
        name=name,
        key_pem=key_pem,
        certificate_pem=reply.certificate_pem,
        ca_pem=reply.ca_certificate_pem,
        capability_key_pem=reply.capability_key_pem,
        mqtt_username=reply.mqtt_username,
        mqtt_password=reply.mqtt_password,
        topic_prefix=reply.topic_prefix,
        coordinator=credentials.address,
    )
    save_identity(state_dir, identity)
    log.info(
        "enrolled with the coordinator at %s as agent %s; identity kept in %s",
        credentials.address,
        identity.agent_id,
        state_dir,
    )
    return identity


async def load_or_enrol(
    *,
    state_dir: Path,
    join_token: str,
    coordinator: str | None,
    ca: str | None,
    name: str,
    insecure: bool,
) -> AgentIdentity | None:
    """The agent's identity: the one kept in ``state_dir``, else a new one from enrolment.

    Returns None only for an agent run ``insecure`` with no identity and no join token (it then
    serves plaintext and takes calls without capabilities: development only).

    Raises:
        UsageError: not enrolled, and no join token nor ``insecure``.
        AuthError, ConnectError, DeadlineExceeded: enrolment failed.
    """
    identity = load_identity(state_dir)
    if identity is not None:
        log.info("agent %s: identity from %s", identity.agent_id, state_dir)
        return identity
    if not join_token:
        if insecure:
            return None
        raise UsageError(
            f"this agent is not enrolled (no identity in {state_dir}): start it once with --join-token "
            "(or $GPUPOOL_JOIN_TOKEN; an operator makes one with `gpupool token create --role agent`) "
            "and --coordinator, or run it with --insecure for an open development agent"
        )
    credentials = PoolCredentials.from_env(coordinator, token=join_token, ca=ca)
    return await enrol(credentials, name=name, state_dir=state_dir)
