"""Key permissions (the service's 403 naming the missing one), purge protection and the SKU."""

from __future__ import annotations

import re

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import RawVault, error_of
from test_localvault_crypto import ec_jwk

from localvault import LocalVault
from localvault.control import KEY_PERMISSIONS
from localvault.tokens import TENANT_ID
from localvault.urls import ROUTES, resolve

PURGE_PROTECTED = (
    'Operation "purge" is not allowed because purge protection is enabled for this vault. Key Vault service '
    "will automatically purge it after the retention period has passed.\r\nVault: localvault;location=localvault"
)
HARDWARE_ON_STANDARD = "Hardware key operation not allowed on standard vault"


def denied(vault: LocalVault, permission: str) -> str:
    principal = vault.issuer.principal_id
    return (
        f"The user, group or application 'appid={principal};oid={principal};"
        f"iss=https://sts.windows.net/{TENANT_ID}/' does not have keys {permission} permission on key vault "
        "'localvault;location=localvault'. For help resolving this issue, please see "
        "https://go.microsoft.com/fwlink/?linkid=2125287"
    )


# What each operation needs, written out rather than read from the route table, so that a route that
# loses or changes its permission fails here: (method, a request path, operationId, key permission).
PERMISSIONS = [
    ("GET", "/keys", "GetKeys", "list"),
    ("POST", "/keys/restore", "RestoreKey", "restore"),
    ("GET", "/keys/k/versions", "GetKeyVersions", "list"),
    ("POST", "/keys/k/create", "CreateKey", "create"),
    ("POST", "/keys/k/backup", "BackupKey", "backup"),
    ("POST", "/keys/k/rotate", "RotateKey", "rotate"),
    ("GET", "/keys/k/rotationpolicy", "GetKeyRotationPolicy", "getrotationpolicy"),
    ("PUT", "/keys/k/rotationpolicy", "UpdateKeyRotationPolicy", "setrotationpolicy"),
    ("PUT", "/keys/k", "ImportKey", "import"),
    ("DELETE", "/keys/k", "DeleteKey", "delete"),
    ("GET", "/keys/k", "GetKey", "get"),
    ("GET", "/keys/k/v1", "GetKey", "get"),
    ("PATCH", "/keys/k", "UpdateKey", "update"),
    ("PATCH", "/keys/k/v1", "UpdateKey", "update"),
    ("POST", "/keys/k/v1/encrypt", "encrypt", "encrypt"),
    ("POST", "/keys/k/v1/decrypt", "decrypt", "decrypt"),
    ("POST", "/keys/k/v1/sign", "sign", "sign"),
    ("POST", "/keys/k/v1/verify", "verify", "verify"),
    ("POST", "/keys/k/v1/wrapkey", "wrapKey", "wrapKey"),
    ("POST", "/keys/k/v1/unwrapkey", "unwrapKey", "unwrapKey"),
    ("POST", "/keys/k/v1/release", "release", "release"),
    ("GET", "/keys/k/v1/attestation", "GetKeyAttestation", "get"),
    ("GET", "/deletedkeys", "GetDeletedKeys", "list"),
    ("GET", "/deletedkeys/k", "GetDeletedKey", "get"),
    ("DELETE", "/deletedkeys/k", "PurgeDeletedKey", "purge"),
    ("POST", "/deletedkeys/k/recover", "RecoverDeletedKey", "recover"),
]
NO_PERMISSION = [("POST", "/rng", "GetRandomBytes")]  # Managed HSM's; no key permission
# Other spellings the service also routes: a key operation without a version, an empty name before
# restore, a trailing slash, the path in another case. Each needs the same permission as its route.
ALSO_ROUTED = [
    ("POST", "/keys/k/encrypt", "encrypt", "encrypt"),
    ("POST", "/keys/k/sign", "sign", "sign"),
    ("POST", "/keys/k/unwrapkey", "unwrapKey", "unwrapKey"),
    ("POST", "/keys//restore", "RestoreKey", "restore"),
    ("GET", "/keys/", "GetKeys", "list"),
    ("GET", "/keys/k/", "GetKey", "get"),
    ("GET", "/Keys/k/Versions", "GetKeyVersions", "list"),
    ("DELETE", "/DeletedKeys/k", "PurgeDeletedKey", "purge"),
]


def test_the_table_above_names_every_route_once_and_what_it_resolves_to():
    resolved = [resolve(method, path)[0] for method, path, *_ in PERMISSIONS + NO_PERMISSION]
    assert sorted(map(id, resolved)) == sorted(map(id, ROUTES))  # every route, each once
    assert [(r.operation, r.permission) for r in resolved] == [
        *[(operation, permission) for _, _, operation, permission in PERMISSIONS],
        *[(operation, None) for _, _, operation in NO_PERMISSION],
    ]


@pytest.mark.parametrize(
    "method, path, operation, permission",
    PERMISSIONS + ALSO_ROUTED,
    ids=[f"{m} {p}" for m, p, *_ in PERMISSIONS + ALSO_ROUTED],
)
def test_each_operation_without_its_permission_gets_the_services_403(
    localvault, raw, method, path, operation, permission
):
    localvault.set_key_permissions(KEY_PERMISSIONS - {permission})
    response = raw.request(method, path, json={})
    assert response.status_code == 403
    assert error_of(response) == {
        "code": "Forbidden",
        "message": denied(localvault, permission),
        "innererror": {"code": "AccessDenied"},
    }
    assert localvault.requests()[-1]["operation"] == operation


def test_every_access_policy_key_permission_is_known():
    assert {p.lower() for p in KEY_PERMISSIONS} == {
        *[
            "backup",
            "create",
            "decrypt",
            "delete",
            "encrypt",
            "get",
            "getrotationpolicy",
            "import",
            "list",
            "purge",
            "recover",
            "release",
        ],
        *["restore", "rotate", "setrotationpolicy", "sign", "unwrapkey", "update", "verify", "wrapkey"],
    }


def test_a_refused_create_makes_no_key_and_a_refused_delete_leaves_it(
    localvault, key_client, unique_key_name
):
    localvault.set_key_permissions(["get", "list", "delete"])
    with pytest.raises(HttpResponseError) as refused:
        key_client.create_ec_key(unique_key_name)
    assert refused.value.status_code == 403 and refused.value.error.code == "Forbidden"
    assert denied(localvault, "create") in refused.value.message
    localvault.set_key_permissions(None)
    key = key_client.create_ec_key(unique_key_name)
    localvault.set_key_permissions(["GET", "List"])  # names in any case
    assert localvault.key_permissions == ["get", "list"]
    with pytest.raises(HttpResponseError) as refused:
        key_client.begin_delete_key(unique_key_name)
    assert denied(localvault, "delete") in refused.value.message
    assert key_client.get_key(unique_key_name).id == key.id


def test_a_refused_purge_leaves_the_deleted_key(localvault, key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()
    localvault.set_key_permissions(["all"])
    assert set(localvault.key_permissions) == KEY_PERMISSIONS
    localvault.set_key_permissions(KEY_PERMISSIONS - {"purge"})
    with pytest.raises(HttpResponseError) as refused:
        key_client.purge_deleted_key(unique_key_name)
    assert refused.value.status_code == 403 and denied(localvault, "purge") in refused.value.message
    assert key_client.get_deleted_key(unique_key_name).name == unique_key_name


def test_no_permissions_still_allows_what_needs_none(localvault, raw):
    localvault.set_key_permissions([])
    assert raw.request("GET", "/keys").status_code == 403
    # random bytes need no key permission: a key vault answers its own 400, not 403
    assert raw.request("POST", "/rng", json={"count": 8}).status_code == 400


def test_reset_gives_every_permission_back(localvault, raw):
    localvault.set_key_permissions(["get"])
    localvault.reset()
    assert raw.request("GET", "/keys").status_code == 200


@pytest.mark.parametrize("names", [["get", "sing"], "get,list", [None], ["*"]])
def test_unknown_permissions_are_refused(localvault, names):
    with pytest.raises(ValueError):
        localvault.set_key_permissions(names)
    assert set(localvault.key_permissions) == KEY_PERMISSIONS


# -- purge protection -------------------------------------------------------------------------------


# A vault of the test's own at https://NAME.vault.azure.net, with these options (the plugin's vault_at_url).
A_PROTECTED_VAULT = pytest.mark.parametrize(
    "localvault_options", [{"purge_protection": True}], ids=["protected"]
)
A_STANDARD_VAULT = pytest.mark.parametrize("localvault_options", [{"sku": "standard"}], ids=["standard"])


@A_PROTECTED_VAULT
def test_purge_protection_refuses_purge_and_the_key_stays_recoverable(vault_at_url, unique_key_name):
    client = vault_at_url.key_client()
    key = client.create_ec_key(unique_key_name)
    assert key.properties.recovery_level == "Recoverable"
    deleted = client.begin_delete_key(unique_key_name).result()
    assert deleted.properties.recovery_level == "Recoverable"
    with pytest.raises(HttpResponseError) as refused:
        client.purge_deleted_key(unique_key_name)
    assert refused.value.status_code == 403 and refused.value.error.code == "Forbidden"
    assert refused.value.error.message == PURGE_PROTECTED
    assert client.begin_recover_deleted_key(unique_key_name).result().id == key.id
    client.close()


@A_PROTECTED_VAULT
def test_purge_protection_still_purges_at_the_scheduled_date(vault_at_url, unique_key_name):
    raw = RawVault(vault_at_url)
    assert raw.request("POST", f"/keys/{unique_key_name}/create", json={"kty": "EC"}).status_code == 200
    assert raw.request("DELETE", f"/keys/{unique_key_name}").status_code == 200
    vault_at_url.clock.advance(days=90)
    response = raw.request("DELETE", f"/deletedkeys/{unique_key_name}")
    assert response.status_code == 404 and error_of(response)["code"] == "KeyNotFound"
    raw.close()


def test_purge_protection_with_short_retention_is_customized_recoverable(unique_key_name):
    with LocalVault(purge_protection=True, retention_days=7) as vault:
        client = vault.key_client()
        key = client.create_ec_key(unique_key_name)
        assert (key.properties.recovery_level, key.properties.recoverable_days) == (
            "CustomizedRecoverable",
            7,
        )
        client.close()


# -- the SKU ----------------------------------------------------------------------------------------


def _hardware_refused(call) -> None:
    with pytest.raises(HttpResponseError) as refused:
        call()
    assert refused.value.status_code == 403
    assert (refused.value.error.code, refused.value.error.message) == ("Forbidden", HARDWARE_ON_STANDARD)


@A_STANDARD_VAULT
def test_standard_vault_refuses_hardware_keys(vault_at_url, key_client, unique_key_name):
    client = vault_at_url.key_client()
    _hardware_refused(lambda: client.create_rsa_key(unique_key_name, hardware_protected=True))
    _hardware_refused(lambda: client.create_ec_key(unique_key_name, hardware_protected=True))
    jwk = ec_jwk(ec.generate_private_key(ec.SECP256R1()), "EC", "P-256")
    _hardware_refused(lambda: client.import_key(unique_key_name, jwk, hardware_protected=True))
    # a premium vault's HSM key backup (the vaults of one process share a sealing key)
    key_client.create_ec_key(unique_key_name, hardware_protected=True)
    backup = key_client.backup_key(unique_key_name)
    _hardware_refused(lambda: client.restore_key_backup(backup))
    with pytest.raises(ResourceNotFoundError):
        client.get_key(unique_key_name)
    assert client.create_ec_key(unique_key_name).key_type == "EC"
    client.close()


def test_sku_is_checked_and_managed_hsm_ignores_it(unique_key_name):
    with pytest.raises(ValueError, match=re.escape("sku must be one of standard, premium")):
        LocalVault(sku="basic")
    with LocalVault(managed_hsm=True, sku="standard") as hsm:
        client = hsm.key_client()
        assert client.create_ec_key(unique_key_name, hardware_protected=True).key_type == "EC-HSM"
        client.close()
