"""Signatures over control-plane protobuf messages that carry a ``bytes signature`` field.

An enrolled agent signs its :class:`AgentStatus` and :class:`AgentTelemetry` with its certificate's key;
the coordinator signs each :class:`AgentCommand` with its capability key. The signature is ECDSA P-256
with SHA-256 over the message serialized deterministically with ``signature`` empty. The messages travel
as protobuf JSON (:func:`gpupool.protocol.codec.encode_json`), which carries every field exactly, so the
reader re-serializes what it decoded and gets the bytes that were signed.

Because the reader re-serializes, a field the reader's schema does not know (dropped as it decodes)
breaks the signature: adding a field to these messages needs every reader to know it first.
"""

from __future__ import annotations

import copy

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gpupool._proto.v1 import control_pb2
from gpupool.protocol.codec import SCHEMA_VERSION

__all__ = ["SignedMessage", "sign_message", "verify_message"]

#: The messages that carry a signature.
SignedMessage = control_pb2.AgentStatus | control_pb2.AgentTelemetry | control_pb2.AgentCommand

_ALGORITHM = ec.ECDSA(hashes.SHA256())


def sign_message(message: SignedMessage, private_key: ec.EllipticCurvePrivateKey) -> None:
    """Sign ``message`` in place, setting its ``signature`` field.

    A zero ``schema_version`` is set to :data:`~gpupool.protocol.codec.SCHEMA_VERSION` first, as
    ``encode_json`` would set it after signing and so break the signature. Sign last, after every
    other field is set.

    """
    if hasattr(message, "schema_version") and not message.schema_version:
        message.schema_version = SCHEMA_VERSION
    message.signature = b""
    message.signature = private_key.sign(_signed_bytes(message), _ALGORITHM)


def verify_message(message: SignedMessage, public_key: ec.EllipticCurvePublicKey) -> bool:
    """Whether ``message``'s signature is ``public_key``'s over the rest of it; never raises.

    ``False`` for a missing, malformed or wrong signature, and for a message type without one.
    """
    try:
        signature = message.signature
        if not isinstance(signature, bytes) or not signature:
            return False
        unsigned = copy.deepcopy(message)
        unsigned.signature = b""
        public_key.verify(signature, _signed_bytes(unsigned), _ALGORITHM)
    except (InvalidSignature, AttributeError, TypeError, ValueError):
        return False
    return True


def _signed_bytes(message: SignedMessage) -> bytes:
    return message.SerializeToString(deterministic=True)
