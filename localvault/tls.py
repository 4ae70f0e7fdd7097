"""A certificate authority and a leaf certificate for loopback, made with ``cryptography``: a throwaway
CA by default, or a long-lived one that a data directory keeps, with a fresh leaf at each start."""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650  # a kept CA outlives any use of it; each start issues a fresh leaf
LEAF_DAYS = 397
LOOPBACK_NAMES: List[Union[x509.DNSName, x509.IPAddress]] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
]


@dataclass
class CertificateFiles:
    ca_file: str
    cert_file: str
    key_file: str
    key_password: Optional[bytes] = field(default=None, repr=False)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "localvault"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


@dataclass
class Authority:
    """A certificate authority: its certificate and private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM; the caller keeps it secret."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> Authority:
        """Raises ValueError if either is not PEM, or the key is not the certificate's."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        # an RSA key is refused below anyway: not checked first, which for a huge one would take minutes
        key = serialization.load_pem_private_key(key_pem, password=None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ValueError("the CA key does not match the CA certificate")
        return cls(cert, key)


def new_authority(days: int = CA_DAYS) -> Authority:
    """A self-signed CA for loopback, valid from 5 minutes ago for ``days`` days."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("localvault CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def generate(
    directory: str,
    extra_ips: Sequence[str] = (),
    authority: Optional[Authority] = None,
    ca_file: Optional[str] = None,
    dns_names: Sequence[str] = (),
) -> CertificateFiles:
    """Write a fresh leaf certificate (``cert.pem``) and its key (``key.pem``, owner-only, encrypted with
    a random password kept in memory) into ``directory``, signed by ``authority``: by default a new
    30-day CA written as ``ca.pem`` there; given one, ``ca_file`` is where its certificate already is.
    The leaf lasts as long as the CA, at most LEAF_DAYS. It names loopback, ``extra_ips`` and
    ``dns_names`` (wildcards such as ``*.vault.azure.net`` included)."""
    if authority is None:
        authority = new_authority(days=30)
        ca_file = os.path.join(directory, "ca.pem")
        _write(ca_file, authority.cert_pem(), 0o644)
    assert ca_file is not None, "a given authority needs its ca_file"
    now = datetime.datetime.now(datetime.timezone.utc)
    end = min(_not_after(authority.cert), now + datetime.timedelta(days=LEAF_DAYS))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    names = LOOPBACK_NAMES + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips]
    names += [x509.DNSName(name) for name in dns_names]
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(authority.cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False
        )
        .sign(authority.key, hashes.SHA256())
    )
    password = secrets.token_bytes(24)
    files = CertificateFiles(
        ca_file=ca_file,
        cert_file=os.path.join(directory, "cert.pem"),
        key_file=os.path.join(directory, "key.pem"),
        key_password=password,
    )
    pem = serialization.Encoding.PEM
    _write(files.cert_file, leaf_cert.public_bytes(pem) + authority.cert_pem(), 0o644)
    _write(
        files.key_file,
        leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(password)
        ),
        0o600,
    )
    return files


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    if hasattr(cert, "not_valid_after_utc"):  # cryptography 42 and later
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def server_context(files: CertificateFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert_file, files.key_file, password=files.key_password)
    return context


def write_bundle(path: str, ca_file: str) -> str:
    """Write certifi's CAs followed by the CA in ``ca_file`` to ``path``: a bundle that trusts localvault
    and keeps every other verified HTTPS connection working. Returns ``path``."""
    import certifi

    with open(certifi.where(), "rb") as public, open(ca_file, "rb") as own:
        data = public.read().rstrip(b"\n") + b"\n" + own.read()
    _write(path, data, 0o644)
    return path
