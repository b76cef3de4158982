"""The development PKI: a local certificate authority and one certificate per workload.

Created on first start (by `megacity up`, or by a service started alone), kept under the PKI directory, and
renewed when a certificate nears expiry or no longer chains to the CA. Each workload certificate carries
its SPIFFE ID as the only URI SAN (gRPC exposes it as `peer_spiffe_id`), the DNS name peers use to check
they reached the right service (`<name>.<trust_domain>`), and localhost for humans with grpcurl.
Only for local runs: in Kubernetes, Linkerd issues and rotates identities.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.runtime.catalog import Catalog

CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=90)
RENEW_BEFORE = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Credentials:
    """PEM material a workload needs for mTLS: its key and certificate, and the CA to trust."""

    name: str
    private_key: bytes
    certificate_chain: bytes
    root_certificates: bytes


def service_dns_name(catalog: Catalog, name: str) -> str:
    return f"{name}.{catalog.trust_domain}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise PKI changes between processes started at the same time."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_ca(directory: Path, trust_domain: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and certificate.not_valid_after_utc - _now() > RENEW_BEFORE:
            return key, certificate
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"MegaCity dev CA ({trust_domain})")])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key, certificate


def _leaf_is_current(cert_path: Path, ca: x509.Certificate, spiffe_id: str) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        certificate.verify_directly_issued_by(ca)
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
        and certificate.not_valid_after_utc - _now() > RENEW_BEFORE
    )


def _issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, name: str, spiffe_id: str, dns_name: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(spiffe_id),
                    x509.DNSName(dns_name),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def ensure_credentials(directory: Path, catalog: Catalog, name: str) -> Credentials:
    """The workload's credentials, creating the CA and its certificate on first use."""
    if name not in catalog.identities:
        raise ValueError(f"{name!r} is not a workload in the catalog")
    spiffe_id = catalog.spiffe_id(name)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    with _locked(directory):
        ca_key, ca = _ensure_ca(directory, catalog.trust_domain)
        if not (key_path.exists() and _leaf_is_current(cert_path, ca, spiffe_id)):
            key, certificate = _issue_leaf(ca_key, ca, name, spiffe_id, service_dns_name(catalog, name))
            _write_private(key_path, _key_pem(key))
            cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return Credentials(
            name=name,
            private_key=key_path.read_bytes(),
            certificate_chain=cert_path.read_bytes(),
            root_certificates=(directory / "ca.pem").read_bytes(),
        )


def ensure_all(directory: Path, catalog: Catalog) -> dict[str, Credentials]:
    """Credentials for every workload of the catalog (what `megacity up` prepares before starting services)."""
    return {name: ensure_credentials(directory, catalog, name) for name in catalog.identities}
