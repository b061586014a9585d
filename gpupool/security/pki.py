"""The pool's certificate authority, agent certificates, and an agent's saved identity.

The coordinator keeps in its state directory (made 0700):

    ca.key          the CA's private key (0600)
    ca.pem          the CA's self-signed certificate, which clients and agents trust
    capability.key  a second key (0600), which signs capabilities and commands, never certificates

An enrolled agent keeps what enrolment gave it in its own state directory; see :func:`save_identity`.
Every key is ECDSA P-256, every signature SHA-256.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpupool._errors import AuthError, UsageError
from gpupool.security.files import private_dir, write_file

__all__ = [
    "AGENT_NAME_SUFFIX",
    "COORDINATOR_DNS_NAME",
    "AgentIdentity",
    "PoolAuthority",
    "agent_dns_name",
    "certificate_agent_id",
    "fingerprint",
    "load_certificate",
    "load_identity",
    "load_private_key",
    "load_public_key",
    "new_key_and_csr",
    "public_key_pem",
    "save_identity",
]

#: Agent certificates name ``<agent-id>.agent.gpupool``, a name no public CA can issue.
AGENT_NAME_SUFFIX: Final = "agent.gpupool"
#: The name in every coordinator server certificate, whatever host it runs on.
COORDINATOR_DNS_NAME: Final = "coordinator.gpupool"

_CA_YEARS: Final = 10
_SKEW: Final = timedelta(hours=1)  # certificates start an hour early, for peers whose clocks lag
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_IDENTITY_VERSION: Final = 1
_IDENTITY_FIELDS: Final = (
    "agent_id",
    "name",
    "mqtt_username",
    "mqtt_password",
    "topic_prefix",
    "coordinator",
)
_IDENTITY_FILES: Final = {
    "key_pem": "agent.key",
    "certificate_pem": "agent.pem",
    "ca_pem": "ca.pem",
    "capability_key_pem": "capability.pub.pem",
}


def agent_dns_name(agent_id: str) -> str:
    """The DNS name an agent's certificate carries: ``<agent-id>.agent.gpupool``."""
    return f"{agent_id}.{AGENT_NAME_SUFFIX}"


class PoolAuthority:
    """The pool CA and the capability key. Make one with :meth:`load_or_create`.

    Args:
        ca_key: the CA's private key.
        ca_certificate: the CA's self-signed certificate.
        capability_key: the key that signs capabilities and commands.
    """

    def __init__(
        self,
        *,
        ca_key: ec.EllipticCurvePrivateKey,
        ca_certificate: x509.Certificate,
        capability_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self._ca_key = ca_key
        self._ca_certificate = ca_certificate
        self.capability_private_key = capability_key
        self.ca_pem: bytes = ca_certificate.public_bytes(serialization.Encoding.PEM)
        self.capability_public_pem: bytes = public_key_pem(capability_key)
        self.ca_fingerprint: str = fingerprint(self.ca_pem)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> PoolAuthority:
        """Load the CA and capability key from ``state_dir``, creating what is not there yet.

        A file lock keeps two processes from creating two CAs at once.

        Raises:
            UsageError: half a CA (a key without its certificate, or the reverse), a key that does not
                match its certificate, or unreadable files; the operator must repair the directory.
        """
        private_dir(state_dir)
        key_path, cert_path, capability_path = (
            state_dir / "ca.key",
            state_dir / "ca.pem",
            state_dir / "capability.key",
        )
        with _file_lock(state_dir / ".pki.lock"):
            if key_path.exists() != cert_path.exists():
                present, missing = (key_path, cert_path) if key_path.exists() else (cert_path, key_path)
                raise UsageError(
                    f"half a pool CA in {state_dir}: {present.name} without {missing.name}; restore the "
                    f"pair from a backup, or move {present.name} away to start a new CA (agents enrol again)"
                )
            if not key_path.exists():
                ca_key = _new_key()
                write_file(key_path, _private_pem(ca_key), 0o600)
                write_file(cert_path, _self_signed(ca_key).public_bytes(serialization.Encoding.PEM), 0o644)
            if not capability_path.exists():
                write_file(capability_path, _private_pem(_new_key()), 0o600)
            ca_key = load_private_key(_read(key_path, "the pool CA's key"))
            ca_certificate = _load_own_certificate(_read(cert_path, "the pool CA's certificate"), cert_path)
            capability_key = load_private_key(_read(capability_path, "the capability key"))
        if not _same_key(ca_certificate.public_key(), ca_key.public_key()):
            raise UsageError(f"{key_path} is not the key of {cert_path}; restore the pair from a backup")
        return cls(ca_key=ca_key, ca_certificate=ca_certificate, capability_key=capability_key)

    def sign_agent_csr(self, csr_pem: bytes, *, agent_id: str, days: int = 825) -> bytes:
        """An agent certificate (PEM) for the key in a certificate request.

        The certificate names ``agent_id`` (common name, and DNS name ``<agent-id>.agent.gpupool``) and is
        good for TLS server and client authentication; any name the request asks for is ignored.

        Raises:
            AuthError: a malformed request, one whose signature does not verify (it was not made with
                the key it carries), or a key other than ECDSA P-256; the enrolment is refused.
            UsageError: ``agent_id`` is not a DNS label (lowercase letters, digits, hyphens).
        """
        _check_label(agent_id)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            valid, key = csr.is_signature_valid, csr.public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise AuthError(f"malformed certificate request: {exc}") from exc
        if not valid:
            raise AuthError(
                "certificate request refused: its signature does not verify with the key it carries"
            )
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise AuthError("certificate request refused: gpupool agents use ECDSA P-256 keys")
        certificate = self._issue(
            common_name=agent_id,
            public_key=key,
            names=[x509.DNSName(agent_dns_name(agent_id))],
            usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=days,
        )
        return certificate.public_bytes(serialization.Encoding.PEM)

    def server_certificate(self, hosts: Sequence[str], *, days: int = 825) -> tuple[bytes, bytes]:
        """A TLS server certificate and its new key for the coordinator, as ``(cert_pem, key_pem)``.

        It names :data:`COORDINATOR_DNS_NAME` and each of ``hosts``: IP addresses (``[::1]`` too) as IP
        address names, anything else as a DNS name.

        Raises:
            UsageError: a host that is neither an IP address nor a DNS name.
        """
        names: list[x509.GeneralName] = [x509.DNSName(COORDINATOR_DNS_NAME)]
        for host in hosts:
            name = _host_name(host)
            if name is not None and name not in names:
                names.append(name)
        key = _new_key()
        certificate = self._issue(
            common_name=COORDINATOR_DNS_NAME,
            public_key=key.public_key(),
            names=names,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            days=days,
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _private_pem(key)

    def _issue(
        self,
        *,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey,
        names: list[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        days: int,
    ) -> x509.Certificate:
        now = datetime.now(UTC)
        authority_key = self._ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._ca_certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(min(now + timedelta(days=days), self._ca_certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority_key.value),
                critical=False,
            )
        )
        return builder.sign(self._ca_key, hashes.SHA256())


def new_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key (unencrypted PKCS#8 PEM) and a certificate request for it, signed with it.

    Raises:
        UsageError: a common name X.509 cannot carry (empty, or over 64 characters).
    """
    key = _new_key()
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    except ValueError as exc:
        raise UsageError(f"cannot put {common_name!r} in a certificate request: {exc}") from exc
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return _private_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def load_certificate(cert_pem: bytes) -> x509.Certificate:
    """Parse a PEM certificate.

    Raises:
        AuthError: not a PEM certificate (the caller refuses whoever presented it).
    """
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise AuthError(f"malformed certificate: {exc}") from exc


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 hex of a certificate's DER encoding.

    Raises:
        AuthError: not a PEM certificate.
    """
    der = load_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def certificate_agent_id(cert_pem: bytes) -> str:
    """The agent id a certificate names (its common name).

    Raises:
        AuthError: not a PEM certificate, or one without exactly one common name.
    """
    names = load_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise AuthError("certificate refused: it does not name exactly one agent id (common name)")
    return names[0].value


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM private key.

    Raises:
        UsageError: not an unencrypted ECDSA P-256 key in PEM.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"cannot read private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UsageError("cannot use private key: gpupool keys are ECDSA P-256")
    return key


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a PEM public key (SubjectPublicKeyInfo).

    Raises:
        UsageError: not an ECDSA P-256 public key in PEM.
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"cannot read public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UsageError("cannot use public key: gpupool keys are ECDSA P-256")
    return key


def public_key_pem(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a private key's public half."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentIdentity:
    """What an agent got from enrolling, and needs on every start. Keys and secrets stay out of its repr.

    Attributes:
        agent_id: the id the coordinator gave it.
        name: the agent's name.
        key_pem: its private key (PKCS#8 PEM).
        certificate_pem: its certificate, from the pool CA.
        ca_pem: the pool CA's certificate.
        capability_key_pem: the coordinator's public key, which signs capabilities and commands.
        mqtt_username: its broker user ("" when the coordinator manages none).
        mqtt_password: that user's password.
        topic_prefix: the pool's MQTT topic prefix.
        coordinator: the coordinator's address (``host:port``).
    """

    agent_id: str
    name: str
    key_pem: bytes = field(repr=False)
    certificate_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)
    capability_key_pem: bytes = field(repr=False)
    mqtt_username: str
    mqtt_password: str = field(repr=False)
    topic_prefix: str
    coordinator: str


def save_identity(state_dir: Path, identity: AgentIdentity) -> None:
    """Write an agent's identity into ``state_dir`` (made 0700), each file replaced atomically.

    Files: ``agent.key`` (0600), ``agent.pem``, ``ca.pem``, ``capability.pub.pem`` and, last,
    ``identity.json`` (0600) with the other fields.

    Raises:
        UsageError: the identity is inconsistent (see :func:`load_identity`); nothing is written.
    """
    _check_identity(identity, state_dir)
    private_dir(state_dir)
    for attribute, filename in _IDENTITY_FILES.items():
        mode = 0o600 if filename == "agent.key" else 0o644
        write_file(state_dir / filename, getattr(identity, attribute), mode)
    fields: dict[str, object] = {name: getattr(identity, name) for name in _IDENTITY_FIELDS}
    fields["version"] = _IDENTITY_VERSION
    # Written last: an identity.json is only there once the files it goes with are.
    write_file(
        state_dir / "identity.json", json.dumps(fields, indent=2, sort_keys=True).encode() + b"\n", 0o600
    )


def load_identity(state_dir: Path) -> AgentIdentity | None:
    """The identity saved in ``state_dir``, or ``None`` if the agent has not enrolled (no identity.json).

    Raises:
        UsageError: a partial or corrupt identity: a file missing or unreadable, a certificate that is
            not the key's, names another agent or was not issued by the saved CA. The agent should stop
            and the operator enrol it again.
    """
    path = state_dir / "identity.json"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read the agent identity {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != _IDENTITY_VERSION:
            raise ValueError(f"expected an object with version {_IDENTITY_VERSION}")
        fields = {name: data[name] for name in _IDENTITY_FIELDS}
        if not all(isinstance(value, str) for value in fields.values()):
            raise ValueError("every field must be a string")
    except (ValueError, KeyError) as exc:
        raise UsageError(f"corrupt agent identity {path} ({exc}); enrol the agent again") from exc
    files = {
        attr: _read(state_dir / name, "a partial agent identity; enrol the agent again")
        for attr, name in _IDENTITY_FILES.items()
    }
    identity = AgentIdentity(
        agent_id=fields["agent_id"],
        name=fields["name"],
        key_pem=files["key_pem"],
        certificate_pem=files["certificate_pem"],
        ca_pem=files["ca_pem"],
        capability_key_pem=files["capability_key_pem"],
        mqtt_username=fields["mqtt_username"],
        mqtt_password=fields["mqtt_password"],
        topic_prefix=fields["topic_prefix"],
        coordinator=fields["coordinator"],
    )
    _check_identity(identity, state_dir)
    return identity


def _check_identity(identity: AgentIdentity, where: Path) -> None:
    try:
        key = load_private_key(identity.key_pem)
        certificate = load_certificate(identity.certificate_pem)
        authority = load_certificate(identity.ca_pem)
        load_public_key(identity.capability_key_pem)
        if not _same_key(certificate.public_key(), key.public_key()):
            raise UsageError("agent.pem is not the certificate of agent.key")
        if certificate_agent_id(identity.certificate_pem) != identity.agent_id:
            raise UsageError(f"agent.pem does not name agent {identity.agent_id}")
        try:
            certificate.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise UsageError(f"agent.pem was not issued by ca.pem ({str(exc) or 'bad signature'})") from exc
    except (AuthError, UsageError) as exc:
        raise UsageError(f"inconsistent agent identity in {where}: {exc}; enrol the agent again") from exc


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _same_key(a: object, b: ec.EllipticCurvePublicKey) -> bool:
    if not isinstance(a, ec.EllipticCurvePublicKey):
        return False
    encoding, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(encoding, spki) == b.public_bytes(encoding, spki)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gpupool pool CA {secrets.token_hex(4)}")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=365 * _CA_YEARS + _CA_YEARS // 4))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _load_own_certificate(pem: bytes, path: Path) -> x509.Certificate:
    try:
        return load_certificate(pem)
    except AuthError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def _check_label(agent_id: str) -> None:
    if _LABEL.fullmatch(agent_id) is None:
        raise UsageError(f"agent id {agent_id!r} is not a DNS label (lowercase letters, digits, hyphens)")


def _host_name(host: str) -> x509.GeneralName | None:
    cleaned = host.strip().removeprefix("[").removesuffix("]")
    if not cleaned:
        return None
    try:
        return x509.IPAddress(ipaddress.ip_address(cleaned))
    except ValueError:
        pass
    try:
        return x509.DNSName(cleaned.encode("idna").decode("ascii").lower())
    except (UnicodeError, ValueError) as exc:
        raise UsageError(f"{host!r} is neither an IP address nor a DNS name") from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({what}): {exc.strerror}") from exc


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
