"""RSA work that holds the GIL (generation, an import's primality check, a restore's key loading) does
not run in the vault's process, and an imported RSA key is still fully checked."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import JsonWebKey
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _b64(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _jwk(p: int, q: int, e: int = 65537, **override: int) -> JsonWebKey:
    n, d = p * q, pow(e, -1, math.lcm(p - 1, q - 1))
    members: Dict[str, int] = {"n": n, "e": e, "d": d, "p": p, "q": q}
    members.update(dp=d % (p - 1), dq=d % (q - 1), qi=pow(q, -1, p))
    members.update(override)
    return JsonWebKey(kty="RSA", **{k: _b64(v) for k, v in members.items()})


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("CPU-bound RSA work in the vault's process")


def _only_unchecked(real: Callable[..., Any]) -> Callable[..., Any]:
    def load(*args: Any, unsafe_skip_rsa_key_validation: bool = False, **kwargs: Any) -> Any:
        if not unsafe_skip_rsa_key_validation:
            _never()
        return real(*args, unsafe_skip_rsa_key_validation=True, **kwargs)

    return load


def test_rsa_keys_are_generated_in_a_worker(
    key_client: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rsa, "generate_private_key", _never)
    key = key_client.create_rsa_key(unique_key_name, size=3072)
    assert len(key.key.n) == 384
    rotated = key_client.rotate_key(unique_key_name)
    assert len(rotated.key.n) == 384 and rotated.key.n != key.key.n


def test_an_rsa_import_is_checked_in_a_worker(
    key_client: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    numbers = rsa.generate_private_key(65537, 2048).private_numbers()
    monkeypatch.setattr(
        rsa.RSAPrivateNumbers, "private_key", _only_unchecked(rsa.RSAPrivateNumbers.private_key)
    )
    key = key_client.import_key(unique_key_name, _jwk(numbers.p, numbers.q))
    assert key.key.n == _b64(numbers.public_numbers.n)


def test_an_rsa_import_is_still_fully_checked(key_client: Any, unique_key_name: str) -> None:
    numbers = rsa.generate_private_key(65537, 2048).private_numbers()
    p, q = numbers.p, numbers.q
    half = rsa.generate_private_key(65537, 1024).private_numbers()
    composite = half.p * half.q  # consistent members, but p is not prime: only the full check sees it
    bad = [
        _jwk(p, q, dp=numbers.dmp1 + 2),
        _jwk(p, q, qi=numbers.iqmp + 1),
        _jwk(p, q, d=numbers.d + 2),
        _jwk(composite, q),
    ]
    for jwk in bad:
        with pytest.raises(HttpResponseError) as info:
            key_client.import_key(unique_key_name, jwk)
        assert info.value.status_code == 400 and info.value.error.code == "BadParameter"


def test_a_restore_loads_rsa_versions_without_rechecking_them(
    key_client: Any, unique_key_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_client.create_rsa_key(unique_key_name)
    for _ in range(3):
        key_client.rotate_key(unique_key_name)
    blob = key_client.backup_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).result()
    key_client.purge_deleted_key(unique_key_name)
    monkeypatch.setattr(
        serialization, "load_der_private_key", _only_unchecked(serialization.load_der_private_key)
    )
    restored = key_client.restore_key_backup(blob)
    assert restored.name == unique_key_name
    assert len(list(key_client.list_properties_of_key_versions(unique_key_name))) == 4
