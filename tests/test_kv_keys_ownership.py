"""kv_keys.py with a KeyClient double: a key that this run did not create is never deleted.

kv_keys.make_client is patched (fixture `fake_client` in conftest.py), so no test here sends anything anywhere.
"""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
from azure.core.exceptions import (
    ResourceExistsError,
)
from helpers import (
    NAME,
    RECOVERABLE,
    VAULT,
    error_lines,
    fake_deleted,
    fake_key,
    forbidden,
    http_error,
    not_found,
    run,
)

import kv_keys

pytestmark = pytest.mark.usefixtures("azure_vault_env")

# --------------------------------------------------------------------------------------------------------
# Never harm what it did not create
# --------------------------------------------------------------------------------------------------------


def test_existing_key_is_refused_and_untouched(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = None
    fake_client.get_key.return_value = fake_key("older")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    assert "already exists" in error_lines(err)[0]
    assert [c[0] for c in fake_client.method_calls] == ["get_key", "close"]


def test_soft_deleted_name_is_explained(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_deleted_key.side_effect = None
    fake_client.get_deleted_key.return_value = fake_deleted()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    lines = error_lines(err)
    assert "deleted key" in lines[0] and "2025-04-02" in lines[0]
    assert f"az keyvault key recover --vault-name {VAULT} --name {NAME}" in lines[1]
    assert f"az keyvault key purge --vault-name {VAULT} --name {NAME}" in lines[1]
    fake_client.create_rsa_key.assert_not_called()


def test_lookup_forbidden_then_409_from_create(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = forbidden()
    fake_client.create_rsa_key.side_effect = http_error(ResourceExistsError, 409, "Conflict", RECOVERABLE)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    lines = error_lines(err)
    assert "deleted key" in lines[0]
    assert f"az keyvault key recover --vault-name {VAULT} --name {NAME}" in lines[1]
    fake_client.begin_delete_key.assert_not_called()


def test_409_from_create_after_a_clean_lookup(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.create_rsa_key.side_effect = http_error(ResourceExistsError, 409, "Conflict", RECOVERABLE)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    assert f"az keyvault key purge --vault-name {VAULT} --name {NAME}" in error_lines(err)[1]


def test_concurrent_create_after_the_name_check_is_never_deleted(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # The name was free, then someone else created it before our create: create added our version v1 on top
    # of theirs, and get returns v1, so only the version list shows that the key is not ours alone.
    fake_client.list_properties_of_key_versions.return_value = [
        SimpleNamespace(version="theirs"),
        SimpleNamespace(version="v1"),
    ]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    lines = error_lines(err)
    assert lines[0] == (
        f"error: a key named '{NAME}' already existed in {VAULT}, or someone else created it after the name "
        "check: it has 1 other version(s). This run added version v1 to it and deleted nothing"
    )
    assert lines[1] == (
        "hint: disable just that version if you do not want it: "
        f"az keyvault key set-attributes --vault-name {VAULT} --name {NAME} --version v1 --enabled false "
        "(a single version cannot be deleted)"
    )
    assert lines[2].startswith(f"cleanup: nothing deleted, since the name '{NAME}' holds versions")
    fake_client.begin_delete_key.assert_not_called()
    fake_client.update_key_properties.assert_not_called()


def test_version_list_without_the_created_version_is_left_alone(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.list_properties_of_key_versions.return_value = [SimpleNamespace(version="someone-elses")]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    assert "something else is writing to this key" in error_lines(err)[0]
    fake_client.begin_delete_key.assert_not_called()


def test_versions_not_listable_means_no_deletion(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # The name was free, but without the version list a concurrent writer's versions cannot be ruled out.
    fake_client.list_properties_of_key_versions.side_effect = forbidden("list")
    code, out, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.PERMISSION
    lines = error_lines(err)
    assert lines[0] == (
        f"error: not deleting '{NAME}': this identity may not list the key's versions, so this run cannot tell "
        "whether the key holds versions that it did not create"
    )
    assert "--key-permissions get list create delete purge" in lines[1]
    assert "cleanup: nothing deleted" in err
    fake_client.begin_delete_key.assert_not_called()
    assert f"Key with name '{NAME}' was found." in out


def test_versions_not_listable_is_fine_with_keep(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.list_properties_of_key_versions.side_effect = forbidden("list")
    code, _, err = run(capsys, "--name", NAME, "--keep")
    assert (code, err) == (0, "")
    fake_client.begin_delete_key.assert_not_called()


def test_lookup_forbidden_and_key_existed_adds_no_deletion(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # get is forbidden (e.g. the existing key is disabled): create added a version; the script must not delete.
    fake_client.get_key.side_effect = forbidden()
    fake_client.list_properties_of_key_versions.return_value = [
        SimpleNamespace(version="old"),
        SimpleNamespace(version="v1"),
    ]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    lines = error_lines(err)
    assert "already existed" in lines[0] and "v1" in lines[0]
    assert (
        f"az keyvault key set-attributes --vault-name {VAULT} --name {NAME} --version v1 --enabled false"
        in lines[1]
    )
    fake_client.begin_delete_key.assert_not_called()
    assert "nothing deleted" in err


def test_lookup_forbidden_and_key_new_is_deleted(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = [forbidden(), fake_key()]
    assert run(capsys, "--name", NAME)[0] == 0
    fake_client.begin_delete_key.assert_called_once_with(NAME)


def test_unknown_ownership_is_never_deleted(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = [forbidden(), fake_key()]
    fake_client.list_properties_of_key_versions.side_effect = forbidden("list")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.PERMISSION
    error_lines(err)
    fake_client.begin_delete_key.assert_not_called()
    assert "this run created https://" in err


def test_other_version_appearing_is_left_alone(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = [not_found(), fake_key("someone-elses")]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.CONFLICT
    error_lines(err)
    fake_client.begin_delete_key.assert_not_called()
