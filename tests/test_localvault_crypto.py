"""Cryptographic operations on RSA and EC keys in the default (Premium key vault) mode.

Each algorithm goes through the real CryptographyClient (which encrypts, wraps and verifies locally
with the public key and asks the vault to decrypt, unwrap and sign) and through the raw REST API, so
the vault's own encrypt, wrap and verify are exercised too. Keys are imported from private keys made
here, so every result is cross-checked with ``cryptography``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from datetime import datetime, timedelta, timezone
from typing import Any, Dict
from urllib.parse import urlsplit

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import JsonWebKey
from azure.keyvault.keys.crypto import EncryptionAlgorithm, KeyWrapAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from helpers import error_of

RSA_ENCRYPTION = ["RSA1_5", "RSA-OAEP", "RSA-OAEP-256"]
RSA_SIGNATURES = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
EC_SIGNATURES = {"ES256": "P-256", "ES256K": "P-256K", "ES384": "P-384", "ES512": "P-521"}
CURVES = {"P-256": ec.SECP256R1(), "P-256K": ec.SECP256K1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _bytes(value: int, length: int = 0) -> bytes:
    return value.to_bytes(length or (value.bit_length() + 7) // 8, "big")


@functools.cache
def local_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def local_ec(curve: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVES[curve])


def rsa_jwk(key: rsa.RSAPrivateKey, kty: str) -> JsonWebKey:
    numbers = key.private_numbers()
    public = numbers.public_numbers
    return JsonWebKey(
        kty=kty,
        n=_bytes(public.n),
        e=_bytes(public.e),
        d=_bytes(numbers.d),
        p=_bytes(numbers.p),
        q=_bytes(numbers.q),
        dp=_bytes(numbers.dmp1),
        dq=_bytes(numbers.dmq1),
        qi=_bytes(numbers.iqmp),
    )


def ec_jwk(key: ec.EllipticCurvePrivateKey, kty: str, crv: str) -> JsonWebKey:
    size = (key.curve.key_size + 7) // 8
    point = key.public_key().public_numbers()
    return JsonWebKey(
        kty=kty,
        crv=crv,
        x=_bytes(point.x, size),
        y=_bytes(point.y, size),
        d=_bytes(key.private_numbers().private_value, size),
    )


def digest_for(alg: str) -> bytes:
    return hashlib.new("sha" + alg[2:5], os.urandom(64)).digest()


def rsa_padding(alg: str) -> padding.AsymmetricPadding:
    if alg == "RSA1_5":
        return padding.PKCS1v15()
    chosen = hashes.SHA1() if alg == "RSA-OAEP" else hashes.SHA256()
    return padding.OAEP(mgf=padding.MGF1(chosen), algorithm=chosen, label=None)


def rsa_signature_padding(alg: str) -> padding.AsymmetricPadding:
    chosen = HASHES[alg[2:5]]
    if alg.startswith("PS"):
        return padding.PSS(mgf=padding.MGF1(chosen), salt_length=chosen.digest_size)
    return padding.PKCS1v15()


def verify_ec_locally(key: ec.EllipticCurvePublicKey, alg: str, digest: bytes, signature: bytes) -> None:
    size = (key.curve.key_size + 7) // 8
    assert len(signature) == 2 * size  # raw r||s, as the service returns it
    der = utils.encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    key.verify(der, digest, ec.ECDSA(utils.Prehashed(HASHES[alg[2:5]])))


def operate(raw: Any, key_id: str, operation: str, **body: Any) -> Any:
    """The vault's own operation over raw REST, e.g. ``operate(raw, key.id, "encrypt", alg=..., value=...)``."""
    return raw.request("POST", f"{urlsplit(key_id).path}/{operation}", json=body)


def sdk_error(excinfo: Any) -> tuple:
    error = excinfo.value
    inner = (error.error.innererror or {}).get("code") if error.error else None
    return error.status_code, error.error.code, inner


@pytest.fixture
def import_rsa(key_client, unique_key_name):
    def make(kty: str = "RSA", key_ops: Any = None, **kwargs: Any) -> Any:
        jwk = rsa_jwk(local_rsa(), kty)
        jwk.key_ops = key_ops
        return key_client.import_key(unique_key_name, jwk, hardware_protected=kty.endswith("-HSM"), **kwargs)

    return make


# -- RSA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kty", ["RSA", "RSA-HSM"])
@pytest.mark.parametrize("alg", RSA_ENCRYPTION)
@pytest.mark.parametrize("forward,backward", [("encrypt", "decrypt"), ("wrapkey", "unwrapkey")])
def test_rsa_encrypt_decrypt_wrap_unwrap(import_rsa, crypto_client, raw, kty, alg, forward, backward):
    key = import_rsa(kty)
    assert key.key.kty == kty
    client = crypto_client(key.id)
    secret = os.urandom(32)
    if forward == "encrypt":
        there = lambda data: client.encrypt(EncryptionAlgorithm(alg), data).ciphertext  # noqa: E731
        back = lambda data: client.decrypt(EncryptionAlgorithm(alg), data).plaintext  # noqa: E731
    else:
        there = lambda data: client.wrap_key(KeyWrapAlgorithm(alg), data).encrypted_key  # noqa: E731
        back = lambda data: client.unwrap_key(KeyWrapAlgorithm(alg), data).key  # noqa: E731

    # The SDK encrypts or wraps locally with the public key; the vault decrypts or unwraps.
    assert back(there(secret)) == secret
    # So does ciphertext made here with cryptography.
    assert back(local_rsa().public_key().encrypt(secret, rsa_padding(alg))) == secret

    # The vault's own encrypt or wrap: its result decrypts here with the private key, and in the vault.
    response = operate(raw, key.id, forward, alg=alg, value=b64(secret))
    assert response.status_code == 200, response.text
    assert response.json()["kid"] == key.id
    assert local_rsa().decrypt(unb64(response.json()["value"]), rsa_padding(alg)) == secret
    response = operate(raw, key.id, backward, alg=alg, value=response.json()["value"])
    assert unb64(response.json()["value"]) == secret


@pytest.mark.parametrize("kty", ["RSA", "RSA-HSM"])
@pytest.mark.parametrize("alg", RSA_SIGNATURES)
def test_rsa_sign_and_verify(import_rsa, crypto_client, raw, kty, alg):
    key = import_rsa(kty)
    client = crypto_client(key.id)
    digest = digest_for(alg)

    signature = client.sign(alg, digest).signature  # the vault signs
    local_rsa().public_key().verify(
        signature, digest, rsa_signature_padding(alg), utils.Prehashed(HASHES[alg[2:5]])
    )
    assert client.verify(alg, digest, signature).is_valid  # the SDK verifies locally

    # The vault's own verify: true for a signature made here, false for a wrong one.
    local = local_rsa().sign(digest, rsa_signature_padding(alg), utils.Prehashed(HASHES[alg[2:5]]))
    response = operate(raw, key.id, "verify", alg=alg, digest=b64(digest), value=b64(local))
    assert response.status_code == 200, response.text
    assert response.json() == {"value": True}
    flipped = bytes([local[0] ^ 1]) + local[1:]
    response = operate(raw, key.id, "verify", alg=alg, digest=b64(digest), value=b64(flipped))
    assert response.json() == {"value": False}


# -- EC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kty", ["EC", "EC-HSM"])
@pytest.mark.parametrize("alg", EC_SIGNATURES)
def test_ec_sign_and_verify(key_client, crypto_client, raw, unique_key_name, kty, alg):
    crv = EC_SIGNATURES[alg]
    local = local_ec(crv)
    key = key_client.import_key(unique_key_name, ec_jwk(local, kty, crv), hardware_protected=kty == "EC-HSM")
    assert key.key.kty == kty
    client = crypto_client(key.id)
    digest = digest_for(alg)

    signature = client.sign(alg, digest).signature
    verify_ec_locally(local.public_key(), alg, digest, signature)
    assert client.verify(SignatureAlgorithm(alg), digest, signature).is_valid

    mine = local.sign(digest, ec.ECDSA(utils.Prehashed(HASHES[alg[2:5]])))
    size = (local.curve.key_size + 7) // 8
    r, s = utils.decode_dss_signature(mine)
    raw_signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    response = operate(raw, key.id, "verify", alg=alg, digest=b64(digest), value=b64(raw_signature))
    assert response.json() == {"value": True}
    response = operate(raw, key.id, "verify", alg=alg, digest=b64(digest), value=b64(signature[::-1]))
    assert response.json() == {"value": False}


def test_generated_keys_sign_for_their_public_jwk(key_client, crypto_client, unique_key_name):
    rsa_key = key_client.create_rsa_key(unique_key_name + "-rsa", size=2048)
    ec_key = key_client.create_ec_key(unique_key_name + "-ec", curve="P-384", hardware_protected=True)
    digest = digest_for("ES384")

    signature = crypto_client(rsa_key.id).sign(SignatureAlgorithm.ps384, digest).signature
    public = rsa.RSAPublicNumbers(
        int.from_bytes(rsa_key.key.e, "big"), int.from_bytes(rsa_key.key.n, "big")
    ).public_key()
    public.verify(signature, digest, rsa_signature_padding("PS384"), utils.Prehashed(hashes.SHA384()))

    signature = crypto_client(ec_key.id).sign(SignatureAlgorithm.es384, digest).signature
    point = ec.EllipticCurvePublicNumbers(
        int.from_bytes(ec_key.key.x, "big"), int.from_bytes(ec_key.key.y, "big"), ec.SECP384R1()
    )
    verify_ec_locally(point.public_key(), "ES384", digest, signature)


def test_empty_version_means_the_latest(key_client, raw, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    latest = key_client.create_ec_key(unique_key_name)
    response = raw.request(
        "POST", f"/keys/{unique_key_name}//sign", json={"alg": "ES256", "value": b64(digest_for("ES256"))}
    )
    assert response.status_code == 200, response.text
    assert response.json()["kid"] == latest.id


def test_crypto_client_by_name_uses_the_latest_version(localvault, key_client, unique_key_name):
    key = key_client.create_ec_key(unique_key_name)
    with localvault.crypto_client(unique_key_name) as client:
        result = client.sign(SignatureAlgorithm.es256, digest_for("ES256"))
    assert result.key_id == key.id


# -- refusals -------------------------------------------------------------------------------------


def test_operation_not_in_key_ops_is_forbidden(import_rsa, crypto_client, raw):
    key = import_rsa(key_ops=["verify", "encrypt"])
    with pytest.raises(HttpResponseError) as excinfo:
        crypto_client(key.id).sign(SignatureAlgorithm.rs256, digest_for("RS256"))
    assert sdk_error(excinfo) == (403, "Forbidden", "KeyOperationForbidden")
    response = operate(raw, key.id, "decrypt", alg="RSA-OAEP", value=b64(os.urandom(256)))
    assert response.status_code == 403
    assert error_of(response)["message"] == "Operation decrypt is not permitted on this key."


def test_disabled_key_refuses_operations_on_its_private_part(import_rsa, key_client, crypto_client, raw):
    key = import_rsa()
    key_client.update_key_properties(key.name, enabled=False)
    client = crypto_client(key.id)
    digest = digest_for("RS256")
    for call in (
        lambda: client.sign(SignatureAlgorithm.rs256, digest),
        lambda: client.decrypt(EncryptionAlgorithm.rsa_oaep, os.urandom(256)),
        lambda: client.unwrap_key(KeyWrapAlgorithm.rsa_oaep, os.urandom(256)),
    ):
        with pytest.raises(HttpResponseError) as excinfo:
            call()
        assert sdk_error(excinfo) == (403, "Forbidden", "KeyDisabled")
    # Operations on the public part still answer, as the service's do.
    local = local_rsa().sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    response = operate(raw, key.id, "verify", alg="RS256", digest=b64(digest), value=b64(local))
    assert response.json() == {"value": True}


def test_key_before_nbf_refuses_encrypt_sign_and_wrap(import_rsa, raw):
    key = import_rsa(not_before=datetime.now(timezone.utc) + timedelta(days=1))
    for operation, alg, value in (
        ("sign", "RS256", digest_for("RS256")),
        ("encrypt", "RSA-OAEP", b"x"),
        ("wrapkey", "RSA-OAEP", os.urandom(32)),
    ):
        response = operate(raw, key.id, operation, alg=alg, value=b64(value))
        assert response.status_code == 403, operation
        assert error_of(response)["innererror"] == {"code": "KeyNotYetValid"}


def test_expired_key_refuses_sign_after_the_clock_moves_but_still_decrypts(
    localvault, import_rsa, crypto_client, raw
):
    key = import_rsa(expires_on=datetime.now(timezone.utc) + timedelta(days=1))
    client = crypto_client(key.id)
    digest = digest_for("RS256")
    assert client.sign(SignatureAlgorithm.rs256, digest).signature
    ciphertext = local_rsa().public_key().encrypt(b"kept", rsa_padding("RSA-OAEP"))

    localvault.clock.advance(days=2)
    with pytest.raises(HttpResponseError) as excinfo:
        client.sign(SignatureAlgorithm.rs256, digest)
    assert sdk_error(excinfo) == (403, "Forbidden", "KeyExpired")
    response = operate(raw, key.id, "encrypt", alg="RSA-OAEP", value=b64(b"new"))
    assert error_of(response)["innererror"] == {"code": "KeyExpired"}
    # Data encrypted before expiry is never locked in.
    assert client.decrypt(EncryptionAlgorithm.rsa_oaep, ciphertext).plaintext == b"kept"


@pytest.mark.parametrize(
    "operation,alg",
    [("sign", "ES256"), ("sign", "HS256"), ("encrypt", "A256GCM"), ("wrapkey", "A256KW"), ("sign", "RSNULL")],
)
def test_algorithm_wrong_for_an_rsa_key_is_a_bad_parameter(import_rsa, raw, operation, alg):
    key = import_rsa()
    response = operate(raw, key.id, operation, alg=alg, value=b64(os.urandom(32)))
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


def test_algorithm_wrong_for_an_ec_key_or_its_curve(key_client, crypto_client, raw, unique_key_name):
    key = key_client.create_ec_key(unique_key_name, curve="P-256")
    with pytest.raises(HttpResponseError) as excinfo:
        crypto_client(key.id).sign(SignatureAlgorithm.es384, digest_for("ES384"))
    assert sdk_error(excinfo)[:2] == (400, "BadParameter")
    assert "P-384" in excinfo.value.message
    digest = b64(digest_for("RS256"))
    response = operate(raw, key.id, "verify", alg="RS256", digest=digest, value=b64(os.urandom(64)))
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


@pytest.mark.parametrize("alg,length", [("RS256", 20), ("RS384", 32), ("PS512", 48), ("RS256", 64)])
def test_digest_of_the_wrong_length_is_refused(import_rsa, crypto_client, alg, length):
    key = import_rsa()
    with pytest.raises(HttpResponseError) as excinfo:
        crypto_client(key.id).sign(SignatureAlgorithm(alg), os.urandom(length))
    assert sdk_error(excinfo)[:2] == (400, "BadParameter")
    assert f"Invalid length of 'value': {length} bytes" in excinfo.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"alg": "RSA-OAEP", "value": "not base64url!"},
        {"alg": "RSA-OAEP", "value": "aGVsbG8+/w"},  # standard base64, not base64url
        {"alg": "RSA-OAEP", "value": "a"},
        {"alg": "RSA-OAEP", "value": ""},
        {"alg": "RSA-OAEP"},
        {"value": "aGVsbG8"},
        {"alg": 5, "value": "aGVsbG8"},
        {"alg": "RSA-OAEP", "value": ["aGVsbG8"]},
    ],
)
def test_malformed_bodies_are_bad_parameters(import_rsa, raw, body: Dict[str, Any]):
    key = import_rsa()
    response = operate(raw, key.id, "encrypt", **body)
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


@pytest.mark.parametrize("alg,limit", [("RSA1_5", 245), ("RSA-OAEP", 214), ("RSA-OAEP-256", 190)])
def test_plaintext_too_long_for_the_algorithm(import_rsa, raw, alg, limit):
    key = import_rsa()
    assert operate(raw, key.id, "encrypt", alg=alg, value=b64(os.urandom(limit))).status_code == 200
    response = operate(raw, key.id, "encrypt", alg=alg, value=b64(os.urandom(limit + 1)))
    assert response.status_code == 400
    assert f"at most {limit} bytes" in error_of(response)["message"]


def test_ciphertext_that_does_not_decrypt_is_a_bad_parameter(import_rsa, raw):
    key = import_rsa()
    response = operate(raw, key.id, "decrypt", alg="RSA-OAEP-256", value=b64(os.urandom(256)))
    assert response.status_code == 400
    response = operate(raw, key.id, "decrypt", alg="RSA-OAEP-256", value=b64(os.urandom(100)))
    assert response.status_code == 400


def test_operation_on_a_missing_key_is_key_not_found(localvault, crypto_client, unique_key_name):
    with pytest.raises(HttpResponseError) as excinfo:
        crypto_client(unique_key_name).sign(SignatureAlgorithm.rs256, digest_for("RS256"))
    assert sdk_error(excinfo)[:2] == (404, "KeyNotFound")


# -- what only a Managed HSM (or an attestation service) does -------------------------------------


def test_random_bytes_are_refused_by_a_key_vault(key_client):
    with pytest.raises(HttpResponseError) as excinfo:
        key_client.get_random_bytes(16)
    assert sdk_error(excinfo)[:2] == (400, "BadParameter")
    assert "Managed HSM" in excinfo.value.message


def test_oct_keys_are_refused_by_a_key_vault(key_client, unique_key_name):
    for hardware_protected in (False, True):
        with pytest.raises(HttpResponseError) as excinfo:
            key_client.create_oct_key(unique_key_name, size=256, hardware_protected=hardware_protected)
        assert sdk_error(excinfo)[:2] == (400, "BadParameter")
    with pytest.raises(HttpResponseError) as excinfo:
        key_client.import_key(unique_key_name, JsonWebKey(kty="oct-HSM", k=os.urandom(32)))
    assert sdk_error(excinfo)[:2] == (400, "BadParameter")


def test_release_of_a_key_that_is_not_exportable_is_refused(import_rsa, key_client, raw):
    key = import_rsa()
    with pytest.raises(HttpResponseError) as excinfo:
        key_client.release_key(key.name, "an-attestation-token")
    assert sdk_error(excinfo)[:2] == (400, "BadParameter")
    assert "not exportable" in excinfo.value.message
    response = raw.request("POST", f"/keys/{key.name}//release", json={"target": ""})
    assert response.status_code == 400
    response = raw.request("POST", "/keys/no-such-key//release", json={"target": "t"})
    assert error_of(response)["code"] == "KeyNotFound"


def test_attestation_is_refused(import_rsa, key_client):
    key = import_rsa()
    with pytest.raises(HttpResponseError) as excinfo:
        key_client.get_key_attestation(key.name)
    assert sdk_error(excinfo)[:2] == (400, "BadParameter")
    with pytest.raises(HttpResponseError) as excinfo:
        key_client.get_key_attestation(key.name, version=key.properties.version)
    assert excinfo.value.status_code == 400
