"""A test certificate authority and a server certificate for the gateway's TLS.

azure-iot-device always verifies the server: the certificate must chain to a CA the device
trusts (`server_verification_cert`) and name the host the device connects to
(`GatewayHostName`). Production gateways use certificates from the operator's PKI; these are
for tests and demos (`turbofan edge certs --host NAME`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from turbofan_core.atomic_file import write_atomically

CA_CERT, CA_KEY = "ca.pem", "ca.key"
VALID_DAYS = 365


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path  # give this to devices (`server_verification_cert`)
    server_cert: Path  # the gateway's certificate, signed by the CA
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _check_host(host: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}", host):
        raise ValueError(f"{host!r} is not a host name or an IP address")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def make_ca(common_name: str = "turbofan test CA") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(common_name), _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_server_cert(host: str, ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `host` (a DNS name or an IP address), signed by the CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    _check_host(host)
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alternative = x509.DNSName(host)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(host), ca_cert.subject, key)
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def write_certs(folder: Path, host: str) -> CertPaths:
    """A server certificate for `host` in `folder`, signed by the folder's CA (created on first use,
    so devices keep trusting the same CA when certificates for more hosts are made)."""
    folder.mkdir(parents=True, exist_ok=True)
    _check_host(host)  # before anything is written; the host also names the files
    ca_cert, ca_key = folder / CA_CERT, folder / CA_KEY
    if not (ca_cert.exists() and ca_key.exists()):
        cert_pem, key_pem = make_ca()
        write_atomically(ca_key, key_pem, 0o600)
        write_atomically(ca_cert, cert_pem, 0o644)
    cert_pem, key_pem = make_server_cert(host, ca_cert.read_bytes(), ca_key.read_bytes())
    paths = CertPaths(ca_cert, folder / f"{host}.pem", folder / f"{host}.key")
    write_atomically(paths.server_key, key_pem, 0o600)
    write_atomically(paths.server_cert, cert_pem, 0o644)
    return paths
