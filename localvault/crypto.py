"""The vault's cryptography: encrypt, decrypt, wrap, unwrap, sign, verify and random bytes, with
``cryptography`` doing the maths. No HTTP here; failures a caller caused raise BadParameter.

Keys are the store's private keys: an RSA, EC or Ed25519 (OKP) private key, or the bytes of an AES key
(oct). Digests are signed as given (the service never hashes); ES signatures are raw ``r||s``, HS
signatures an HMAC of the digest, and EdDSA signs the value given as the message (RFC 8032).
"""

from __future__ import annotations

import hmac
import os
from typing import Dict, NamedTuple, Optional, Tuple, Type

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, keywrap
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .exceptions import BadParameter
from .jwk import PrivateKey, curve_name

_SHA: Dict[str, Type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
RSA_ENCRYPTION = ("RSA1_5", "RSA-OAEP", "RSA-OAEP-256")
RSA_SIGNATURE = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_SIGNATURE = {"ES256": "P-256", "ES256K": "P-256K", "ES384": "P-384", "ES512": "P-521"}
HMAC_SIGNATURE = ("HS256", "HS384", "HS512")
EDDSA = "EdDSA"  # Ed25519 (OKP keys); the "digest" is the message itself
AES_GCM = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}
AES_CBC = {"A128CBC": 16, "A192CBC": 24, "A256CBC": 32}
AES_CBCPAD = {"A128CBCPAD": 16, "A192CBCPAD": 24, "A256CBCPAD": 32}
AES_KW = {"A128KW": 16, "A192KW": 24, "A256KW": 32}
CKM_WRAP = ("CKM_AES_KEY_WRAP", "CKM_AES_KEY_WRAP_PAD")
GCM_IV_BYTES, GCM_TAG_BYTES, CBC_IV_BYTES = 12, 16, 16
MAX_RANDOM_BYTES = 128

_SYMMETRIC_ENCRYPTION = (*AES_GCM, *AES_CBC, *AES_CBCPAD)
ALGORITHMS: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("RSA", "encrypt"): RSA_ENCRYPTION,
    ("RSA", "decrypt"): RSA_ENCRYPTION,
    ("RSA", "wrapKey"): RSA_ENCRYPTION,
    ("RSA", "unwrapKey"): RSA_ENCRYPTION,
    ("RSA", "sign"): RSA_SIGNATURE,
    ("RSA", "verify"): RSA_SIGNATURE,
    ("EC", "sign"): tuple(EC_SIGNATURE),
    ("EC", "verify"): tuple(EC_SIGNATURE),
    ("OKP", "sign"): (EDDSA,),
    ("OKP", "verify"): (EDDSA,),
    ("oct", "encrypt"): _SYMMETRIC_ENCRYPTION,
    ("oct", "decrypt"): _SYMMETRIC_ENCRYPTION,
    ("oct", "wrapKey"): (*AES_KW, *CKM_WRAP),
    ("oct", "unwrapKey"): (*AES_KW, *CKM_WRAP),
    ("oct", "sign"): HMAC_SIGNATURE,
    ("oct", "verify"): HMAC_SIGNATURE,
}
# Operations that need the private (or secret) part of the key; the others only its public part.
PRIVATE_OPERATIONS = frozenset({"decrypt", "sign", "unwrapKey"})
# Operations refused outside the key's nbf..exp window; the others stay allowed, so that data is never
# locked in by an expired key.
WINDOWED_OPERATIONS = frozenset({"encrypt", "sign", "wrapKey"})


# How the service names EC signing algorithms and the curves each takes in its refusal of a mismatch;
# ES256's words are recorded, the others follow their form.
EC_SIGNATURE_WORDS = {
    "ES256": ("ECDSA256", "'P-256' or 'SECP256K1'"),
    "ES256K": ("ECDSA256K", "'P-256K'"),
    "ES384": ("ECDSA384", "'P-384'"),
    "ES512": ("ECDSA512", "'P-521'"),
}


class IncompatibleCurve(BadParameter):
    """An EC signing algorithm for another curve; the service's message names the key's id."""

    def __init__(self, alg: str, curve: str) -> None:
        self.alg, self.curve = alg, curve
        super().__init__(self.message_for("this key"))

    def message_for(self, kid: str) -> str:
        name, curves = EC_SIGNATURE_WORDS[self.alg]
        return (
            f"Key and signing algorithm are incompatible. Key {kid} uses curve '{self.curve}', "
            f"and algorithm '{name}' can only be used with curve {curves}."
        )


class Encrypted(NamedTuple):
    value: bytes
    iv: Optional[bytes] = None
    tag: Optional[bytes] = None


def family(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "OKP"
    return "oct"


def needs_private_part(key: PrivateKey, operation: str) -> bool:
    """Whether ``operation`` uses secret material: always for symmetric keys."""
    return family(key) == "oct" or operation in PRIVATE_OPERATIONS


def check_algorithm(key: PrivateKey, operation: str, alg: str) -> None:
    """BadParameter unless ``alg`` fits the key's type, size or curve for ``operation``."""
    kind = family(key)
    if alg not in ALGORITHMS.get((kind, operation), ()):
        raise BadParameter(
            f"Algorithm '{alg}' is not supported for the {operation} operation with a {kind} key."
        )
    if alg in EC_SIGNATURE and EC_SIGNATURE[alg] != curve_name(key):  # type: ignore[arg-type]
        raise IncompatibleCurve(alg, curve_name(key))  # type: ignore[arg-type]
    needed = {**AES_GCM, **AES_CBC, **AES_CBCPAD, **AES_KW}.get(alg)
    if needed is not None and len(key) != needed:  # type: ignore[arg-type]
        raise BadParameter(
            f"Algorithm '{alg}' needs a {needed * 8}-bit key; this key has {len(key) * 8} bits."  # type: ignore[arg-type]
        )


# -- RSA ------------------------------------------------------------------------------------------


def _rsa_padding(alg: str) -> padding.AsymmetricPadding:
    if alg == "RSA1_5":
        return padding.PKCS1v15()
    digest = hashes.SHA1() if alg == "RSA-OAEP" else hashes.SHA256()
    return padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)


def _rsa_max_plaintext(key: rsa.RSAPrivateKey, alg: str) -> int:
    size = key.key_size // 8
    if alg == "RSA1_5":
        return size - 11
    return size - 2 * (20 if alg == "RSA-OAEP" else 32) - 2


def _rsa_encrypt(key: rsa.RSAPrivateKey, alg: str, plaintext: bytes) -> bytes:
    limit = _rsa_max_plaintext(key, alg)
    if len(plaintext) > limit:
        raise BadParameter(
            f"The value is too long: {len(plaintext)} bytes. {alg} with a {key.key_size}-bit key "
            f"takes at most {limit} bytes."
        )
    return key.public_key().encrypt(plaintext, _rsa_padding(alg))


def _rsa_decrypt(key: rsa.RSAPrivateKey, alg: str, ciphertext: bytes) -> bytes:
    if len(ciphertext) != key.key_size // 8:
        raise BadParameter(
            f"Invalid length of 'value': {len(ciphertext)} bytes. A {key.key_size}-bit key "
            f"decrypts {key.key_size // 8} bytes."
        )
    try:
        return key.decrypt(ciphertext, _rsa_padding(alg))
    except ValueError:
        raise BadParameter("The value could not be decrypted with this key and algorithm.") from None


# -- AES ------------------------------------------------------------------------------------------


def _iv(iv: Optional[bytes], size: int, alg: str) -> bytes:
    if iv is None or len(iv) != size:
        got = "none" if iv is None else f"{len(iv)} bytes"
        raise BadParameter(f"{alg} needs an iv of {size} bytes; got {got}.")
    return iv


def _cbc(key: bytes, iv: bytes) -> Cipher:
    return Cipher(algorithms.AES(key), modes.CBC(iv))


def _aes_encrypt(
    key: bytes, alg: str, plaintext: bytes, iv: Optional[bytes], aad: Optional[bytes]
) -> Encrypted:
    if alg in AES_GCM:
        if iv is not None:
            raise BadParameter(f"{alg} takes no iv: the vault makes one and returns it with the result.")
        nonce = os.urandom(GCM_IV_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
        return Encrypted(sealed[:-GCM_TAG_BYTES], nonce, sealed[-GCM_TAG_BYTES:])
    iv = _iv(iv, CBC_IV_BYTES, alg)
    if alg in AES_CBCPAD:
        padder = block_padding.PKCS7(128).padder()
        plaintext = padder.update(plaintext) + padder.finalize()
    else:  # no padding: a partial last block is filled with zero bytes, as a Managed HSM does
        plaintext += b"\0" * (-len(plaintext) % 16)
    encryptor = _cbc(key, iv).encryptor()
    return Encrypted(encryptor.update(plaintext) + encryptor.finalize(), iv)


def _aes_decrypt(
    key: bytes, alg: str, ciphertext: bytes, iv: Optional[bytes], tag: Optional[bytes], aad: Optional[bytes]
) -> bytes:
    failed = BadParameter("The value could not be decrypted with this key, iv, tag and algorithm.")
    if alg in AES_GCM:
        nonce = _iv(iv, GCM_IV_BYTES, alg)
        if tag is None or len(tag) != GCM_TAG_BYTES:
            raise BadParameter(f"{alg} needs the {GCM_TAG_BYTES}-byte tag that encryption returned.")
        try:
            return AESGCM(key).decrypt(nonce, ciphertext + tag, aad)
        except InvalidTag:
            raise failed from None
    iv = _iv(iv, CBC_IV_BYTES, alg)
    if len(ciphertext) % 16:
        raise BadParameter(f"{alg} decrypts whole 16-byte blocks; the value has {len(ciphertext)} bytes.")
    decryptor = _cbc(key, iv).decryptor()
    plaintext = decryptor.update(ciphertext) + decryptor.finalize()
    if alg in AES_CBCPAD:
        unpadder = block_padding.PKCS7(128).unpadder()
        try:
            plaintext = unpadder.update(plaintext) + unpadder.finalize()
        except ValueError:
            raise failed from None
    return plaintext


def _aes_wrap(key: bytes, alg: str, data: bytes) -> bytes:
    if alg == "CKM_AES_KEY_WRAP_PAD":
        return keywrap.aes_key_wrap_with_padding(key, data)
    if len(data) < 16 or len(data) % 8:
        raise BadParameter(f"{alg} wraps keys of 16 bytes or more in 8-byte steps; got {len(data)} bytes.")
    return keywrap.aes_key_wrap(key, data)


def _aes_unwrap(key: bytes, alg: str, data: bytes) -> bytes:
    try:
        if alg == "CKM_AES_KEY_WRAP_PAD":
            return keywrap.aes_key_unwrap_with_padding(key, data)
        return keywrap.aes_key_unwrap(key, data)
    except (keywrap.InvalidUnwrap, ValueError):
        raise BadParameter("The value could not be unwrapped with this key and algorithm.") from None


# -- the operations -------------------------------------------------------------------------------


def encrypt(
    key: PrivateKey, alg: str, plaintext: bytes, iv: Optional[bytes] = None, aad: Optional[bytes] = None
) -> Encrypted:
    check_algorithm(key, "encrypt", alg)
    if isinstance(key, rsa.RSAPrivateKey):
        if iv is not None or aad is not None:
            raise BadParameter(f"{alg} takes no iv and no aad.")
        return Encrypted(_rsa_encrypt(key, alg, plaintext))
    return _aes_encrypt(key, alg, plaintext, iv, aad)  # type: ignore[arg-type]


def decrypt(
    key: PrivateKey,
    alg: str,
    ciphertext: bytes,
    iv: Optional[bytes] = None,
    tag: Optional[bytes] = None,
    aad: Optional[bytes] = None,
) -> bytes:
    check_algorithm(key, "decrypt", alg)
    if isinstance(key, rsa.RSAPrivateKey):
        if iv is not None or tag is not None or aad is not None:
            raise BadParameter(f"{alg} takes no iv, tag or aad.")
        return _rsa_decrypt(key, alg, ciphertext)
    return _aes_decrypt(key, alg, ciphertext, iv, tag, aad)  # type: ignore[arg-type]


def wrap_key(key: PrivateKey, alg: str, data: bytes) -> bytes:
    check_algorithm(key, "wrapKey", alg)
    if isinstance(key, rsa.RSAPrivateKey):
        return _rsa_encrypt(key, alg, data)
    return _aes_wrap(key, alg, data)  # type: ignore[arg-type]


def unwrap_key(key: PrivateKey, alg: str, data: bytes) -> bytes:
    check_algorithm(key, "unwrapKey", alg)
    if isinstance(key, rsa.RSAPrivateKey):
        return _rsa_decrypt(key, alg, data)
    return _aes_unwrap(key, alg, data)  # type: ignore[arg-type]


def _hash(alg: str, digest: bytes) -> hashes.HashAlgorithm:
    """The hash an algorithm names, after checking that the digest has its length."""
    chosen = _SHA[alg[2:5]]()
    if len(digest) != chosen.digest_size:
        raise BadParameter(
            f"Invalid length of 'value': {len(digest)} bytes. {alg} requires {chosen.digest_size} bytes, "
            "encoded with base64url."
        )
    return chosen


def _rsa_signature_padding(alg: str, chosen: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    if alg.startswith("PS"):
        return padding.PSS(mgf=padding.MGF1(chosen), salt_length=chosen.digest_size)
    return padding.PKCS1v15()


def _ec_size(key: ec.EllipticCurvePrivateKey) -> int:
    return (key.curve.key_size + 7) // 8


def sign(key: PrivateKey, alg: str, digest: bytes) -> bytes:
    check_algorithm(key, "sign", alg)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    chosen = _hash(alg, digest)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, _rsa_signature_padding(alg, chosen), utils.Prehashed(chosen))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = utils.decode_dss_signature(key.sign(digest, ec.ECDSA(utils.Prehashed(chosen))))
        size = _ec_size(key)
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return hmac.new(key, digest, chosen.name).digest()


def verify(key: PrivateKey, alg: str, digest: bytes, signature: bytes) -> bool:
    check_algorithm(key, "verify", alg)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        try:
            key.public_key().verify(signature, digest)
        except InvalidSignature:
            return False
        return True
    chosen = _hash(alg, digest)
    if isinstance(key, rsa.RSAPrivateKey):
        try:
            key.public_key().verify(
                signature, digest, _rsa_signature_padding(alg, chosen), utils.Prehashed(chosen)
            )
        except (InvalidSignature, ValueError):
            return False
        return True
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = _ec_size(key)
        if len(signature) != 2 * size:
            return False
        r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        try:
            key.public_key().verify(
                utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(chosen))
            )
        except (InvalidSignature, ValueError):
            return False
        return True
    return hmac.compare_digest(hmac.new(key, digest, chosen.name).digest(), signature)


def random_bytes(count: int) -> bytes:
    if not 1 <= count <= MAX_RANDOM_BYTES:
        raise BadParameter(f"Invalid count: {count}. The value must be between 1 and {MAX_RANDOM_BYTES}.")
    return os.urandom(count)
