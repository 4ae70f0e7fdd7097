"""kv_keys.py with a KeyClient double: the happy path, the options, usage errors and the prompt.

kv_keys.make_client is patched (fixture `fake_client` in conftest.py), so no test here sends anything anywhere.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import List
from unittest import mock

import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
)
from helpers import (
    NAME,
    VAULT,
    FakePoller,
    error_lines,
    fake_key,
    forbidden,
    http_error,
    not_found,
    run,
)

import kv_keys

pytestmark = pytest.mark.usefixtures("azure_vault_env")

# --------------------------------------------------------------------------------------------------------
# The happy path and the options
# --------------------------------------------------------------------------------------------------------


def test_default_run_reproduces_the_original_flow(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--name", NAME)
    assert (code, err) == (0, "")
    fake_client.create_rsa_key.assert_called_once_with(NAME, size=2048, retry_status=0)
    fake_client.list_properties_of_key_versions.assert_called_once_with(NAME)  # no other version: ours to delete
    assert fake_client.get_key.call_args_list == [mock.call(NAME), mock.call(NAME)]
    fake_client.begin_delete_key.assert_called_once_with(NAME)
    assert fake_client.begin_delete_key.return_value.waited == 1
    fake_client.purge_deleted_key.assert_not_called()
    for line in (
        f"Creating a key in {VAULT} called '{NAME}' ...",
        " done.",
        f"Retrieving your key from {VAULT}.",
        f"Key with name '{NAME}' was found.",
        f"Deleting your key from {VAULT} ...",
    ):
        assert line in out.splitlines()
    for detail in (
        "id:",
        "RSA, 2048 bits",
        "enabled:    True",
        "created:    2025-01-02",
        "operations: sign, verify",
    ):
        assert detail in out
    assert "same version as created: v1" in out
    assert f"recovery id: https://{VAULT}.vault.azure.net/deletedkeys/{NAME}" in out
    assert f"purge date:  2025-04-02 00:00:00+00:00 (until then the name '{NAME}' stays taken)" in out
    assert f"az keyvault key recover --vault-name {VAULT} --name {NAME}" in out
    assert f"az keyvault key purge --vault-name {VAULT} --name {NAME}" in out
    vault = fake_client.factory.call_args.args[0]
    assert (vault.kind, vault.url, vault.ca_file) == ("azure", f"https://{VAULT}.vault.azure.net", None)


def test_ec_key_with_curve(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--name", NAME, "--type", "ec", "--curve", "P-384")
    assert code == 0
    fake_client.create_ec_key.assert_called_once_with(NAME, curve="P-384", retry_status=0)
    fake_client.create_rsa_key.assert_not_called()
    assert "EC, curve P-384" in out


def test_ec_default_curve_and_hsm_and_size(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--name", NAME, "--type", "ec", "--hsm")[0] == 0
    fake_client.create_ec_key.assert_called_once_with(NAME, curve="P-256", hardware_protected=True, retry_status=0)
    fake_client.get_key.side_effect = [not_found(), fake_key()]
    assert run(capsys, "--name", NAME, "--size", "4096", "--hsm")[0] == 0
    fake_client.create_rsa_key.assert_called_once_with(NAME, size=4096, hardware_protected=True, retry_status=0)


def test_keep_skips_deletion(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--name", NAME, "--keep")
    assert code == 0
    fake_client.begin_delete_key.assert_not_called()
    assert f"az keyvault key delete --vault-name {VAULT} --name {NAME}" in out


def test_purge_after_deletion(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    order: List[str] = []
    poller = FakePoller()
    poller.wait = lambda timeout=None: order.append("wait")  # type: ignore[method-assign]
    fake_client.begin_delete_key.return_value = poller
    fake_client.purge_deleted_key.side_effect = lambda name: order.append(f"purge {name}")
    code, out, _ = run(capsys, "--name", NAME, "--purge")
    assert code == 0
    assert order == ["wait", f"purge {NAME}"]
    assert f"The name '{NAME}' can be used again (Azure may take a few seconds to finish)." in out
    assert "(--purge: purged next)" in out and "stays taken" not in out  # never says what --purge undoes


def test_purge_protection_is_explained(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.purge_deleted_key.side_effect = http_error(
        HttpResponseError,
        403,
        "Forbidden",
        'Operation "purge" is not allowed because purge protection is enabled for this vault. '
        "Key Vault service will automatically purge it after the retention period has passed.",
    )
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.ExitStatus.PERMISSION
    lines = error_lines(err)
    assert "purge protection" in lines[0]
    assert "2025-04-02" in lines[1]
    fake_client.begin_delete_key.assert_called_once()  # deleted once, no cleanup attempt after a finished delete


def test_purge_while_the_deletion_is_still_in_progress(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # Azure can answer a purge right after the deletion with 409 "Key is currently being deleted."
    fake_client.purge_deleted_key.side_effect = http_error(
        ResourceExistsError, 409, "Conflict", f"Key {NAME} is currently being deleted."
    )
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.ExitStatus.SERVICE
    lines = error_lines(err)
    assert lines[0].startswith(
        f"error: the key '{NAME}' is deleted, but {VAULT} refused to purge it yet: the deletion is still in progress"
    )
    assert "currently being deleted" in lines[0]
    assert (
        lines[1]
        == f"hint: purge it in a few seconds: az keyvault key purge --vault-name {VAULT} --name {NAME}"
    )
    assert "choose another name" not in err and "name conflict" not in err
    assert len(lines) == 2  # the deletion had finished: no cleanup
    fake_client.begin_delete_key.assert_called_once()


def test_purge_permission_missing(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.purge_deleted_key.side_effect = forbidden("purge")
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.ExitStatus.PERMISSION
    lines = error_lines(err)
    assert "--key-permissions get list create delete purge" in lines[1]


# --------------------------------------------------------------------------------------------------------
# Usage and input: exit 2, before any client exists
# --------------------------------------------------------------------------------------------------------


def test_help_lists_options_and_exit_codes(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for text in (
        "--vault-url",
        "--local",
        "--name",
        "--type",
        "--size",
        "--curve",
        "--hsm",
        "--purge",
        "--keep",
    ):
        assert text in out
    for code_line in (
        "0    success",
        "2    usage",
        "3    authentication",
        "4    permission",
        "5    vault not found",
        "6    name conflict",
        "7    the vault kept throttling",
        "130  interrupted",
    ):
        assert code_line in out
    fake_client.factory.assert_not_called()


def test_readme_lists_the_exit_codes_of_help() -> None:
    readme = (Path(kv_keys.__file__).parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| exit | meaning |") :].split("\n\n")[0]
    codes = [int(row.split("|")[1]) for row in table.splitlines()[2:]]
    assert codes == [status.value for status in kv_keys.ExitStatus]


@pytest.mark.parametrize(
    "name",
    ["", "has space", "under_score", "dot.ted", "slash/es", "ünïcode", "x" * 128, "new\nline", "emoji-🔑"],
)
def test_invalid_key_names_are_refused(
    name: str, fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--name", name)
    assert code == kv_keys.ExitStatus.USAGE
    assert "invalid key name" in error_lines(err)[0]
    fake_client.factory.assert_not_called()


@pytest.mark.parametrize("name", ["a", "x" * 127, "A-1", "0-leading-digit-is-fine"])
def test_valid_key_names(name: str) -> None:
    kv_keys.check_key_name(name)


@pytest.mark.parametrize(
    "vault_name",
    [
        "ab",
        "x" * 25,
        "1starts-with-digit",
        "-dash",
        "ends-with-dash-",
        "double--dash",
        "under_score",
        "dot.ted",
    ],
)
def test_invalid_vault_names_are_refused(
    vault_name: str,
    fake_client: mock.NonCallableMagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEY_VAULT_NAME", vault_name)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.USAGE
    assert "invalid vault name" in error_lines(err)[0]
    fake_client.factory.assert_not_called()


@pytest.mark.parametrize("vault_name", ["abc", "x" * 24, "my-vault-1", "A1b"])
def test_valid_vault_names(vault_name: str) -> None:
    kv_keys.check_vault_name(vault_name)


@pytest.mark.parametrize(
    "url",
    [
        "http://my-vault.vault.azure.net",
        "my-vault.vault.azure.net",
        "https://",
        "https://my-vault.vault.azure.net/keys",
        "https://user:pw@my-vault.vault.azure.net",
        "https://my-vault.vault.azure.net?x=1",
        "https://my-vault.vault.azure.net:notaport",
        "https://127.0.0.1:",
        "https://[::1]:",
        "https://127.0.0.1:0",
        "https://127.0.0.1:65536",
    ],
)
def test_invalid_vault_urls_are_refused(
    url: str, fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--vault-url", url, "--name", NAME)
    assert code == kv_keys.ExitStatus.USAGE
    assert "invalid vault URL" in error_lines(err)[0]
    fake_client.factory.assert_not_called()


@pytest.mark.parametrize(
    "argv",
    [
        ["--curve", "P-256"],
        ["--type", "ec", "--size", "2048"],
        ["--size", "1024"],
        ["--type", "dsa"],
        ["--purge", "--keep"],
        ["--local", "--vault-url", "https://127.0.0.1:1"],
        ["--no-such-option"],
    ],
)
def test_bad_options(argv: List[str], fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--name", NAME, *argv)
    assert code == kv_keys.ExitStatus.USAGE
    error_lines(err)
    fake_client.factory.assert_not_called()


# --------------------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------------------


def test_name_from_piped_stdin(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("  piped-name \n"))
    code, out, _ = run(capsys)
    assert code == 0
    assert out.startswith("Input a name for your key [quickstart-")
    fake_client.create_rsa_key.assert_called_once_with("piped-name", size=2048, retry_status=0)


def test_empty_answer_takes_the_suggested_unique_name(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = []
    for _ in range(2):
        fake_client.get_key.side_effect = [not_found(), fake_key()]
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
        assert run(capsys)[0] == 0
        names.append(fake_client.create_rsa_key.call_args.args[0])
    assert all(name.startswith("quickstart-") for name in names)
    assert names[0] != names[1]
    kv_keys.check_key_name(names[0])


def test_end_of_input_is_a_usage_error(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run(capsys)
    assert code == kv_keys.ExitStatus.USAGE
    assert "input ended" in error_lines(err)[0]
    fake_client.factory.assert_not_called()


def test_invalid_piped_name(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("bad_name\n"))
    assert run(capsys)[0] == kv_keys.ExitStatus.USAGE
    fake_client.factory.assert_not_called()


def test_ctrl_c_at_the_prompt(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builtins.input", mock.Mock(side_effect=KeyboardInterrupt))
    code, _, err = run(capsys)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert "nothing was created" in error_lines(err)[1]
    fake_client.factory.assert_not_called()
