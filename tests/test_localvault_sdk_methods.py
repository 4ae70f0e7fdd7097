"""Every public method of the SDK's KeyClient and CryptographyClient, called once against localvault:
each works, or is refused as localvault's documentation says. A method added to the SDK fails the
coverage check until it is tried here."""

from __future__ import annotations

import hashlib

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.keyvault.keys import (
    KeyClient,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
)
from azure.keyvault.keys.crypto import (
    CryptographyClient,
    EncryptionAlgorithm,
    KeyWrapAlgorithm,
    SignatureAlgorithm,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from test_localvault_crypto import ec_jwk

from localvault import LocalVault

NOT_CALLS = {"close", "vault_url", "key_id"}  # properties and cleanup


def public_methods(cls: type) -> set:
    return {m for m in dir(cls) if not m.startswith("_")} - NOT_CALLS


def _refused(call, *args, **kwargs) -> int:
    with pytest.raises(HttpResponseError) as excinfo:
        call(*args, **kwargs)
    assert excinfo.value.status_code == 400
    return 400


def test_every_key_client_method(key_client, unique_key_name):
    name, other = unique_key_name, f"{unique_key_name}-b"
    called = {}
    called["create_key"] = key_client.create_key(name, "RSA", size=2048)
    called["create_rsa_key"] = key_client.create_rsa_key(name, size=3072)
    called["create_ec_key"] = key_client.create_ec_key(other, curve="P-384")
    called["get_key"] = key_client.get_key(name)
    called["update_key_properties"] = key_client.update_key_properties(name, tags={"a": "b"})
    called["list_properties_of_keys"] = list(key_client.list_properties_of_keys())
    called["list_properties_of_key_versions"] = list(key_client.list_properties_of_key_versions(name))
    assert len(called["list_properties_of_key_versions"]) == 2
    policy = KeyRotationPolicy(
        lifetime_actions=[
            KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P30D")
        ],
        expires_in="P90D",
    )
    called["update_key_rotation_policy"] = key_client.update_key_rotation_policy(name, policy)
    called["get_key_rotation_policy"] = key_client.get_key_rotation_policy(name)
    called["rotate_key"] = key_client.rotate_key(name)
    called["get_cryptography_client"] = key_client.get_cryptography_client(name)
    called["send_request"] = key_client.send_request(HttpRequest("GET", f"/keys/{name}?api-version=7.6"))
    assert called["send_request"].status_code == 200
    backup = called["backup_key"] = key_client.backup_key(other)
    called["begin_delete_key"] = key_client.begin_delete_key(other).result()
    called["get_deleted_key"] = key_client.get_deleted_key(other)
    called["list_deleted_keys"] = list(key_client.list_deleted_keys())
    called["begin_recover_deleted_key"] = key_client.begin_recover_deleted_key(other).result()
    key_client.begin_delete_key(other).wait()
    called["purge_deleted_key"] = key_client.purge_deleted_key(other)
    called["restore_key_backup"] = key_client.restore_key_backup(backup)
    called["import_key"] = key_client.import_key(
        f"{name}-imported", ec_jwk(ec.generate_private_key(ec.SECP256R1()), "EC", "P-256")
    )
    # documented refusals in a key vault: no exportable keys, no attestation service; /rng and oct keys
    # belong to a Managed HSM
    called["release_key"] = _refused(key_client.release_key, name, "attestation-token")
    called["get_key_attestation"] = _refused(key_client.get_key_attestation, name)
    called["get_random_bytes"] = _refused(key_client.get_random_bytes, 8)
    called["create_oct_key"] = _refused(key_client.create_oct_key, f"{name}-oct", size=256)
    assert set(called) == public_methods(KeyClient)


def test_every_cryptography_client_method(localvault: LocalVault, key_client, unique_key_name):
    key = key_client.create_rsa_key(unique_key_name, size=2048)
    digest = hashlib.sha256(b"methods").digest()
    called = {}
    # given only the id, the client asks the vault for every operation
    with localvault.crypto_client(key.id) as client:
        encrypted = called["encrypt"] = client.encrypt(EncryptionAlgorithm.rsa_oaep, b"hello")
        called["decrypt"] = client.decrypt(EncryptionAlgorithm.rsa_oaep, encrypted.ciphertext)
        assert called["decrypt"].plaintext == b"hello"
        wrapped = called["wrap_key"] = client.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
        called["unwrap_key"] = client.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
        assert called["unwrap_key"].key == b"k" * 32
        signed = called["sign"] = client.sign(SignatureAlgorithm.ps256, digest)
        called["verify"] = client.verify(SignatureAlgorithm.ps256, digest, signed.signature)
        assert called["verify"].is_valid
        response = called["send_request"] = client.send_request(
            HttpRequest("GET", f"/keys/{unique_key_name}?api-version=7.6")
        )
        assert response.status_code == 200
        # cryptography's RSA key interfaces, backed by the vault: the private one signs in the vault
        private = called["create_rsa_private_key"] = client.create_rsa_private_key()
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
        vault_signature = private.sign(b"methods", pss, hashes.SHA256())
        public = called["create_rsa_public_key"] = client.create_rsa_public_key()
        public.verify(vault_signature, b"methods", pss, hashes.SHA256())  # raises if it does not verify
    # from_jwk builds a local client: the vault's public key verifies the vault's signature
    local = called["from_jwk"] = CryptographyClient.from_jwk(key.key)
    assert local.verify(SignatureAlgorithm.ps256, digest, signed.signature).is_valid
    assert set(called) == public_methods(CryptographyClient)
