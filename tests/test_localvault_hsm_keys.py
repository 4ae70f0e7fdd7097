"""Managed HSM keys the SDK's own tests use: RSA keys with any odd public exponent.

Each test has a Managed HSM of its own at https://NAME.managedhsm.azure.net (the plugin's ``vault_at_url``
with ``localvault_options`` overridden below); the key vault tests use the session's vault.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any, Dict, Iterator

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys.crypto import SignatureAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from helpers import RawVault, error_of

from localvault import LocalVault

RESOURCE = "https://managedhsm.azure.net"
ALL_RSA_OPS = ["decrypt", "encrypt", "sign", "unwrapKey", "verify", "wrapKey"]


@pytest.fixture
def localvault_options() -> Dict[str, Any]:
    return {"managed_hsm": True}


@pytest.fixture
def hsm_client(vault_at_url: LocalVault) -> Iterator[Any]:
    client = vault_at_url.key_client()
    yield client
    client.close()


@pytest.fixture
def hsm_raw(vault_at_url: LocalVault) -> Iterator[RawVault]:
    raw = RawVault(vault_at_url)
    token = vault_at_url.credential().get_token(RESOURCE + "/.default").token
    raw.session.headers["Authorization"] = f"Bearer {token}"
    yield raw
    raw.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("CPU-bound RSA work in the vault's process")


def message_of(response: Any) -> str:
    """The error message without a Managed HSM's ``(Activity ID: ...)`` suffix, which must name the
    answer's request id if it is there."""
    message = error_of(response)["message"]
    match = re.fullmatch(r"(.*) \(Activity ID: ([^)]*)\)", message, re.DOTALL)
    if match is None:
        return message
    assert match.group(2) == response.headers["x-ms-request-id"]
    return match.group(1)


# -- RSA public exponents -------------------------------------------------------------------------


def test_rsa_public_exponent_17_as_the_sdk_test_creates_it(
    vault_at_url, hsm_client, unique_key_name, monkeypatch
):
    monkeypatch.setattr(rsa, "generate_private_key", _never)  # only a worker process may generate
    key = hsm_client.create_rsa_key(unique_key_name, hardware_protected=True, public_exponent=17)
    assert key.key.e == b"\x11"
    assert key.key_type == "RSA-HSM"
    assert sorted(key.key_operations) == ALL_RSA_OPS
    assert len(key.key.n) == 256 and key.key.n[0] >= 0x80
    assert hsm_client.get_key(unique_key_name).key.e == b"\x11"

    # the key works: a signature the HSM makes verifies under (n, 17) with cryptography
    digest = hashlib.sha256(b"exponent seventeen").digest()
    with vault_at_url.crypto_client(key.id) as crypto:
        signature = crypto.sign(SignatureAlgorithm.rs256, digest).signature
    public = rsa.RSAPublicNumbers(17, int.from_bytes(key.key.n, "big")).public_key()
    public.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@pytest.mark.parametrize(("size", "exponent"), [(3072, 5), (4096, 2**31 - 1), (2048, 3), (2048, 65537)])
def test_rsa_public_exponents_and_sizes(hsm_raw, unique_key_name, size, exponent):
    body = {"kty": "RSA", "key_size": size, "public_exponent": exponent}
    response = hsm_raw.request("POST", f"/keys/{unique_key_name}/create", json=body)
    assert response.status_code == 200, response.text
    jwk = response.json()["key"]
    assert jwk["kty"] == "RSA-HSM"
    e = exponent.to_bytes((exponent.bit_length() + 7) // 8, "big")
    assert jwk["e"] == _b64(e)
    assert len(_unb64(jwk["n"])) * 8 == size


def test_rotation_keeps_the_public_exponent(hsm_client, unique_key_name):
    key = hsm_client.create_rsa_key(unique_key_name, hardware_protected=True, public_exponent=257)
    rotated = hsm_client.rotate_key(unique_key_name)
    assert rotated.key.e == b"\x01\x01" == key.key.e
    assert rotated.key.n != key.key.n and rotated.properties.version != key.properties.version


@pytest.mark.parametrize("exponent", [4, 65536, 1, 0, -3, 2**31 + 1, 2**64])
def test_rsa_public_exponent_must_be_odd_and_in_range(hsm_raw, unique_key_name, exponent):
    response = hsm_raw.request(
        "POST", f"/keys/{unique_key_name}/create", json={"kty": "RSA-HSM", "public_exponent": exponent}
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"
    assert message_of(response) == (
        f"Invalid public exponent: {exponent}. It must be odd, from 3 to 2147483647."
    )
    assert hsm_raw.request("GET", f"/keys/{unique_key_name}").status_code == 404


def test_a_key_vault_keeps_to_3_and_65537(key_client, unique_key_name):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_rsa_key(unique_key_name, hardware_protected=True, public_exponent=17)
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"
    assert info.value.error.message == "Invalid public exponent: 17. Supported values: 3, 65537."
