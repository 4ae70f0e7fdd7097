"""JSON Web Key conversion for RSA, EC and OKP (Ed25519) keys, and key generation, with ``cryptography`` doing the maths."""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any, Dict, Optional, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .exceptions import BadParameter
from .workers import INLINE, CryptoWorkers

# An oct key is the bytes of its AES key; an OKP key is an Ed25519 key (Managed HSM only).
PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, bytes]

CURVES: Dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-256K": ec.SECP256K1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
KEY_TYPES = {
    "RSA": "RSA",
    "RSA-HSM": "RSA",
    "EC": "EC",
    "EC-HSM": "EC",
    "oct": "oct",
    "oct-HSM": "oct",
    "OKP": "OKP",
    "OKP-HSM": "OKP",
}
MANAGED_HSM_TYPES = {"oct", "oct-HSM", "OKP", "OKP-HSM"}
OKP_CURVES = ("Ed25519",)
ED25519_BYTES = 32
RSA_SIZES = (2048, 3072, 4096)
RSA_EXPONENTS = (3, 65537)  # a key vault's
MAX_HSM_RSA_EXPONENT = 2**31 - 1  # a Managed HSM takes any odd exponent of keys.json's int32 from 3
SYMMETRIC_SIZES = (128, 192, 256)
_CURVE_NAMES = {type(curve).__name__: name for name, curve in CURVES.items()}
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
MAX_RSA_EXPONENT_BYTES = 8  # OpenSSL refuses longer public exponents for keys over 3072 bits


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise BadParameter("Expected a base64url-encoded string.")
    if not _BASE64URL.match(text) or len(text.rstrip("=")) % 4 == 1:
        raise BadParameter("The value is not valid base64url.")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadParameter("The value is not valid base64url.") from None


def _int_to_b64(value: int, length: int = 0) -> str:
    length = length or max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(length, "big"))


def _octets(jwk: Dict[str, Any], field: str) -> bytes:
    """A member's big-endian value without leading zero bytes, which some encoders add."""
    raw = jwk.get(field)
    if raw is None:
        raise BadParameter(f"The JSON Web Key is missing the '{field}' parameter.")
    data = b64url_decode(raw).lstrip(b"\0")
    if not data:
        raise BadParameter(f"The JSON Web Key parameter '{field}' is empty.")
    return data


def _b64_to_int(jwk: Dict[str, Any], field: str, max_bytes: int) -> int:
    """A member as a number, refused before any arithmetic if it is longer than the key allows:
    cryptography's checks of huge numbers would hold the interpreter for minutes."""
    data = _octets(jwk, field)
    if len(data) > max_bytes:
        raise BadParameter(
            f"The JSON Web Key parameter '{field}' is too long for this key: "
            f"{len(data)} bytes, at most {max_bytes}."
        )
    return int.from_bytes(data, "big")


def rsa_modulus_bits(jwk: Dict[str, Any]) -> int:
    """The size of an RSA JWK's modulus ``n``, found without building the number."""
    data = _octets(jwk, "n")
    return 8 * (len(data) - 1) + data[0].bit_length()


def curve_name(key: ec.EllipticCurvePrivateKey) -> str:
    return _CURVE_NAMES[type(key.curve).__name__]


def public_jwk(key: PrivateKey) -> Dict[str, str]:
    """The public members only: ``n``/``e``, ``crv``/``x``/``y`` or (OKP) ``crv``/``x``; none for an oct key."""
    if isinstance(key, bytes):
        return {}
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "x": b64url_encode(raw)}
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {"n": _int_to_b64(numbers.n), "e": _int_to_b64(numbers.e)}
    point = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    return {"crv": curve_name(key), "x": _int_to_b64(point.x, size), "y": _int_to_b64(point.y, size)}


def private_key_from_jwk(
    jwk: Dict[str, Any], family: str, workers: Optional[CryptoWorkers] = None
) -> PrivateKey:
    """Build a private key from an imported JWK; ``family`` is ``RSA``, ``EC`` or ``oct``. Every member
    is bounded by the key's size (an RSA modulus the caller has bounded, the curve, or AES sizes) before use."""
    if family == "oct":
        secret = b64url_decode(jwk["k"]) if isinstance(jwk.get("k"), str) else b""
        if len(secret) not in (16, 24, 32):
            raise BadParameter("The JSON Web Key's 'k' must be an AES key of 128, 192 or 256 bits.")
        return secret
    try:
        if family == "RSA":
            size = len(_octets(jwk, "n"))
            half = (size + 1) // 2 + 1  # p and q of a modulus, and numbers modulo them
            limits = {"n": size, "e": MAX_RSA_EXPONENT_BYTES, "d": size, "p": half, "q": half}
            optional = {"dp": half, "dq": half, "qi": half}
            limits.update((name, limit) for name, limit in optional.items() if jwk.get(name))
            v = {name: _b64_to_int(jwk, name, limit) for name, limit in limits.items()}  # all, then maths
            n, e, d, p, q = v["n"], v["e"], v["d"], v["p"], v["q"]
            dp = v["dp"] if "dp" in v else rsa.rsa_crt_dmp1(d, p)
            dq = v["dq"] if "dq" in v else rsa.rsa_crt_dmq1(d, q)
            qi = v["qi"] if "qi" in v else rsa.rsa_crt_iqmp(p, q)
            return (workers or INLINE).rsa_private_key((p, q, d, dp, dq, qi, e, n))
        if family == "OKP":
            return _okp_private_key(jwk)
        crv = jwk.get("crv")
        if crv not in CURVES:
            raise BadParameter(f"Invalid curve name: {crv!r}. Supported curves: {', '.join(CURVES)}.")
        size = (CURVES[crv].key_size + 7) // 8
        d = _b64_to_int(jwk, "d", size)
        given = None
        if (jwk.get("x"), jwk.get("y")) != (None, None):
            given = (_b64_to_int(jwk, "x", size), _b64_to_int(jwk, "y", size))
        key = ec.derive_private_key(d, CURVES[crv])
        point = key.public_key().public_numbers()
        if given is not None and given != (point.x, point.y):
            raise BadParameter("The JSON Web Key's public point does not match its private key.")
        return key
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadParameter(f"The JSON Web Key is not a valid {family} private key: {exc}") from None


def _check_okp_curve(crv: Any) -> None:
    if crv not in OKP_CURVES:
        raise BadParameter(f"Invalid curve name: {crv!r}. Supported curves: {', '.join(OKP_CURVES)}.")


def _okp_private_key(jwk: Dict[str, Any]) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key from its 32-byte ``d`` (RFC 8037), checked against ``x`` if given."""
    _check_okp_curve(jwk.get("crv"))
    raw = jwk.get("d")
    d = b64url_decode(raw) if isinstance(raw, str) else b""
    if len(d) != ED25519_BYTES:
        raise BadParameter(f"The JSON Web Key's 'd' must be an Ed25519 private key of {ED25519_BYTES} bytes.")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(d)
    if jwk.get("x") is not None and jwk["x"] != public_jwk(key)["x"]:
        raise BadParameter("The JSON Web Key's public key does not match its private key.")
    return key


# -- generation ------------------------------------------------------------------------------------


def check_kty(kty: Any, managed_hsm: bool) -> str:
    if not isinstance(kty, str):
        raise BadParameter("The key type (kty) must be a string.")
    if kty not in KEY_TYPES or (kty in MANAGED_HSM_TYPES and not managed_hsm):  # oct: Managed HSM only
        raise BadParameter(f"Invalid kty value: {kty[:64]}", inner_code="KeyTypeNotSupported")
    return kty


def generate_symmetric_key(bits: int) -> bytes:
    if bits not in SYMMETRIC_SIZES:
        raise BadParameter(f"Invalid key size: {bits}. oct-HSM keys must be 128, 192 or 256 bits.")
    return os.urandom(bits // 8)


def generate_key(
    kty: str,
    key_size: Optional[int],
    public_exponent: Optional[int],
    crv: Optional[str],
    managed_hsm: bool = False,
    workers: Optional[CryptoWorkers] = None,
) -> PrivateKey:
    """Generate a private key as a Premium vault (or a Managed HSM) would; BadParameter for what it rejects."""
    family = KEY_TYPES[check_kty(kty, managed_hsm)]
    if family == "oct":
        return generate_symmetric_key(256 if key_size is None else key_size)
    if family == "OKP":
        _check_okp_curve("Ed25519" if crv is None else crv)
        return ed25519.Ed25519PrivateKey.generate()
    if family == "RSA":
        size = 2048 if key_size is None else key_size
        if size not in RSA_SIZES:
            raise BadParameter(f"Invalid key size: {size}. RSA keys must be 2048, 3072 or 4096 bits.")
        exponent = 65537 if public_exponent is None else public_exponent
        if managed_hsm:
            if not (3 <= exponent <= MAX_HSM_RSA_EXPONENT and exponent % 2):
                shown = exponent if abs(exponent) <= 2**64 else "out of range"
                raise BadParameter(
                    f"Invalid public exponent: {shown}. It must be odd, from 3 to {MAX_HSM_RSA_EXPONENT}."
                )
        elif exponent not in RSA_EXPONENTS:
            raise BadParameter(f"Invalid public exponent: {exponent}. Supported values: 3, 65537.")
        return (workers or INLINE).generate_rsa(size, exponent)
    curve = "P-256" if crv is None else crv
    if curve not in CURVES:
        raise BadParameter(f"Invalid curve name: {curve!r}. Supported curves: {', '.join(CURVES)}.")
    return ec.generate_private_key(CURVES[curve])


def regenerate_key(
    kty: str, key: PrivateKey, workers: Optional[CryptoWorkers] = None, managed_hsm: bool = False
) -> PrivateKey:
    """A fresh private key of type ``kty`` and of the same size or curve (and public exponent) as ``key``."""
    if isinstance(key, bytes):  # oct-HSM: only a Managed HSM has them
        return generate_key(kty, len(key) * 8, None, None, managed_hsm=True)
    if isinstance(key, ed25519.Ed25519PrivateKey):  # OKP-HSM: likewise
        return generate_key(kty, None, None, None, managed_hsm=True)
    if isinstance(key, rsa.RSAPrivateKey):
        e = key.public_key().public_numbers().e
        return generate_key(kty, key.key_size, e, None, managed_hsm=managed_hsm, workers=workers)
    return generate_key(kty, None, None, curve_name(key))
