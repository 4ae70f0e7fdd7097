"""Every operation of the keys REST contract (keys.json, api-version 2025-07-01) is served, or refused as
localvault's documentation says, so no route is silently missing."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives.asymmetric import ec
from helpers import error_of

from localvault.urls import ROUTES

# The 25 operationIds of keys.json, written here since the contract is not part of a clone.
OPERATION_IDS = {
    "GetDeletedKeys", "GetDeletedKey", "PurgeDeletedKey", "RecoverDeletedKey", "GetKeys", "ImportKey",
    "DeleteKey", "GetKey", "UpdateKey", "GetKeyAttestation", "decrypt", "encrypt", "release", "sign",
    "unwrapKey", "verify", "wrapKey", "BackupKey", "CreateKey", "RotateKey", "GetKeyRotationPolicy",
    "UpdateKeyRotationPolicy", "GetKeyVersions", "RestoreKey", "GetRandomBytes",
}  # fmt: skip
# Refused in a key vault, as documented: release and attestation need an attestation service; random
# bytes come from a Managed HSM only.
DOCUMENTED_REFUSALS = {"release": 400, "GetKeyAttestation": 400, "GetRandomBytes": 400}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_route_table_names_every_operation_and_no_other():
    assert {route.operation for route in ROUTES} == OPERATION_IDS


def test_every_operation_is_served_or_refused_as_documented(raw, unique_key_name):
    name, imported = unique_key_name, f"{unique_key_name}-imported"
    local = ec.generate_private_key(ec.SECP256R1())
    numbers = local.private_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "d": b64(numbers.private_value.to_bytes(32, "big")),
        "x": b64(numbers.public_numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.public_numbers.y.to_bytes(32, "big")),
    }
    digest = b64(hashlib.sha256(b"walk").digest())
    seen = {}

    def call(operation, method, path, expected=200, **kwargs):
        response = raw.request(method, path, **kwargs)
        assert response.status_code == expected, (operation, response.text)
        seen[operation] = response.status_code
        return response.json() if response.content else None

    created = call("CreateKey", "POST", f"/keys/{name}/create", json={"kty": "RSA", "key_size": 2048})
    version = created["key"]["kid"].rsplit("/", 1)[1]
    call("ImportKey", "PUT", f"/keys/{imported}", json={"key": jwk})
    call("GetKey", "GET", f"/keys/{name}/{version}")
    call("UpdateKey", "PATCH", f"/keys/{name}/{version}", json={"tags": {"walk": "yes"}})
    call("GetKeys", "GET", "/keys")
    call("GetKeyVersions", "GET", f"/keys/{name}/versions")
    call("GetKeyRotationPolicy", "GET", f"/keys/{name}/rotationpolicy")
    call("UpdateKeyRotationPolicy", "PUT", f"/keys/{name}/rotationpolicy", json={"lifetimeActions": []})
    call("RotateKey", "POST", f"/keys/{name}/rotate")
    ciphertext = call(
        "encrypt", "POST", f"/keys/{name}//encrypt", json={"alg": "RSA-OAEP", "value": b64(b"hi")}
    )
    call("decrypt", "POST", f"/keys/{name}//decrypt", json={"alg": "RSA-OAEP", "value": ciphertext["value"]})
    wrapped = call(
        "wrapKey", "POST", f"/keys/{name}//wrapkey", json={"alg": "RSA-OAEP-256", "value": b64(b"k" * 32)}
    )
    call(
        "unwrapKey",
        "POST",
        f"/keys/{name}//unwrapkey",
        json={"alg": "RSA-OAEP-256", "value": wrapped["value"]},
    )
    signature = call("sign", "POST", f"/keys/{imported}//sign", json={"alg": "ES256", "value": digest})
    verified = call(
        "verify", "POST", f"/keys/{imported}//verify",
        json={"alg": "ES256", "digest": digest, "value": signature["value"]},
    )  # fmt: skip
    assert verified == {"value": True}
    backup = call("BackupKey", "POST", f"/keys/{name}/backup")
    call("DeleteKey", "DELETE", f"/keys/{name}")
    call("GetDeletedKeys", "GET", "/deletedkeys")
    call("GetDeletedKey", "GET", f"/deletedkeys/{name}")
    call("RecoverDeletedKey", "POST", f"/deletedkeys/{name}/recover")
    call("DeleteKey", "DELETE", f"/keys/{name}")
    call("PurgeDeletedKey", "DELETE", f"/deletedkeys/{name}", expected=204)
    restored = call("RestoreKey", "POST", "/keys/restore", json={"value": backup["value"]})
    assert restored["key"]["kid"].rsplit("/", 2)[1] == name

    for operation, method, path, body in (
        ("release", "POST", f"/keys/{imported}//release", {"target": "attestation-token"}),
        ("GetKeyAttestation", "GET", f"/keys/{imported}//attestation", None),
        ("GetRandomBytes", "POST", "/rng", {"count": 8}),
    ):
        response = raw.request(method, path, json=body)
        assert response.status_code == DOCUMENTED_REFUSALS[operation], response.text
        assert error_of(response)["code"] == "BadParameter"
        seen[operation] = response.status_code

    assert set(seen) == OPERATION_IDS
    assert all(status < 500 for status in seen.values())
