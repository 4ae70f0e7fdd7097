"""JSON Web Key conversion for RSA and EC keys, with ``cryptography`` doing the maths."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Dict, Union

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .exceptions import BadParameter

# An oct key is the bytes of its AES key.
PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, bytes]

CURVES: Dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-256K": ec.SECP256K1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_CURVE_NAMES = {type(curve).__name__: name for name, curve in CURVES.items()}
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


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


def _b64_to_int(jwk: Dict[str, Any], field: str) -> int:
    raw = jwk.get(field)
    if raw is None:
        raise BadParameter(f"The JSON Web Key is missing the '{field}' parameter.")
    data = b64url_decode(raw)
    if not data:
        raise BadParameter(f"The JSON Web Key parameter '{field}' is empty.")
    return int.from_bytes(data, "big")


def curve_name(key: ec.EllipticCurvePrivateKey) -> str:
    return _CURVE_NAMES[type(key.curve).__name__]


def public_jwk(key: PrivateKey) -> Dict[str, str]:
    """The public members only: ``n``/``e`` or ``crv``/``x``/``y``; none for an oct key."""
    if isinstance(key, bytes):
        return {}
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {"n": _int_to_b64(numbers.n), "e": _int_to_b64(numbers.e)}
    point = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    return {"crv": curve_name(key), "x": _int_to_b64(point.x, size), "y": _int_to_b64(point.y, size)}


def private_key_from_jwk(jwk: Dict[str, Any], family: str) -> PrivateKey:
    """Build a private key from an imported JWK; ``family`` is ``RSA``, ``EC`` or ``oct``."""
    if family == "oct":
        secret = b64url_decode(jwk["k"]) if isinstance(jwk.get("k"), str) else b""
        if len(secret) not in (16, 24, 32):
            raise BadParameter("The JSON Web Key's 'k' must be an AES key of 128, 192 or 256 bits.")
        return secret
    try:
        if family == "RSA":
            n, e, d = _b64_to_int(jwk, "n"), _b64_to_int(jwk, "e"), _b64_to_int(jwk, "d")
            p, q = _b64_to_int(jwk, "p"), _b64_to_int(jwk, "q")
            dp = _b64_to_int(jwk, "dp") if jwk.get("dp") else rsa.rsa_crt_dmp1(d, p)
            dq = _b64_to_int(jwk, "dq") if jwk.get("dq") else rsa.rsa_crt_dmq1(d, q)
            qi = _b64_to_int(jwk, "qi") if jwk.get("qi") else rsa.rsa_crt_iqmp(p, q)
            public = rsa.RSAPublicNumbers(e, n)
            return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, public).private_key()
        crv = jwk.get("crv")
        if crv not in CURVES:
            raise BadParameter(f"Invalid curve name: {crv!r}. Supported curves: {', '.join(CURVES)}.")
        d = _b64_to_int(jwk, "d")
        key = ec.derive_private_key(d, CURVES[crv])
        point = key.public_key().public_numbers()
        if (jwk.get("x"), jwk.get("y")) != (None, None) and (
            _b64_to_int(jwk, "x"),
            _b64_to_int(jwk, "y"),
        ) != (point.x, point.y):
            raise BadParameter("The JSON Web Key's public point does not match its private key.")
        return key
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadParameter(f"The JSON Web Key is not a valid {family} private key: {exc}") from None
