"""The dev PKI: SPIFFE identities in certificates, private keys kept private, renewal and re-issue."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.runtime.catalog import load_catalog
from services.runtime.pki import ensure_all, ensure_credentials


def _certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_each_workload_gets_its_spiffe_id_and_service_name(tmp_path: Path) -> None:
    catalog = load_catalog()
    credentials = ensure_all(tmp_path, catalog)
    assert set(credentials) == {*catalog.services, *catalog.callers}
    ca = _certificate(credentials["exam"].root_certificates)
    for name, issued in credentials.items():
        certificate = _certificate(issued.certificate_chain)
        certificate.verify_directly_issued_by(ca)
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [catalog.spiffe_id(name)]
        assert f"{name}.megacity.local" in sans.get_values_for_type(x509.DNSName)
        assert stat.S_IMODE((tmp_path / f"{name}-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600


def test_credentials_are_stable_across_starts(tmp_path: Path) -> None:
    catalog = load_catalog()
    first = ensure_credentials(tmp_path, catalog, "auth")
    assert ensure_credentials(tmp_path, catalog, "auth") == first


def test_a_certificate_near_expiry_is_renewed(tmp_path: Path) -> None:
    catalog = load_catalog()
    ensure_credentials(tmp_path, catalog, "auth")
    ca_key = serialization.load_pem_private_key((tmp_path / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = _certificate((tmp_path / "ca.pem").read_bytes())
    old = _certificate((tmp_path / "auth.pem").read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    expiring = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=89))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "auth.pem").write_bytes(expiring.public_bytes(serialization.Encoding.PEM))
    renewed = _certificate(ensure_credentials(tmp_path, catalog, "auth").certificate_chain)
    assert renewed.not_valid_after_utc - now > datetime.timedelta(days=80)


def test_a_certificate_from_another_ca_is_reissued(tmp_path: Path) -> None:
    catalog = load_catalog()
    foreign = ensure_credentials(tmp_path / "elsewhere", catalog, "auth")
    (tmp_path / "auth.pem").write_bytes(foreign.certificate_chain)
    (tmp_path / "auth-key.pem").write_bytes(foreign.private_key)
    ensure_credentials(tmp_path, catalog, "ops")  # creates this directory's CA
    reissued = ensure_credentials(tmp_path, catalog, "auth")
    _certificate(reissued.certificate_chain).verify_directly_issued_by(_certificate(reissued.root_certificates))


def test_only_catalog_workloads_get_certificates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a workload"):
        ensure_credentials(tmp_path, load_catalog(), "mallory")
