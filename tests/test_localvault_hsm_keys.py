"""Managed HSM keys the SDK's own tests use: RSA keys with any odd public exponent, key attestation
(emulated: it proves nothing) and OKP (Ed25519) keys.

Each test has a Managed HSM of its own at https://NAME.managedhsm.azure.net (the plugin's ``vault_at_url``
with ``localvault_options`` overridden below); the key vault tests use the session's vault.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from typing import Any, Dict, Iterator, Tuple

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import JsonWebKey
from azure.keyvault.keys.crypto import SignatureAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from helpers import error_of

from localvault import LocalVault

ALL_RSA_OPS = ["decrypt", "encrypt", "sign", "unwrapKey", "verify", "wrapKey"]


@pytest.fixture
def localvault_options() -> Dict[str, Any]:
    return {"managed_hsm": True}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("CPU-bound RSA work in the vault's process")


def message_of(response: Any) -> str:
    """A Managed HSM's error message, after checking that it ends with ``(Activity ID: <its request id>)``."""
    message = error_of(response)["message"]
    suffix = f" (Activity ID: {response.headers['x-ms-request-id']})"
    assert message.endswith(suffix), message
    return message[: -len(suffix)]


# -- RSA public exponents -------------------------------------------------------------------------


def test_rsa_public_exponent_17_as_the_sdk_test_creates_it(
    vault_at_url, client_at_url, unique_key_name, monkeypatch
):
    monkeypatch.setattr(rsa, "generate_private_key", _never)  # only a worker process may generate
    key = client_at_url.create_rsa_key(unique_key_name, hardware_protected=True, public_exponent=17)
    assert key.key.e == b"\x11"
    assert key.key_type == "RSA-HSM"
    assert sorted(key.key_operations) == ALL_RSA_OPS
    assert len(key.key.n) == 256 and key.key.n[0] >= 0x80
    assert client_at_url.get_key(unique_key_name).key.e == b"\x11"

    # the key works: a signature the HSM makes verifies under (n, 17) with cryptography
    digest = hashlib.sha256(b"exponent seventeen").digest()
    with vault_at_url.crypto_client(key.id) as crypto:
        signature = crypto.sign(SignatureAlgorithm.rs256, digest).signature
    public = rsa.RSAPublicNumbers(17, int.from_bytes(key.key.n, "big")).public_key()
    public.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@pytest.mark.parametrize(("size", "exponent"), [(3072, 5), (4096, 2**31 - 1), (2048, 3), (2048, 65537)])
def test_rsa_public_exponents_and_sizes(raw_at_url, unique_key_name, size, exponent):
    body = {"kty": "RSA", "key_size": size, "public_exponent": exponent}
    response = raw_at_url.request("POST", f"/keys/{unique_key_name}/create", json=body)
    assert response.status_code == 200, response.text
    jwk = response.json()["key"]
    assert jwk["kty"] == "RSA-HSM"
    e = exponent.to_bytes((exponent.bit_length() + 7) // 8, "big")
    assert jwk["e"] == _b64(e)
    assert len(_unb64(jwk["n"])) * 8 == size


def test_rotation_keeps_the_public_exponent(client_at_url, unique_key_name):
    key = client_at_url.create_rsa_key(unique_key_name, hardware_protected=True, public_exponent=257)
    rotated = client_at_url.rotate_key(unique_key_name)
    assert rotated.key.e == b"\x01\x01" == key.key.e
    assert rotated.key.n != key.key.n and rotated.properties.version != key.properties.version


@pytest.mark.parametrize("exponent", [4, 65536, 1, 0, -3, 2**31 + 1, 2**64])
def test_rsa_public_exponent_must_be_odd_and_in_range(raw_at_url, unique_key_name, exponent):
    response = raw_at_url.request(
        "POST", f"/keys/{unique_key_name}/create", json={"kty": "RSA-HSM", "public_exponent": exponent}
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"
    assert message_of(response) == (
        f"Invalid public exponent: {exponent}. It must be odd, from 3 to 2147483647."
    )
    assert raw_at_url.request("GET", f"/keys/{unique_key_name}").status_code == 404


def test_a_key_vault_keeps_to_3_and_65537(key_client, unique_key_name):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_rsa_key(unique_key_name, hardware_protected=True, public_exponent=17)
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"
    assert info.value.error.message == "Invalid public exponent: 17. Supported values: 3, 65537."


# -- key attestation ------------------------------------------------------------------------------


def _jws_parts(blob: bytes) -> Tuple[Dict[str, Any], Dict[str, Any], bytes, bytes]:
    header, payload, signature = blob.split(b".")
    return (
        json.loads(_unb64(header.decode())),
        json.loads(_unb64(payload.decode())),
        signature,
        header + b"." + payload,
    )


def _check_attestation(attestation: Any, key: Any, asymmetric: bool) -> Dict[str, Any]:
    """The chain is the attestation CA's; each blob is a JWS its signer signed, about this key version.
    Returns the private key attestation's payload."""
    signer, ca = x509.load_pem_x509_certificates(attestation.certificate_pem_file)
    assert ca.subject.rfc4514_string() == "CN=localvault attestation CA — proves nothing,O=localvault"
    assert signer.issuer == ca.subject == ca.issuer
    signer.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert attestation.version == "1.0"
    blobs = [("private key", attestation.private_key_attestation)]
    if asymmetric:
        blobs.append(("public key", attestation.public_key_attestation))
    else:
        assert attestation.public_key_attestation is None
    payloads = []
    for attests, blob in blobs:
        header, payload, signature, signed = _jws_parts(blob)
        assert header["alg"] == "EdDSA"
        assert base64.b64decode(header["x5c"][0]) == signer.public_bytes(serialization.Encoding.DER)
        signer.public_key().verify(_unb64(signature.decode()), signed)
        assert payload["attests"] == attests
        assert (payload["name"], payload["version"]) == (key.name, key.properties.version)
        assert payload["kty"] == key.key_type
        assert (
            payload["statement"] == "emulated by localvault: this attestation proves nothing about hardware"
        )
        payloads.append(payload)
    return payloads[0]


def test_get_key_attestation_as_the_sdk_test_does(client_at_url, unique_key_name):
    key = client_at_url.create_rsa_key(unique_key_name, hardware_protected=True)
    attested = client_at_url.get_key_attestation(unique_key_name)
    assert attested.id == key.id and attested.key.n == key.key.n
    attestation = attested.properties.attestation
    payload = _check_attestation(attestation, key, asymmetric=True)
    public = _jws_parts(attestation.public_key_attestation)[1]
    assert public["jwk"] == {"n": _b64(key.key.n), "e": "AQAB"}
    thumbprint_input = json.dumps({"e": "AQAB", "kty": "RSA", "n": _b64(key.key.n)}, separators=(",", ":"))
    assert payload["jkt"] == public["jkt"] == _b64(hashlib.sha256(thumbprint_input.encode()).digest())

    # the same attestation for the same version, by name or by version, after an update too
    client_at_url.update_key_properties(unique_key_name, tags={"t": "v"})
    again = client_at_url.get_key_attestation(unique_key_name, version=key.properties.version)
    assert again.properties.attestation.__dict__ == attestation.__dict__
    assert again.properties.tags == {"t": "v"}

    # a new version has a new one, and the old version keeps its own
    rotated = client_at_url.rotate_key(unique_key_name)
    new = client_at_url.get_key_attestation(unique_key_name).properties.attestation
    assert new.private_key_attestation != attestation.private_key_attestation
    assert new.public_key_attestation != attestation.public_key_attestation
    assert new.certificate_pem_file == attestation.certificate_pem_file
    _check_attestation(new, rotated, asymmetric=True)
    old = client_at_url.get_key_attestation(unique_key_name, version=key.properties.version)
    assert old.properties.attestation.__dict__ == attestation.__dict__


def test_an_ec_key_attestation(client_at_url, unique_key_name):
    key = client_at_url.create_ec_key(unique_key_name, curve="P-384", hardware_protected=True)
    attestation = client_at_url.get_key_attestation(unique_key_name).properties.attestation
    _check_attestation(attestation, key, asymmetric=True)
    public = _jws_parts(attestation.public_key_attestation)[1]
    assert public["jwk"] == {"crv": "P-384", "x": _b64(key.key.x), "y": _b64(key.key.y)}


def test_a_symmetric_key_has_only_a_private_key_attestation(client_at_url, raw_at_url, unique_key_name):
    key = client_at_url.create_oct_key(unique_key_name, size=256, hardware_protected=True)
    attestation = client_at_url.get_key_attestation(unique_key_name).properties.attestation
    payload = _check_attestation(attestation, key, asymmetric=False)
    assert "jkt" not in payload and "jwk" not in payload

    version = key.properties.version
    response = raw_at_url.request("GET", f"/keys/{unique_key_name}/{version}/attestation")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"key", "attributes"}
    assert set(body["attributes"]["attestation"]) == {
        "certificatePemFile",
        "privateKeyAttestation",
        "version",
    }
    assert _unb64(body["attributes"]["attestation"]["certificatePemFile"]).startswith(
        b"-----BEGIN CERTIFICATE"
    )
    # the attestation is only in the attestation's answer
    assert (
        "attestation" not in raw_at_url.request("GET", f"/keys/{unique_key_name}/{version}").json()["attributes"]
    )


def test_attestation_of_a_missing_key_or_version(raw_at_url, client_at_url, unique_key_name):
    response = raw_at_url.request("GET", f"/keys/{unique_key_name}//attestation")
    assert response.status_code == 404 and error_of(response)["code"] == "KeyNotFound"
    client_at_url.create_ec_key(unique_key_name, hardware_protected=True)
    response = raw_at_url.request("GET", f"/keys/{unique_key_name}/{'0' * 32}/attestation")
    assert response.status_code == 404 and error_of(response)["code"] == "KeyNotFound"


def test_a_restored_key_keeps_its_attestation(client_at_url, unique_key_name):
    key = client_at_url.create_rsa_key(unique_key_name, hardware_protected=True)
    before = client_at_url.get_key_attestation(unique_key_name).properties.attestation
    backup = client_at_url.backup_key(unique_key_name)
    client_at_url.begin_delete_key(unique_key_name).wait()
    client_at_url.purge_deleted_key(unique_key_name)
    restored = client_at_url.restore_key_backup(backup)
    assert restored.properties.version == key.properties.version
    after = client_at_url.get_key_attestation(unique_key_name).properties.attestation
    assert after.__dict__ == before.__dict__


def test_attestation_survives_a_restart(tmp_path):
    data_dir = str(tmp_path / "hsm")
    with LocalVault(managed_hsm=True, data_dir=data_dir, data_key="a passphrase") as hsm:
        client = hsm.key_client()
        client.create_ec_key("attested", hardware_protected=True)
        before = client.get_key_attestation("attested").properties.attestation
        client.close()
    with LocalVault(managed_hsm=True, data_dir=data_dir, data_key="a passphrase") as hsm:
        client = hsm.key_client()
        after = client.get_key_attestation("attested").properties.attestation
        client.close()
    assert after.__dict__ == before.__dict__


def test_a_key_vault_has_no_key_attestation(key_client, raw, unique_key_name):
    key_client.create_ec_key(unique_key_name, hardware_protected=True)
    with pytest.raises(HttpResponseError) as info:
        key_client.get_key_attestation(unique_key_name)
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"
    assert info.value.error.message == (
        f"Key {unique_key_name} has no attestation: key attestation is served by a Managed HSM only."
    )


# -- OKP (Ed25519) keys ---------------------------------------------------------------------------


@contextlib.contextmanager
def remote_only() -> Iterator[None]:
    """The installed SDK has no local provider for OKP keys (its CryptographyClient raises 'Unsupported
    key type'): turn local operations off, as the SDK's own Managed HSM tests do, so that every operation
    goes to the vault."""
    from unittest import mock

    import azure.keyvault.keys.crypto._client as crypto_module

    supports_nothing = mock.Mock(supports=mock.Mock(return_value=False))
    with mock.patch.object(crypto_module, "get_local_cryptography_provider", lambda *_: supports_nothing):
        yield


def _ed25519_public(key: Any) -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(key.key.x)


def test_create_okp_key_as_recorded(client_at_url, raw_at_url, unique_key_name):
    key = client_at_url.create_key(unique_key_name, "OKP")
    assert key.key_type == "OKP-HSM"
    assert key.key.crv == "Ed25519" and len(key.key.x) == 32
    assert sorted(key.key_operations) == ["sign", "verify"]
    assert client_at_url.get_key(unique_key_name).key.x == key.key.x

    body = raw_at_url.request("GET", f"/keys/{unique_key_name}", api_version="7.4-preview.1").json()
    assert set(body["key"]) == {"kid", "kty", "key_ops", "crv", "x"}  # no d, no y
    assert set(body["attributes"]) == {
        "created",
        "enabled",
        "exportable",
        "recoverableDays",
        "recoveryLevel",
        "updated",
    }
    assert _unb64(body["key"]["x"]) == key.key.x


def test_okp_sign_and_verify_with_eddsa(vault_at_url, client_at_url, unique_key_name):
    key = client_at_url.create_key(unique_key_name, "OKP-HSM", curve="Ed25519")
    message = b"EdDSA signs the message itself, of any length" * 7
    with vault_at_url.crypto_client(key.id) as crypto, remote_only():
        result = crypto.sign("EdDSA", message)
        assert result.algorithm == "EdDSA" and len(result.signature) == 64
        _ed25519_public(key).verify(result.signature, message)  # raises if it does not verify
        assert crypto.verify("EdDSA", message, result.signature).is_valid
        assert not crypto.verify("EdDSA", message + b"!", result.signature).is_valid
        assert not crypto.verify("EdDSA", message, bytes(64)).is_valid


def test_okp_key_rotates_and_keeps_its_curve(client_at_url, unique_key_name):
    key = client_at_url.create_key(unique_key_name, "OKP")
    rotated = client_at_url.rotate_key(unique_key_name)
    assert rotated.key_type == "OKP-HSM" and rotated.key.crv == "Ed25519"
    assert rotated.key.x != key.key.x and len(rotated.key.x) == 32


def test_import_an_ed25519_key(vault_at_url, client_at_url, unique_key_name):
    private = ed25519.Ed25519PrivateKey.generate()
    d = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    x = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = client_at_url.import_key(unique_key_name, JsonWebKey(kty="OKP", crv="Ed25519", d=d, x=x))
    assert key.key_type == "OKP-HSM" and key.key.x == x and key.key.d is None
    with vault_at_url.crypto_client(key.id) as crypto, remote_only():
        signature = crypto.sign("EdDSA", b"imported").signature
    assert signature == private.sign(b"imported")  # Ed25519 is deterministic

    other = ed25519.Ed25519PrivateKey.generate().public_key()
    mismatched = JsonWebKey(
        kty="OKP",
        crv="Ed25519",
        d=d,
        x=other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    )
    with pytest.raises(HttpResponseError) as info:
        client_at_url.import_key(unique_key_name, mismatched)
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kty": "OKP", "crv": "X25519"}, "Invalid curve name: 'X25519'. Supported curves: Ed25519."),
        ({"kty": "OKP", "crv": "P-256"}, "Invalid curve name: 'P-256'. Supported curves: Ed25519."),
        (
            {"kty": "EC", "crv": "Ed25519"},
            "Invalid curve name: 'Ed25519'. Supported curves: P-256, P-256K, P-384, P-521.",
        ),
    ],
)
def test_okp_curves_are_checked(raw_at_url, unique_key_name, body, message):
    response = raw_at_url.request("POST", f"/keys/{unique_key_name}/create", json=body)
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"
    assert message_of(response) == message


def test_eddsa_only_with_okp_keys(raw_at_url, client_at_url, unique_key_name):
    digest = _b64(hashlib.sha256(b"x").digest())
    client_at_url.create_key(unique_key_name, "OKP")
    response = raw_at_url.request(
        "POST", f"/keys/{unique_key_name}//sign", json={"alg": "ES256", "value": digest}
    )
    assert response.status_code == 400
    assert message_of(response) == "Algorithm 'ES256' is not supported for the sign operation with a OKP key."
    ec_name = unique_key_name + "-ec"
    client_at_url.create_ec_key(ec_name, hardware_protected=True)
    response = raw_at_url.request("POST", f"/keys/{ec_name}//sign", json={"alg": "EdDSA", "value": digest})
    assert response.status_code == 400
    assert message_of(response) == "Algorithm 'EdDSA' is not supported for the sign operation with a EC key."


def test_an_okp_key_attestation(client_at_url, unique_key_name):
    key = client_at_url.create_key(unique_key_name, "OKP")
    attestation = client_at_url.get_key_attestation(unique_key_name).properties.attestation
    payload = _check_attestation(attestation, key, asymmetric=True)
    public = _jws_parts(attestation.public_key_attestation)[1]
    assert public["jwk"] == {"crv": "Ed25519", "x": _b64(key.key.x)}
    thumbprint_input = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64(key.key.x)}, separators=(",", ":")
    )
    assert payload["jkt"] == _b64(hashlib.sha256(thumbprint_input.encode()).digest())


def test_okp_keys_survive_backup_restore_and_a_restart(tmp_path):
    data_dir = str(tmp_path / "hsm")
    message = os.urandom(100)
    with LocalVault(managed_hsm=True, data_dir=data_dir, data_key="a passphrase") as hsm:
        client = hsm.key_client()
        key = client.create_key("edwards", "OKP")
        backup = client.backup_key("edwards")
        client.begin_delete_key("edwards").wait()
        client.purge_deleted_key("edwards")
        assert client.restore_key_backup(backup).key.x == key.key.x
        client.close()
    with LocalVault(managed_hsm=True, data_dir=data_dir, data_key="a passphrase") as hsm:
        client = hsm.key_client()
        assert client.get_key("edwards").key.x == key.key.x
        with hsm.crypto_client("edwards") as crypto, remote_only():
            signature = crypto.sign("EdDSA", message).signature
        client.close()
    _ed25519_public(key).verify(signature, message)


@pytest.mark.parametrize("kty", ["OKP", "OKP-HSM"])
def test_a_key_vault_refuses_okp_keys(key_client, unique_key_name, kty):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_key(unique_key_name, kty)
    assert info.value.status_code == 400  # the exact answer: test_localvault_service_answers.py
    assert info.value.message.startswith(f"(BadParameter) Invalid kty value: {kty}")
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key(unique_key_name)


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        (
            {"kty": "OKP", "crv": "Ed25519", "d": _b64(bytes(31))},
            "The JSON Web Key's 'd' must be an Ed25519 private key of 32 bytes.",
        ),
        (
            {"kty": "OKP", "crv": "Ed25519", "d": _b64(bytes(4096))},
            "The JSON Web Key's 'd' must be an Ed25519 private key of 32 bytes.",
        ),
        (
            {"kty": "OKP", "crv": "Ed448", "d": _b64(bytes(57))},
            "Invalid curve name: 'Ed448'. Supported curves: Ed25519.",
        ),
        (
            {"kty": "OKP", "crv": "Ed25519"},
            "The JSON Web Key has no private key material; import needs the private key.",
        ),
    ],
)
def test_okp_imports_are_checked(raw_at_url, unique_key_name, jwk, message):
    response = raw_at_url.request("PUT", f"/keys/{unique_key_name}", json={"key": jwk})
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"
    assert message_of(response) == message
    assert raw_at_url.request("GET", f"/keys/{unique_key_name}").status_code == 404
