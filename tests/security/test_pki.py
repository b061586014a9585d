"""The pool CA, agent and coordinator certificates, and an agent's saved identity, on real files."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from gpupool._errors import AuthError, UsageError
from gpupool.security.pki import (
    COORDINATOR_DNS_NAME,
    AgentIdentity,
    PoolAuthority,
    agent_dns_name,
    certificate_agent_id,
    fingerprint,
    load_identity,
    load_private_key,
    load_public_key,
    new_key_and_csr,
    public_key_pem,
    save_identity,
)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> PoolAuthority:
    return PoolAuthority.load_or_create(tmp_path_factory.mktemp("coordinator"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def enrol(authority: PoolAuthority, agent_id: str = "a1b2c3d4e5f6") -> tuple[bytes, bytes]:
    key_pem, csr_pem = new_key_and_csr("my-laptop")
    return key_pem, authority.sign_agent_csr(csr_pem, agent_id=agent_id)


def test_the_authority_is_created_once_with_private_keys(tmp_path):
    state_dir = tmp_path / "state"
    first = PoolAuthority.load_or_create(state_dir)
    assert mode(state_dir) == 0o700
    assert mode(state_dir / "ca.key") == 0o600
    assert mode(state_dir / "capability.key") == 0o600
    assert (state_dir / "ca.pem").read_bytes() == first.ca_pem
    again = PoolAuthority.load_or_create(state_dir)
    assert again.ca_pem == first.ca_pem
    assert again.ca_fingerprint == first.ca_fingerprint == fingerprint(first.ca_pem)
    assert again.capability_public_pem == first.capability_public_pem
    assert public_key_pem(again.capability_private_key) == first.capability_public_pem
    assert sorted(p.name for p in state_dir.iterdir() if not p.name.startswith(".")) == [
        "ca.key",
        "ca.pem",
        "capability.key",
    ]


def test_the_ca_certificate_is_a_ten_year_ca(authority):
    ca = x509.load_pem_x509_certificate(authority.ca_pem)
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.startswith("gpupool pool CA ")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert 3650 <= lifetime.days <= 3654
    ca.verify_directly_issued_by(ca)
    capability_key = load_public_key(authority.capability_public_pem)
    assert capability_key.public_numbers() != ca.public_key().public_numbers()  # two keys, two jobs


def test_concurrent_creation_makes_one_ca(tmp_path):
    results: list[PoolAuthority] = []
    threads = [
        threading.Thread(target=lambda: results.append(PoolAuthority.load_or_create(tmp_path)))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({a.ca_fingerprint for a in results}) == 1
    assert len({a.capability_public_pem for a in results}) == 1


def test_half_a_ca_or_a_mismatched_pair_is_refused(tmp_path):
    PoolAuthority.load_or_create(tmp_path / "one")
    PoolAuthority.load_or_create(tmp_path / "two")
    (tmp_path / "one" / "ca.pem").rename(tmp_path / "ca.pem.saved")
    with pytest.raises(UsageError, match=r"half a pool CA .* ca\.key without ca\.pem"):
        PoolAuthority.load_or_create(tmp_path / "one")
    (tmp_path / "two" / "ca.pem").replace(tmp_path / "one" / "ca.pem")
    with pytest.raises(UsageError, match="is not the key of"):
        PoolAuthority.load_or_create(tmp_path / "one")
    (tmp_path / "one" / "ca.key").unlink()
    with pytest.raises(UsageError, match=r"ca\.pem without ca\.key"):
        PoolAuthority.load_or_create(tmp_path / "one")


def test_an_agent_certificate_chains_to_the_ca_for_server_and_client_auth(authority):
    key_pem, cert_pem = enrol(authority, "a1b2c3d4e5f6")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(authority.ca_pem)
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    store = Store([ca])
    server = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("a1b2c3d4e5f6.agent.gpupool"))
    assert server.verify(cert, []) == [cert, ca]
    client = PolicyBuilder().store(store).build_client_verifier()
    verified = client.verify(cert, [])
    assert verified.subjects == [x509.DNSName(agent_dns_name("a1b2c3d4e5f6"))]
    assert certificate_agent_id(cert_pem) == "a1b2c3d4e5f6"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_private_key(key_pem)
    assert public_key_pem(key) == cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_names_the_request_asks_for_are_ignored(authority):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COORDINATOR_DNS_NAME)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(COORDINATOR_DNS_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = authority.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), agent_id="agent7")
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(names) == [x509.DNSName("agent7.agent.gpupool")]
    assert certificate_agent_id(cert_pem) == "agent7"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_request_with_a_forged_signature_is_refused(authority):
    _, csr_pem = new_key_and_csr("agent-honest")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    forged_der = der.replace(b"agent-honest", b"agent-forged")
    assert forged_der != der
    forged = x509.load_der_x509_csr(forged_der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(AuthError, match="signature does not verify"):
        authority.sign_agent_csr(forged, agent_id="a1")


def test_requests_for_other_keys_and_malformed_requests_are_refused(authority):
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(AuthError, match="ECDSA P-256"):
        authority.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), agent_id="a1")
    with pytest.raises(AuthError, match="malformed certificate request"):
        authority.sign_agent_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", agent_id="a1")
    with pytest.raises(AuthError, match="malformed certificate request"):
        authority.sign_agent_csr(authority.ca_pem, agent_id="a1")


@pytest.mark.parametrize("agent_id", ["", "A1", "a.b", "-a", "a" * 64, "a_b", "é"])
def test_an_agent_id_must_be_a_dns_label(authority, agent_id):
    _, csr_pem = new_key_and_csr("x")
    with pytest.raises(UsageError, match="not a DNS label"):
        authority.sign_agent_csr(csr_pem, agent_id=agent_id)


def test_the_server_certificate_names_the_coordinator_and_its_hosts(authority):
    cert_pem, key_pem = authority.server_certificate(["10.0.0.5", "[::1]", "gpu-box.lan", "", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert names == [
        x509.DNSName(COORDINATOR_DNS_NAME),
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("gpu-box.lan"),
    ]
    store = Store([x509.load_pem_x509_certificate(authority.ca_pem)])
    for name in (
        x509.DNSName(COORDINATOR_DNS_NAME),
        x509.DNSName("gpu-box.lan"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
    ):
        PolicyBuilder().store(store).build_server_verifier(name).verify(cert, [])
    assert public_key_pem(load_private_key(key_pem)) == cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UsageError, match="neither an IP address nor a DNS name"):
        authority.server_certificate(["a..b"])


def test_a_certificate_from_another_pool_does_not_verify(authority, tmp_path):
    _, cert_pem = enrol(PoolAuthority.load_or_create(tmp_path))
    store = Store([x509.load_pem_x509_certificate(authority.ca_pem)])
    verifier = PolicyBuilder().store(store).build_client_verifier()
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(x509.load_pem_x509_certificate(cert_pem), [])


def test_key_and_certificate_helpers_refuse_junk():
    with pytest.raises(AuthError, match="malformed certificate"):
        fingerprint(b"junk")
    with pytest.raises(AuthError, match="malformed certificate"):
        certificate_agent_id(b"junk")
    with pytest.raises(UsageError, match="cannot read private key"):
        load_private_key(b"junk")
    with pytest.raises(UsageError, match="cannot read public key"):
        load_public_key(b"junk")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(UsageError, match="P-256"):
        load_private_key(
            p384.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with pytest.raises(UsageError, match="P-256"):
        load_public_key(
            p384.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    with pytest.raises(UsageError):
        new_key_and_csr("x" * 65)


def test_a_certificate_without_a_common_name_names_no_agent():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    nameless = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(AuthError, match="exactly one agent id"):
        certificate_agent_id(nameless.public_bytes(serialization.Encoding.PEM))


# -- agent identity


def identity_for(authority: PoolAuthority, agent_id: str = "a1b2c3d4e5f6") -> AgentIdentity:
    key_pem, cert_pem = enrol(authority, agent_id)
    return AgentIdentity(
        agent_id=agent_id,
        name="my-laptop",
        key_pem=key_pem,
        certificate_pem=cert_pem,
        ca_pem=authority.ca_pem,
        capability_key_pem=authority.capability_public_pem,
        mqtt_username="agent-a1b2",
        mqtt_password="s3cret-password",
        topic_prefix="gpupool",
        coordinator="10.0.0.5:50051",
    )


def test_an_identity_survives_a_save_and_load(authority, tmp_path):
    state_dir = tmp_path / "agent"
    assert load_identity(state_dir) is None
    identity = identity_for(authority)
    save_identity(state_dir, identity)
    assert load_identity(state_dir) == identity
    assert mode(state_dir) == 0o700
    assert mode(state_dir / "agent.key") == 0o600
    assert mode(state_dir / "identity.json") == 0o600
    assert sorted(p.name for p in state_dir.iterdir()) == [
        "agent.key",
        "agent.pem",
        "ca.pem",
        "capability.pub.pem",
        "identity.json",
    ]
    saved = json.loads((state_dir / "identity.json").read_text())
    assert saved["mqtt_password"] == "s3cret-password"
    assert "PRIVATE KEY" not in (state_dir / "identity.json").read_text()
    replacement = identity_for(authority)
    save_identity(state_dir, replacement)
    assert load_identity(state_dir) == replacement


def test_the_repr_of_an_identity_shows_no_secrets(authority):
    identity = identity_for(authority)
    shown = repr(identity)
    assert "a1b2c3d4e5f6" in shown
    assert "s3cret-password" not in shown
    assert "PRIVATE KEY" not in shown


@pytest.mark.parametrize("missing", ["agent.key", "agent.pem", "ca.pem", "capability.pub.pem"])
def test_a_partial_identity_is_a_usage_error(authority, tmp_path, missing):
    save_identity(tmp_path, identity_for(authority))
    (tmp_path / missing).unlink()
    with pytest.raises(UsageError, match=f"{missing}"):
        load_identity(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"version": 1}', b'{"version": 2}', b'{"version": 1, "agent_id": 5}'],
)
def test_a_corrupt_identity_file_is_a_usage_error(authority, tmp_path, content):
    save_identity(tmp_path, identity_for(authority))
    if content == b'{"version": 1, "agent_id": 5}':
        data = json.loads((tmp_path / "identity.json").read_text())
        data["agent_id"] = 5
        content = json.dumps(data).encode()
    (tmp_path / "identity.json").write_bytes(content)
    with pytest.raises(UsageError, match="corrupt agent identity"):
        load_identity(tmp_path)


def test_an_inconsistent_identity_is_refused(authority, tmp_path):
    identity = identity_for(authority)
    other = identity_for(authority, "b0b0b0b0b0b0")
    with pytest.raises(UsageError, match=r"not the certificate of agent\.key"):
        save_identity(tmp_path, dataclasses.replace(identity, key_pem=other.key_pem))
    with pytest.raises(UsageError, match="does not name agent"):
        save_identity(tmp_path, dataclasses.replace(identity, agent_id="b0b0b0b0b0b0"))
    assert not (tmp_path / "identity.json").exists()
    save_identity(tmp_path, identity)
    (tmp_path / "agent.pem").write_bytes(other.certificate_pem)
    with pytest.raises(UsageError, match="inconsistent agent identity"):
        load_identity(tmp_path)


def test_an_identity_from_another_pool_ca_is_refused(authority, tmp_path):
    identity = identity_for(authority)
    stranger = PoolAuthority.load_or_create(tmp_path / "other")
    with pytest.raises(UsageError, match=r"not issued by ca\.pem"):
        save_identity(tmp_path / "agent", dataclasses.replace(identity, ca_pem=stranger.ca_pem))
