"""Behaviour the other tests let slip when the code was broken on purpose, pinned over raw HTTP."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import error_of

MAGIC_LEN, NONCE_LEN, TAG_LEN = 5, 12, 16  # a backup blob: magic, AES-GCM nonce, sealed payload, tag


def _create(raw, name):
    response = raw.request("POST", f"/keys/{name}/create", json={"kty": "EC"})
    assert response.status_code == 200, response.text
    return response.json()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64url(value: int, length: int = 0) -> str:
    return _b64url(value.to_bytes(length or (value.bit_length() + 7) // 8, "big"))


def test_recovered_key_is_readable_at_once(raw, unique_key_name):
    kid = _create(raw, unique_key_name)["key"]["kid"]
    assert raw.request("DELETE", f"/keys/{unique_key_name}").status_code == 200
    recovered = raw.request("POST", f"/deletedkeys/{unique_key_name}/recover")
    assert recovered.status_code == 200 and recovered.json()["key"]["kid"] == kid
    # no poller in between: the very next request sees the key, and no longer the deleted one
    response = raw.request("GET", f"/keys/{unique_key_name}")
    assert response.status_code == 200 and response.json()["key"]["kid"] == kid
    assert raw.request("GET", f"/deletedkeys/{unique_key_name}").status_code == 404


@pytest.mark.parametrize("path", ["/keys", "/keys/{name}/versions", "/deletedkeys"])
def test_exactly_full_last_page_has_null_next_link(raw, unique_key_name, path):
    for i in range(4):
        name = unique_key_name if path == "/keys/{name}/versions" else f"{unique_key_name}-{i}"
        _create(raw, name)
        if path == "/deletedkeys":
            assert raw.request("DELETE", f"/keys/{name}").status_code == 200
    first = raw.request("GET", path.format(name=unique_key_name), params={"maxresults": "2"}).json()
    assert len(first["value"]) == 2 and first["nextLink"]
    last = raw.session.get(first["nextLink"], timeout=30, verify=raw.vault.ca_file).json()
    assert len(last["value"]) == 2
    assert last["nextLink"] is None
    # one page holding everything, exactly full, has no nextLink either
    whole = raw.request("GET", path.format(name=unique_key_name), params={"maxresults": "4"}).json()
    assert len(whole["value"]) == 4 and whole["nextLink"] is None


@pytest.mark.parametrize("path", ["/keys", "/keys/{name}/versions", "/deletedkeys"])
@pytest.mark.parametrize("maxresults", [1, 25])
def test_maxresults_bounds_are_accepted(raw, unique_key_name, path, maxresults):
    for i in range(2):
        name = unique_key_name if path == "/keys/{name}/versions" else f"{unique_key_name}-{i}"
        _create(raw, name)
        if path == "/deletedkeys":
            assert raw.request("DELETE", f"/keys/{name}").status_code == 200
    response = raw.request("GET", path.format(name=unique_key_name), params={"maxresults": str(maxresults)})
    assert response.status_code == 200, response.text
    page = response.json()
    assert len(page["value"]) == min(maxresults, 2)
    if maxresults == 1:
        assert "maxresults=1" in page["nextLink"]
    else:
        assert page["nextLink"] is None


@pytest.mark.parametrize(
    "where",
    [
        *(("nonce", i) for i in range(NONCE_LEN)),
        *(("tag", i) for i in range(TAG_LEN)),
    ],
)
def test_backup_with_a_flipped_nonce_or_tag_byte_is_400(raw, unique_key_name, where):
    _create(raw, unique_key_name)
    blob = bytearray(
        base64.urlsafe_b64decode(
            raw.request("POST", f"/keys/{unique_key_name}/backup").json()["value"] + "=="
        )
    )
    part, index = where
    blob[MAGIC_LEN + index if part == "nonce" else len(blob) - TAG_LEN + index] ^= 0x01
    for _ in range(3):
        response = raw.request("POST", "/keys/restore", json={"value": _b64url(bytes(blob))})
        assert response.status_code == 400, response.text
        assert error_of(response) == {"code": "Malformed backup blob", "message": "Backup blob contains invalid or corrupt version."}


@pytest.mark.parametrize("kind", ["RSA", "EC"])
def test_public_only_jwk_import_gets_its_own_message(raw, unique_key_name, kind):
    if kind == "RSA":
        public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
        jwk = {"kty": "RSA", "n": _int_b64url(public.n), "e": _int_b64url(public.e)}
    else:
        public = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": _int_b64url(public.x, 32), "y": _int_b64url(public.y, 32)}
    response = raw.request("PUT", f"/keys/{unique_key_name}", json={"key": jwk})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "BadParameter"
    assert error["message"] == ("The JSON Web Key has no private key material; import needs the private key.")
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 404
