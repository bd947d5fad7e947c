"""Certificates for tests, made at test time (never committed) with the ``cryptography`` package.

``make_pki(directory)`` writes a small PKI as PEM files and returns their paths: a root CA, an intermediate CA, a
server certificate issued by the intermediate (SAN ``localhost`` and ``127.0.0.1``; its file holds the chain, leaf
then intermediate), a client certificate issued by the root, another CA and a client certificate it issued, and a
self-signed one.
``PKI.issue_server`` makes further server pairs (a reload test swaps them in); each pair knows its serial.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_serials = itertools.count(1000)


@dataclass(frozen=True)
class Pair:
    """A certificate file (PEM, possibly a chain) and its private key file; the leaf's serial number."""

    cert: Path
    key: Path
    serial: int


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass
class PKI:
    directory: Path
    ca: Path
    """The root CA certificate: the trust anchor of clients (server chain) and of the server (client certificates)."""
    server: Pair
    client: Pair
    """CN ``client.ferry.test``, SAN ``spiffe://ferry.test/client``, issued by the root."""
    other_client: Pair
    """Issued by another CA (``other_ca``), which the server does not trust."""
    other_ca: Path
    self_signed: Pair
    _intermediate: _Issuer = field(repr=False)

    def issue_server(self, name: str) -> Pair:
        """A new server pair from the intermediate (a new serial), written as ``NAME.pem`` / ``NAME.key``."""
        return _server_pair(self.directory, name, self._intermediate)

    def read(self, path: Path) -> bytes:
        return path.read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: _Issuer | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Certificate, int]:
    now = datetime.datetime.now(datetime.UTC)
    serial = next(_serials)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.cert.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        usage_ext = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        usage_ext = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    builder = builder.add_extension(usage_ext, critical=True)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return cert, serial


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _server_pair(directory: Path, name: str, intermediate: _Issuer) -> Pair:
    key = _key()
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert, serial = _certificate("localhost", key, intermediate, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    (directory / f"{name}.pem").write_bytes(_pem(cert) + _pem(intermediate.cert))
    _write_key(directory / f"{name}.key", key)
    return Pair(directory / f"{name}.pem", directory / f"{name}.key", serial)


def _client_pair(directory: Path, name: str, cn: str, issuer: _Issuer | None) -> Pair:
    key = _key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"spiffe://ferry.test/{name}")]
    cert, serial = _certificate(cn, key, issuer, sans=sans, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    (directory / f"{name}.pem").write_bytes(_pem(cert))
    _write_key(directory / f"{name}.key", key)
    return Pair(directory / f"{name}.pem", directory / f"{name}.key", serial)


def _ca(subject: str, issuer: _Issuer | None = None) -> _Issuer:
    key = _key()
    cert, _ = _certificate(subject, key, issuer, ca=True)
    return _Issuer(cert, key)


def make_pki(directory: Path) -> PKI:
    """Write the test PKI into ``directory`` (module docstring) and return its paths."""
    directory.mkdir(parents=True, exist_ok=True)
    root = _ca("Ferry Test Root CA")
    intermediate = _ca("Ferry Test Intermediate CA", root)
    other = _ca("Some Other CA")
    (directory / "ca.pem").write_bytes(_pem(root.cert))
    (directory / "other-ca.pem").write_bytes(_pem(other.cert))
    return PKI(
        directory=directory,
        ca=directory / "ca.pem",
        server=_server_pair(directory, "server", intermediate),
        client=_client_pair(directory, "client", "client.ferry.test", root),
        other_client=_client_pair(directory, "other-client", "client.ferry.test", other),
        self_signed=_client_pair(directory, "self-signed", "client.ferry.test", None),
        other_ca=directory / "other-ca.pem",
        _intermediate=intermediate,
    )


def serial_of(der: bytes) -> int:
    """The serial number of a DER certificate (what ``getpeercert(binary_form=True)`` returns)."""
    return x509.load_der_x509_certificate(der).serial_number


__all__ = ["PKI", "Pair", "make_pki", "serial_of"]
