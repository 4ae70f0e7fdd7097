"""Managed HSM mode: its token resource, oct-HSM keys with the symmetric algorithms, random bytes.

Each test has a Managed HSM of its own at https://NAME.managedhsm.azure.net (the plugin's ``vault_at_url``
with ``localvault_options`` overridden below). Symmetric keys are imported from
AES keys made here, so every result is cross-checked with ``cryptography``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
from typing import Any, Dict, Iterator

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import JsonWebKey
from azure.keyvault.keys.crypto import EncryptionAlgorithm, KeyWrapAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from helpers import error_of
from test_localvault_cli import _start, _stop

from localvault import LocalVault
from localvault.vault import LocalVaultCredential

RESOURCE = "https://managedhsm.azure.net"
SIZES = (128, 192, 256)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def localvault_options() -> Dict[str, Any]:
    return {"managed_hsm": True}


@pytest.fixture
def hsm(vault_at_url: LocalVault) -> LocalVault:
    return vault_at_url


@pytest.fixture
def import_aes(client_at_url: Any, unique_key_name: str) -> Any:
    def make(bits: int = 256) -> tuple:
        secret = os.urandom(bits // 8)
        ops = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]  # the default has no sign
        key = client_at_url.import_key(unique_key_name, JsonWebKey(kty="oct-HSM", k=secret, key_ops=ops))
        return key, secret

    return make


@contextlib.contextmanager
def remote_only() -> Iterator[None]:
    """Keep CryptographyClient from operating locally, as the SDK's own Managed HSM tests do: the vault
    never returns an oct key's ``k``, and the SDK's local AES provider would then use a random key."""
    from unittest import mock

    import azure.keyvault.keys.crypto._client as crypto_module

    supports_nothing = mock.Mock(supports=mock.Mock(return_value=False))
    with mock.patch.object(crypto_module, "get_local_cryptography_provider", lambda *_: supports_nothing):
        yield


def sdk_error(excinfo: Any) -> tuple:
    return excinfo.value.status_code, excinfo.value.error.code


# -- authentication and mode ----------------------------------------------------------------------


def test_challenge_and_tokens_use_the_managed_hsm_resource(hsm, client_at_url):
    response = requests.get(f"{hsm.url}/keys", params={"api-version": "2025-07-01"}, verify=hsm.ca_file)
    assert response.status_code == 401
    assert f'resource="{RESOURCE}"' in response.headers["WWW-Authenticate"]
    key_vault_token = hsm.credential().get_token("https://vault.azure.net/.default").token
    response = requests.get(
        f"{hsm.url}/keys",
        params={"api-version": "2025-07-01"},
        headers={"Authorization": f"Bearer {key_vault_token}"},
        verify=hsm.ca_file,
    )
    assert response.status_code == 401
    assert hsm.resource == RESOURCE
    assert list(client_at_url.list_properties_of_keys()) == []  # the SDK follows the challenge


def test_standalone_managed_hsm_serves_managed_hsm_tokens():
    process, exports = _start("--port", "0", "--managed-hsm")
    try:
        credential = LocalVaultCredential(exports["IDENTITY_ENDPOINT"], exports["IDENTITY_HEADER"])
        token = credential.get_token(RESOURCE + "/.default").token
        response = requests.post(
            exports["LOCALVAULT_URL"] + "/rng",
            params={"api-version": "2025-07-01"},
            json={"count": 8},
            headers={"Authorization": f"Bearer {token}"},
            verify=exports["LOCALVAULT_CA_FILE"],
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert len(unb64(response.json()["value"])) == 8
    finally:
        code, _, err = _stop(process)
    assert code == 0, err


# -- random bytes ---------------------------------------------------------------------------------


def test_get_random_bytes(client_at_url):
    assert len(client_at_url.get_random_bytes(1)) == 1
    first, second = client_at_url.get_random_bytes(128), client_at_url.get_random_bytes(128)
    assert len(first) == 128 and first != second


@pytest.mark.parametrize("body", [{"count": 0}, {"count": 129}, {"count": "4"}, {"count": True}, {}])
def test_get_random_bytes_bounds(raw_at_url, body):
    response = raw_at_url.request("POST", "/rng", json=body)
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


# -- oct-HSM keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SIZES)
def test_create_oct_hsm_keys(client_at_url, raw_at_url, unique_key_name, bits):
    key = client_at_url.create_oct_key(unique_key_name, size=bits, hardware_protected=True)
    assert key.key_type == "oct-HSM"
    assert key.key.k is None  # the secret never leaves the vault
    body = raw_at_url.request("GET", f"/keys/{unique_key_name}").json()
    assert body["attributes"]["key_size"] == bits
    assert set(body["key"]) == {"kid", "kty", "key_ops"}


def test_oct_key_size_must_be_an_aes_size(client_at_url, unique_key_name):
    with pytest.raises(HttpResponseError) as excinfo:
        client_at_url.create_oct_key(unique_key_name, size=512, hardware_protected=True)
    assert sdk_error(excinfo) == (400, "BadParameter")
    with pytest.raises(HttpResponseError) as excinfo:
        client_at_url.import_key(unique_key_name, JsonWebKey(kty="oct-HSM", k=os.urandom(20)))
    assert sdk_error(excinfo) == (400, "BadParameter")


def _local_encrypt(secret: bytes, alg: str, plaintext: bytes, iv: bytes) -> bytes:
    if alg.endswith("CBCPAD"):
        padder = block_padding.PKCS7(128).padder()
        plaintext = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(iv)).encryptor()
    return encryptor.update(plaintext) + encryptor.finalize()


@pytest.mark.parametrize("bits", SIZES)
@pytest.mark.parametrize("mode", ["CBC", "CBCPAD"])
def test_aes_cbc(hsm, import_aes, bits, mode):
    key, secret = import_aes(bits)
    alg = EncryptionAlgorithm(f"A{bits}{mode}")
    plaintext = os.urandom(48) if mode == "CBC" else b"not a whole number of blocks"
    iv = os.urandom(16)
    with hsm.crypto_client(key.id) as crypto, remote_only():
        result = crypto.encrypt(alg, plaintext, iv=iv)
        assert result.iv == iv
        assert result.ciphertext == _local_encrypt(secret, alg, plaintext, iv)
        mine = _local_encrypt(secret, alg, plaintext, iv)
        assert crypto.decrypt(alg, mine, iv=iv).plaintext == plaintext


@pytest.mark.parametrize("bits", SIZES)
def test_aes_gcm(hsm, import_aes, bits):
    key, secret = import_aes(bits)
    alg = EncryptionAlgorithm(f"A{bits}GCM")
    plaintext, aad = os.urandom(40), b"authenticated"
    with hsm.crypto_client(key.id) as crypto:  # no local provider does AES-GCM: always remote
        result = crypto.encrypt(alg, plaintext, additional_authenticated_data=aad)
        assert len(result.iv) == 12 and len(result.tag) == 16  # the vault made the iv
        assert AESGCM(secret).decrypt(result.iv, result.ciphertext + result.tag, aad) == plaintext

        nonce = os.urandom(12)
        sealed = AESGCM(secret).encrypt(nonce, plaintext, aad)
        decrypted = crypto.decrypt(
            alg, sealed[:-16], iv=nonce, authentication_tag=sealed[-16:], additional_authenticated_data=aad
        )
        assert decrypted.plaintext == plaintext

        bad_tag = bytes([sealed[-16] ^ 1]) + sealed[-15:]
        with pytest.raises(HttpResponseError) as excinfo:
            crypto.decrypt(
                alg, sealed[:-16], iv=nonce, authentication_tag=bad_tag, additional_authenticated_data=aad
            )
        assert sdk_error(excinfo) == (400, "BadParameter")


def test_aes_gcm_on_the_wire(import_aes, raw_at_url):
    key, secret = import_aes(128)
    path = f"/keys/{key.name}/{key.properties.version}"
    response = raw_at_url.request(
        "POST", f"{path}/encrypt", json={"alg": "A128GCM", "value": b64(b"hi"), "aad": b64(b"a")}
    )
    body = response.json()
    assert set(body) == {"kid", "alg", "value", "iv", "tag", "aad"}
    plaintext = AESGCM(secret).decrypt(unb64(body["iv"]), unb64(body["value"]) + unb64(body["tag"]), b"a")
    assert plaintext == b"hi"
    body = raw_at_url.request(
        "POST",
        f"{path}/decrypt",
        json={
            "alg": "A128GCM",
            "value": body["value"],
            "iv": body["iv"],
            "tag": body["tag"],
            "aad": body["aad"],
        },
    ).json()
    assert unb64(body["value"]) == b"hi"


@pytest.mark.parametrize(
    "alg,bits,length",
    [
        ("A128KW", 128, 16),
        ("A192KW", 192, 24),
        ("A256KW", 256, 32),
        ("CKM_AES_KEY_WRAP", 192, 32),
        ("CKM_AES_KEY_WRAP_PAD", 256, 20),
        ("CKM_AES_KEY_WRAP_PAD", 128, 5),
    ],
)
def test_aes_key_wrap(hsm, import_aes, alg, bits, length):
    key, secret = import_aes(bits)
    wrapped_secret = os.urandom(length)
    local_wrap = keywrap.aes_key_wrap_with_padding if alg.endswith("PAD") else keywrap.aes_key_wrap
    local_unwrap = keywrap.aes_key_unwrap_with_padding if alg.endswith("PAD") else keywrap.aes_key_unwrap
    with hsm.crypto_client(key.id) as crypto, remote_only():
        wrapped = crypto.wrap_key(KeyWrapAlgorithm(alg), wrapped_secret).encrypted_key
        assert local_unwrap(secret, wrapped) == wrapped_secret
        mine = local_wrap(secret, wrapped_secret)
        assert crypto.unwrap_key(KeyWrapAlgorithm(alg), mine).key == wrapped_secret


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_sign_and_verify(hsm, import_aes, alg):
    key, secret = import_aes(256)
    digest = hashlib.new("sha" + alg[2:], b"message").digest()
    with hsm.crypto_client(key.id) as crypto:  # the SDK never signs with a symmetric key locally
        signature = crypto.sign(SignatureAlgorithm(alg), digest).signature
        assert signature == hmac.new(secret, digest, "sha" + alg[2:]).digest()
        assert crypto.verify(SignatureAlgorithm(alg), digest, signature).is_valid
        assert not crypto.verify(SignatureAlgorithm(alg), digest, signature[::-1]).is_valid


@pytest.mark.parametrize(
    "operation,body",
    [
        ("encrypt", {"alg": "A128GCM", "value": "aGk"}),  # a 256-bit key
        ("encrypt", {"alg": "A256CBC", "value": b64(bytes(16))}),  # no iv
        ("encrypt", {"alg": "A256GCM", "value": "aGk", "iv": b64(bytes(12))}),  # the vault makes the iv
        ("decrypt", {"alg": "A256GCM", "value": "aGk", "iv": b64(bytes(12))}),  # no tag
        ("decrypt", {"alg": "A256CBCPAD", "value": "ZEROS", "iv": b64(bytes(16))}),  # bad padding
        ("wrapkey", {"alg": "A256KW", "value": b64(bytes(15))}),
        ("unwrapkey", {"alg": "A256KW", "value": b64(bytes(40))}),
        ("sign", {"alg": "HS256", "value": b64(bytes(20))}),
        ("sign", {"alg": "RS256", "value": b64(bytes(32))}),
        ("encrypt", {"alg": "RSA-OAEP", "value": "aGk"}),
    ],
)
def test_symmetric_refusals(import_aes, raw_at_url, operation, body):
    key, secret = import_aes(256)
    if body["value"] == "ZEROS":  # two blocks that decrypt to zeros under this key: a last byte 0 pads nothing
        encryptor = Cipher(algorithms.AES(secret), modes.CBC(bytes(16))).encryptor()
        body = dict(body, value=b64(encryptor.update(bytes(32)) + encryptor.finalize()))
    response = raw_at_url.request("POST", f"/keys/{key.name}//{operation}", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "BadParameter"


def test_disabled_oct_key_refuses_every_operation(client_at_url, import_aes, raw_at_url):
    key, _ = import_aes(256)
    client_at_url.update_key_properties(key.name, enabled=False)
    response = raw_at_url.request(
        "POST", f"/keys/{key.name}//wrapkey", json={"alg": "A256KW", "value": b64(bytes(32))}
    )
    assert response.status_code == 403
    assert error_of(response)["innererror"] == {"code": "KeyDisabled"}


def test_rsa_hsm_keys_work_in_managed_hsm_mode(hsm, client_at_url, unique_key_name):
    key = client_at_url.create_rsa_key(unique_key_name, size=2048, hardware_protected=True)
    with hsm.crypto_client(key.id) as crypto:
        digest = hashlib.sha256(b"m").digest()
        signature = crypto.sign(SignatureAlgorithm.rs256, digest).signature
        assert crypto.verify(SignatureAlgorithm.rs256, digest, signature).is_valid


# -- backup and restore ---------------------------------------------------------------------------


def test_oct_key_backup_restores_with_its_secret(hsm, client_at_url, import_aes):
    key, secret = import_aes(192)
    blob = client_at_url.backup_key(key.name)
    client_at_url.begin_delete_key(key.name).wait()
    client_at_url.purge_deleted_key(key.name)
    restored = client_at_url.restore_key_backup(blob)
    assert restored.id == key.id and restored.key_type == "oct-HSM"
    with hsm.crypto_client(key.id) as crypto, remote_only():
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.aes_192, bytes(24)).encrypted_key
    assert keywrap.aes_key_unwrap(secret, wrapped) == bytes(24)


def test_a_key_vault_does_not_restore_an_oct_key(client_at_url, import_aes, key_client):
    key, _ = import_aes(256)
    blob = client_at_url.backup_key(key.name)
    with pytest.raises(HttpResponseError) as excinfo:
        key_client.restore_key_backup(blob)
    assert sdk_error(excinfo) == (400, "BadParameter")
