"""The keys API through the real KeyClient and DefaultAzureCredential, over HTTPS."""

from __future__ import annotations

import base64
import datetime
import os
import uuid

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.keys import JsonWebKey, KeyCurveName, KeyType
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import error_of


def _b64(value: int, length: int = 0) -> bytes:
    return value.to_bytes(length or (value.bit_length() + 7) // 8, "big")


@pytest.mark.parametrize("size", [2048, 3072, 4096])
def test_create_rsa_sizes(key_client, unique_key_name, size):
    key = key_client.create_rsa_key(unique_key_name, size=size)
    assert key.key_type == KeyType.rsa
    assert len(key.key.n) * 8 == size
    assert key.key.e == b"\x01\x00\x01"
    assert key.key_operations == ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
    assert key.properties.enabled is True
    assert key.properties.recovery_level == "Recoverable+Purgeable"
    assert key.properties.recoverable_days == 90
    assert key.properties.exportable is False
    assert key.properties.created_on == key.properties.updated_on
    assert key.properties.created_on.tzinfo is not None
    assert key.properties.version and len(key.properties.version) == 32
    assert key.id == f"{key_client.vault_url}/keys/{unique_key_name}/{key.properties.version}"
    # only the public parts leave the vault
    assert key.key.d is None and key.key.p is None and key.key.q is None


def test_create_rsa_public_exponent_and_hsm(key_client, unique_key_name):
    key = key_client.create_rsa_key(unique_key_name, size=2048, public_exponent=3, hardware_protected=True)
    assert key.key_type == KeyType.rsa_hsm
    assert int.from_bytes(key.key.e, "big") == 3  # a vault's RSA-HSM key gives e in four bytes


@pytest.mark.parametrize("curve", ["P-256", "P-256K", "P-384", "P-521"])
def test_create_ec_curves(key_client, unique_key_name, curve):
    key = key_client.create_ec_key(unique_key_name, curve=curve)
    assert key.key_type == KeyType.ec
    assert key.key.crv == curve
    assert key.key_operations == ["sign", "verify"]
    size = {"P-256": 32, "P-256K": 32, "P-384": 48, "P-521": 66}[curve]
    assert len(key.key.x) == len(key.key.y) == size
    assert key.key.d is None


def test_create_ec_hsm(key_client, unique_key_name):
    key = key_client.create_ec_key(unique_key_name, curve=KeyCurveName.p_384, hardware_protected=True)
    assert key.key_type == KeyType.ec_hsm


def test_create_with_ops_attributes_and_tags(key_client, unique_key_name):
    not_before = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    expires = datetime.datetime(2031, 1, 1, tzinfo=datetime.timezone.utc)
    key = key_client.create_rsa_key(
        unique_key_name,
        key_operations=["sign", "verify"],
        enabled=False,
        not_before=not_before,
        expires_on=expires,
        tags={"purpose": "test", "team": "keys"},
    )
    assert key.key_operations == ["sign", "verify"]
    assert key.properties.enabled is False
    assert key.properties.not_before == not_before
    assert key.properties.expires_on == expires
    assert key.properties.tags == {"purpose": "test", "team": "keys"}
    fetched = key_client.get_key(unique_key_name)
    assert fetched.properties.tags == {"purpose": "test", "team": "keys"}
    assert fetched.properties.enabled is False


@pytest.mark.parametrize("kty", ["oct", "oct-HSM"])
def test_create_managed_hsm_types_rejected(key_client, unique_key_name, kty):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_key(unique_key_name, kty, size=256)
    assert info.value.status_code == 400
    assert info.value.error.code == "BadParameter"
    assert info.value.error.message == f"Invalid kty value: {kty}"
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key(unique_key_name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 1024},
        {"size": 2049},
        {"public_exponent": 5},
        {"key_operations": ["encrypt", "fly"]},
    ],
)
def test_create_rsa_rejects_what_the_service_rejects(key_client, unique_key_name, kwargs):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_rsa_key(unique_key_name, **kwargs)
    assert info.value.status_code == 400
    assert info.value.error.code == "BadParameter"


def test_create_ec_bad_curve(key_client, unique_key_name):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_ec_key(unique_key_name, curve="P-192")
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"


def test_too_many_tags_rejected(key_client, unique_key_name):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_rsa_key(unique_key_name, tags={f"t{i}": "v" for i in range(16)})
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"


@pytest.mark.parametrize("name", ["has_underscore", "has space", "x" * 128, "dot.name", "ünï"])
def test_invalid_names_rejected(key_client, name):
    with pytest.raises(HttpResponseError) as info:
        key_client.create_rsa_key(name)
    assert info.value.status_code == 400
    assert info.value.error.code == "BadParameter"
    assert "invalid name" in info.value.error.message


def test_get_latest_and_specific_version(key_client, unique_key_name):
    first = key_client.create_rsa_key(unique_key_name)
    second = key_client.create_rsa_key(unique_key_name)
    assert first.properties.version != second.properties.version
    assert key_client.get_key(unique_key_name).id == second.id
    assert key_client.get_key(unique_key_name, version=first.properties.version).id == first.id
    assert key_client.get_key(unique_key_name).key.n == second.key.n


def test_names_compare_case_insensitively(key_client, unique_key_name):
    created = key_client.create_ec_key(unique_key_name)
    fetched = key_client.get_key(unique_key_name.upper())
    assert fetched.id == created.id
    again = key_client.create_ec_key(unique_key_name.lower())
    assert again.name == unique_key_name
    versions = list(key_client.list_properties_of_key_versions(unique_key_name.swapcase()))
    assert len(versions) == 2


def test_missing_key_and_version(key_client, unique_key_name):
    with pytest.raises(ResourceNotFoundError) as info:
        key_client.get_key(unique_key_name)
    assert info.value.status_code == 404
    assert info.value.error.code == "KeyNotFound"
    assert info.value.error.message.startswith(
        f"A key with (name/id) {unique_key_name} was not found in this key vault."
    )
    key_client.create_rsa_key(unique_key_name)
    with pytest.raises(ResourceNotFoundError) as info:
        key_client.get_key(unique_key_name, version=uuid.uuid4().hex)
    assert info.value.error.code == "KeyNotFound"


def test_import_rsa_strips_leading_zero_and_keeps_private_parts_inside(key_client, unique_key_name):
    # find a key whose modulus' top bit is set, then send n with a leading zero byte as some tools do
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = private.private_numbers()
    n = numbers.public_numbers.n
    jwk = JsonWebKey(
        kty="RSA",
        n=b"\x00" + _b64(n),
        e=_b64(numbers.public_numbers.e),
        d=_b64(numbers.d),
        p=_b64(numbers.p),
        q=_b64(numbers.q),
        dp=_b64(numbers.dmp1),
        dq=_b64(numbers.dmq1),
        qi=_b64(numbers.iqmp),
    )
    key = key_client.import_key(unique_key_name, jwk, tags={"origin": "import"})
    assert key.key.n == _b64(n)
    assert key.key.n[0] != 0
    assert key.key.d is None
    assert key.key_operations == ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
    assert key.properties.tags == {"origin": "import"}


def test_import_ec_as_hsm(key_client, unique_key_name):
    private = ec.generate_private_key(ec.SECP256R1())
    pub = private.public_key().public_numbers()
    jwk = JsonWebKey(
        kty="EC",
        crv="P-256",
        x=_b64(pub.x, 32),
        y=_b64(pub.y, 32),
        d=_b64(private.private_numbers().private_value, 32),
        key_ops=["sign"],
    )
    key = key_client.import_key(unique_key_name, jwk, hardware_protected=True)
    assert key.key_type == KeyType.ec_hsm
    assert key.key.x == _b64(pub.x, 32)
    assert key.key_operations == ["sign"]


@pytest.mark.parametrize(
    "jwk",
    [
        JsonWebKey(kty="RSA", n=b"\x01" * 256, e=b"\x01\x00\x01"),  # no private part
        JsonWebKey(kty="oct", k=b"0" * 32),
        JsonWebKey(kty="EC", crv="P-256", d=b"\x00" * 32),  # zero is not a private value
        JsonWebKey(kty="RSA", n=b"\x01" * 256, e=b"\x01\x00\x01", d=b"\x05", p=b"\x07", q=b"\x0b"),
    ],
)
def test_import_invalid_jwk(key_client, unique_key_name, jwk):
    with pytest.raises(HttpResponseError) as info:
        key_client.import_key(unique_key_name, jwk)
    assert info.value.status_code == 400 and info.value.error.code == "BadParameter"


def test_update_properties(key_client, unique_key_name):
    key = key_client.create_rsa_key(unique_key_name, tags={"a": "1"})
    expires = datetime.datetime(2040, 5, 6, tzinfo=datetime.timezone.utc)
    updated = key_client.update_key_properties(
        unique_key_name,
        enabled=False,
        expires_on=expires,
        tags={"b": "2"},
        key_operations=["verify"],
    )
    assert updated.id == key.id
    assert updated.properties.enabled is False
    assert updated.properties.expires_on == expires
    assert updated.properties.tags == {"b": "2"}
    assert updated.key_operations == ["verify"]
    assert updated.properties.updated_on >= key.properties.updated_on
    assert updated.properties.created_on == key.properties.created_on
    assert key_client.get_key(unique_key_name).properties.enabled is False


def test_update_specific_version_leaves_others(key_client, unique_key_name):
    first = key_client.create_rsa_key(unique_key_name)
    key_client.create_rsa_key(unique_key_name)
    key_client.update_key_properties(unique_key_name, version=first.properties.version, enabled=False)
    assert key_client.get_key(unique_key_name, first.properties.version).properties.enabled is False
    assert key_client.get_key(unique_key_name).properties.enabled is True


def test_update_missing_key(key_client, unique_key_name):
    with pytest.raises(ResourceNotFoundError):
        key_client.update_key_properties(unique_key_name, enabled=False)


def test_soft_delete_recover_purge(key_client, unique_key_name):
    key = key_client.create_rsa_key(unique_key_name)
    poller = key_client.begin_delete_key(unique_key_name)
    poller.wait()
    deleted = poller.result()
    assert deleted.recovery_id == f"{key_client.vault_url}/deletedkeys/{unique_key_name}"
    assert deleted.id == key.id
    assert deleted.scheduled_purge_date - deleted.deleted_date == datetime.timedelta(days=90)
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key(unique_key_name)
    assert key_client.get_deleted_key(unique_key_name).recovery_id == deleted.recovery_id

    # the name cannot be reused while it is soft-deleted
    with pytest.raises(ResourceExistsError) as info:
        key_client.create_rsa_key(unique_key_name)
    assert info.value.status_code == 409
    assert info.value.error.code == "Conflict"
    assert info.value.error.innererror["code"] == "ObjectIsDeletedButRecoverable"
    assert "deleted but recoverable state" in info.value.error.message

    recover = key_client.begin_recover_deleted_key(unique_key_name)
    assert key_client.get_key(unique_key_name).id == key.id  # back at once, before any poll
    recover.wait()
    assert recover.result().id == key.id
    assert key_client.get_key(unique_key_name).id == key.id
    with pytest.raises(ResourceNotFoundError) as info:
        key_client.get_deleted_key(unique_key_name)
    assert info.value.error.message == f"Deleted Key not found: {unique_key_name}"

    key_client.begin_delete_key(unique_key_name).wait()
    assert key_client.purge_deleted_key(unique_key_name) is None
    with pytest.raises(ResourceNotFoundError):
        key_client.get_deleted_key(unique_key_name)
    # after the purge the name is free again
    assert key_client.create_rsa_key(unique_key_name).properties.version != key.properties.version


def test_a_recover_restores_the_key_at_once_or_once_its_delay_has_passed(
    localvault, key_client, raw, unique_key_name
):
    # Asserted without the SDK's recover poller, which would poll for ever for a key that never returns.
    key = key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()
    answer = raw.request("POST", f"/deletedkeys/{unique_key_name}/recover")
    assert answer.status_code == 200 and answer.json()["key"]["kid"] == key.id
    assert key_client.get_key(unique_key_name).id == key.id
    assert raw.request("GET", f"/deletedkeys/{unique_key_name}").status_code == 404
    assert unique_key_name not in [k.name for k in key_client.list_deleted_keys()]

    key_client.begin_delete_key(unique_key_name).wait()
    localvault.set_delete_delay(30)
    assert raw.request("POST", f"/deletedkeys/{unique_key_name}/recover").status_code == 200
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 404  # still being recovered
    localvault.clock.advance(seconds=30)
    assert key_client.get_key(unique_key_name).id == key.id


def test_delete_missing_and_purge_missing(key_client, unique_key_name):
    with pytest.raises(ResourceNotFoundError) as info:
        key_client.begin_delete_key(unique_key_name)
    assert info.value.error.code == "KeyNotFound"
    with pytest.raises(ResourceNotFoundError):
        key_client.purge_deleted_key(unique_key_name)
    with pytest.raises(ResourceNotFoundError):
        key_client.begin_recover_deleted_key(unique_key_name)


def test_import_over_soft_deleted_name_conflicts(key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = JsonWebKey(kty="EC", crv="P-256", d=_b64(private.private_numbers().private_value, 32))
    with pytest.raises(ResourceExistsError) as info:
        key_client.import_key(unique_key_name, jwk)
    assert info.value.error.innererror["code"] == "ObjectIsDeletedButRecoverable"


def test_custom_retention():
    from localvault import LocalVault

    with LocalVault(retention_days=7) as vault:
        client = vault.key_client()
        client.create_ec_key("short-retention")
        deleted = client.begin_delete_key("short-retention").result()
        assert deleted.properties.recovery_level == "CustomizedRecoverable+Purgeable"
        assert deleted.properties.recoverable_days == 7
        assert deleted.scheduled_purge_date - deleted.deleted_date == datetime.timedelta(days=7)
        client.close()


def test_backup_and_restore(key_client, unique_key_name):
    first = key_client.create_rsa_key(unique_key_name, tags={"v": "1"})
    second = key_client.create_rsa_key(unique_key_name)
    blob = key_client.backup_key(unique_key_name)
    assert isinstance(blob, bytes) and len(blob) > 100
    # the blob is sealed: no key material or name in the clear
    assert unique_key_name.encode() not in blob
    assert first.key.n not in blob

    # restore onto an existing name: 409
    with pytest.raises(ResourceExistsError) as info:
        key_client.restore_key_backup(blob)
    assert info.value.status_code == 409 and info.value.error.code == "Conflict"

    key_client.begin_delete_key(unique_key_name).wait()
    # restore onto a soft-deleted name: 409 too
    with pytest.raises(ResourceExistsError) as info:
        key_client.restore_key_backup(blob)
    assert info.value.error.innererror["code"] == "ObjectIsDeletedButRecoverable"

    key_client.purge_deleted_key(unique_key_name)
    restored = key_client.restore_key_backup(blob)
    assert restored.id == second.id
    assert restored.key.n == second.key.n
    versions = {p.version for p in key_client.list_properties_of_key_versions(unique_key_name)}
    assert versions == {first.properties.version, second.properties.version}
    assert key_client.get_key(unique_key_name, first.properties.version).properties.tags == {"v": "1"}


def test_restore_rejects_tampered_and_foreign_blobs(key_client, unique_key_name):
    from localvault import LocalVault

    key_client.create_ec_key(unique_key_name)
    blob = bytearray(key_client.backup_key(unique_key_name))
    blob[len(blob) // 2] ^= 0x01
    for bad in (bytes(blob), b"not a backup at all", base64.b64decode("AAAA")):
        with pytest.raises(HttpResponseError) as info:
            key_client.restore_key_backup(bad)
        assert info.value.status_code == 400 and info.value.error.code == "Malformed backup blob"

    with LocalVault(backup_secret=os.urandom(32)) as other:
        other_client = other.key_client()
        other_client.create_ec_key("foreign")
        foreign = other_client.backup_key("foreign")
        other_client.close()
    with pytest.raises(HttpResponseError) as info:
        key_client.restore_key_backup(foreign)
    assert info.value.status_code == 400
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key("foreign")


def test_backup_missing_key(key_client, unique_key_name):
    with pytest.raises(ResourceNotFoundError):
        key_client.backup_key(unique_key_name)


def test_backup_restores_into_another_vault_of_the_process(key_client, unique_key_name):
    from localvault import LocalVault

    key = key_client.create_rsa_key(unique_key_name)
    blob = key_client.backup_key(unique_key_name)
    with LocalVault() as other:
        other_client = other.key_client()
        restored = other_client.restore_key_backup(blob)
        assert restored.key.n == key.key.n
        assert restored.properties.version == key.properties.version
        assert restored.id.startswith(other.url)
        other_client.close()


def test_empty_key_ops_are_stored_as_given(key_client, unique_key_name):
    assert key_client.create_ec_key(unique_key_name, key_operations=[]).key_operations == []


def test_rejected_create_leaves_nothing_behind(key_client, unique_key_name):
    with pytest.raises(HttpResponseError):
        key_client.create_ec_key(unique_key_name, key_operations=["bogus"])
    with pytest.raises(HttpResponseError):
        key_client.create_ec_key(unique_key_name, tags={"t": "x" * 257})
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key(unique_key_name)
    assert unique_key_name not in {p.name for p in key_client.list_properties_of_keys()}
    assert key_client.create_ec_key(unique_key_name).name == unique_key_name


@pytest.mark.parametrize(
    "body",
    [
        {"kty": "RSA", "key_size": 4096, "key_ops": ["encrypt", "no-such-op"]},
        {"kty": "RSA", "key_size": 4096, "tags": {f"t{i}": "v" for i in range(16)}},
    ],
)
def test_create_checks_key_ops_and_tags_before_generating(raw, unique_key_name, monkeypatch, body):
    def never(*args, **kwargs):
        raise AssertionError("a key was generated for a request that was going to be refused")

    monkeypatch.setattr("localvault.responses.generate_key", never)
    response = raw.request("POST", f"/keys/{unique_key_name}/create", json=body)
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"
