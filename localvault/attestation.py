"""Emulated key attestation for Managed HSM mode (``GET /keys/{name}/{version}/attestation``).

It proves nothing about hardware. The service's attestations come from the HSM's firmware, signed under
the HSM vendor's certificate chain; localvault's are statements signed by "localvault attestation CA —
proves nothing", whose private key is derived from a constant in this file, so anyone can make them.
They have the service's shape (``attributes.attestation`` with ``certificatePemFile``,
``privateKeyAttestation``, ``publicKeyAttestation`` for asymmetric keys only, and ``version``, each
blob base64url-encoded) and are a function of the key version alone: the same for the same version,
across restarts, backups and restores, and new for every new version.

Each blob is a compact JWS (EdDSA, the signer's certificate in ``x5c``) whose payload names the key
version and, for an asymmetric key, the RFC 7638 thumbprint of its public key; the public key's
attestation also carries the public JWK. An oct key's attestation holds nothing derived from its secret.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
from typing import Any, Dict, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from .jwk import b64url_encode
from .models import KeyVersion

CA_NAME = "localvault attestation CA — proves nothing"
SIGNER_NAME = "localvault attestation signer — proves nothing"
ATTESTATION_VERSION = "1.0"
STATEMENT = "emulated by localvault: this attestation proves nothing about hardware"
# Fixed dates and serial numbers: Ed25519 signatures are deterministic, so the chain is the same bytes
# in every process.
_NOT_BEFORE = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_COMPACT: Dict[str, Any] = {"separators": (",", ":"), "sort_keys": True, "ensure_ascii": False}
# RFC 7638: the members of a public JWK that its thumbprint covers.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "n"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}


def _key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"localvault {label}".encode()).digest())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "localvault"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    subject: str, key: Ed25519PrivateKey, issuer: str, issuer_key: Ed25519PrivateKey, serial: int, ca: bool
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, None)


@functools.lru_cache(maxsize=1)
def _chain() -> Tuple[Ed25519PrivateKey, x509.Certificate, x509.Certificate]:
    """The signer's key, its certificate and the CA's (self-signed) certificate."""
    ca_key, signer_key = _key("attestation CA"), _key("attestation signer")
    ca = _certificate(CA_NAME, ca_key, CA_NAME, ca_key, 1, ca=True)
    signer = _certificate(SIGNER_NAME, signer_key, CA_NAME, ca_key, 2, ca=False)
    return signer_key, signer, ca


def certificate_chain_pem() -> bytes:
    """The signer's certificate, then the CA's, in PEM."""
    _, signer, ca = _chain()
    return signer.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)


def thumbprint(key: KeyVersion) -> str:
    """RFC 7638 SHA-256 thumbprint of an asymmetric key's public JWK."""
    members = {name: key.jwk[name] for name in _THUMBPRINT_MEMBERS[key.family]}
    members["kty"] = key.family
    return b64url_encode(hashlib.sha256(json.dumps(members, **_COMPACT).encode()).digest())


def _jws(payload: Dict[str, Any]) -> bytes:
    signer_key, signer, _ = _chain()
    certificate = base64.b64encode(
        signer.public_bytes(serialization.Encoding.DER)
    ).decode()  # RFC 7515: not url
    header = {"alg": "EdDSA", "typ": "JWT", "x5c": [certificate]}
    signing_input = ".".join(
        b64url_encode(json.dumps(part, **_COMPACT).encode()) for part in (header, payload)
    ).encode()
    return signing_input + b"." + b64url_encode(signer_key.sign(signing_input)).encode()


def attestation(key: KeyVersion) -> Dict[str, str]:
    """``attributes.attestation`` for a key version."""
    about: Dict[str, Any] = {
        "name": key.name,
        "version": key.version,
        "kty": key.kty,
        "created": key.created,
        "statement": STATEMENT,
    }
    asymmetric = key.family != "oct"
    if asymmetric:
        about["jkt"] = thumbprint(key)
    result = {
        "certificatePemFile": b64url_encode(certificate_chain_pem()),
        "privateKeyAttestation": b64url_encode(_jws({**about, "attests": "private key"})),
    }
    if asymmetric:
        public = {**about, "attests": "public key", "jwk": dict(key.jwk)}
        result["publicKeyAttestation"] = b64url_encode(_jws(public))
    result["version"] = ATTESTATION_VERSION
    return result
