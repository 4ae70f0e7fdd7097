"""Unit tests for kv_keys.py with a mocked KeyClient: every exit code, the safety rules and the cleanup.

The client factory kv_keys.make_client is patched, so no test here sends anything anywhere. Errors are the
real azure.core exception classes, built the way the SDK builds them from an HTTP response.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional
from unittest import mock

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity import CredentialUnavailableError

import kv_keys

REPO = Path(__file__).resolve().parent.parent
VAULT = "quickstart-vault"
NAME = "unit-key"
CLEARED = (
    "KEY_VAULT_URL",
    "KEY_VAULT_NAME",
    "LOCALVAULT_CA_FILE",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
)

DAC_FAILURE = (
    "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
    "Attempted credentials:\n"
    "\tEnvironmentCredential: EnvironmentCredential authentication unavailable. "
    "Environment variables are not fully configured.\n"
    "\tSharedTokenCacheCredential: SharedTokenCacheCredential authentication unavailable. "
    "No accounts were found in the cache.\n"
    "\tAzureCliCredential: Azure CLI not found on path\n"
    "\tAzurePowerShellCredential: PowerShell is not installed\n"
    "To mitigate this issue, please refer to the troubleshooting guidelines here at "
    "https://aka.ms/azsdk/python/identity/defaultazurecredential/troubleshoot."
)
RECOVERABLE = (
    f"Key {NAME} is currently in a deleted but recoverable state, and its name cannot be reused; "
    "in this state, the key can only be recovered or purged."
)


# --------------------------------------------------------------------------------------------------------
# Fakes: responses that the real exception classes parse, keys shaped like the SDK's models
# --------------------------------------------------------------------------------------------------------


class FakeResponse:
    """Just enough of azure.core's HttpResponse for HttpResponseError to read status and error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status_code = status
        self.reason = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict"}.get(
            status, "Error"
        )
        self.headers: Dict[str, str] = {"content-type": "application/json"}
        self.content_type = "application/json"
        self.request = None
        self._body = json.dumps({"error": {"code": code, "message": message}})

    def text(self, encoding: Optional[str] = None) -> str:
        return self._body


def http_error(cls: type, status: int, code: str, message: str) -> HttpResponseError:
    return cls(response=FakeResponse(status, code, message))


def not_found() -> ResourceNotFoundError:
    return http_error(
        ResourceNotFoundError, 404, "KeyNotFound", f"A key with (name/id) {NAME} was not found."
    )


def forbidden(operation: str = "get") -> HttpResponseError:
    return http_error(
        HttpResponseError,
        403,
        "Forbidden",
        f"The user, group or application 'appid=x;oid=y' does not have keys {operation} permission on key vault "
        f"'{VAULT};location=westeurope'.",
    )


def fake_key(version: str = "v1", kty: str = "RSA") -> SimpleNamespace:
    material = (
        SimpleNamespace(n=b"\xc3" * 256, crv=None) if kty.startswith("RSA") else SimpleNamespace(crv="P-384")
    )
    return SimpleNamespace(
        id=f"https://{VAULT}.vault.azure.net/keys/{NAME}/{version}",
        name=NAME,
        key_type=kty,
        key_operations=["sign", "verify"],
        key=material,
        properties=SimpleNamespace(
            version=version, enabled=True, created_on=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        ),
    )


def fake_deleted() -> SimpleNamespace:
    return SimpleNamespace(
        name=NAME,
        recovery_id=f"https://{VAULT}.vault.azure.net/deletedkeys/{NAME}",
        scheduled_purge_date=datetime(2025, 4, 2, tzinfo=timezone.utc),
        deleted_date=datetime(2025, 1, 2, tzinfo=timezone.utc),
    )


class FakePoller:
    def __init__(self, wait_error: Optional[BaseException] = None) -> None:
        self.wait_error = wait_error
        self.waited = 0

    def wait(self, timeout: Optional[float] = None) -> None:
        self.waited += 1
        if self.wait_error:
            raise self.wait_error

    def result(self) -> SimpleNamespace:
        return fake_deleted()


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Azure vault by name; no localvault variables; DefaultAzureCredential limited to developer tools."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")
    monkeypatch.setenv("KEY_VAULT_NAME", VAULT)


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> mock.MagicMock:
    """A KeyClient double for the happy path: the name is free, create works, get finds the same version."""
    fake = mock.MagicMock(name="KeyClient")
    fake.get_key.side_effect = [not_found(), fake_key()]
    fake.get_deleted_key.side_effect = not_found()
    fake.create_rsa_key.return_value = fake_key()
    fake.create_ec_key.return_value = fake_key(kty="EC")
    fake.begin_delete_key.return_value = FakePoller()
    fake.list_properties_of_key_versions.return_value = [SimpleNamespace(version="v1")]
    factory = mock.Mock(return_value=fake, name="make_client")
    monkeypatch.setattr(kv_keys, "make_client", factory)
    fake.factory = factory
    return fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple:
    code = kv_keys.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str) -> List[str]:
    """An error is exactly `error: ...` then `hint: ...` (cleanup lines may follow), never a traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[0].startswith("error: "), err
    assert lines[1].startswith("hint: "), err
    assert not any(line.startswith(("error:", "hint:")) for line in lines[2:]), err
    return lines


# --------------------------------------------------------------------------------------------------------
# The happy path and the options
# --------------------------------------------------------------------------------------------------------


def test_default_run_reproduces_the_original_flow(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--name", NAME)
    assert (code, err) == (0, "")
    client.create_rsa_key.assert_called_once_with(NAME, size=2048)
    client.list_properties_of_key_versions.assert_called_once_with(NAME)  # no other version: ours to delete
    assert client.get_key.call_args_list == [mock.call(NAME), mock.call(NAME)]
    client.begin_delete_key.assert_called_once_with(NAME)
    assert client.begin_delete_key.return_value.waited == 1
    client.purge_deleted_key.assert_not_called()
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
    assert "purge date:  2025-04-02" in out
    assert f"az keyvault key recover --vault-name {VAULT} --name {NAME}" in out
    assert f"az keyvault key purge --vault-name {VAULT} --name {NAME}" in out
    vault = client.factory.call_args.args[0]
    assert (vault.kind, vault.url, vault.ca_file) == ("azure", f"https://{VAULT}.vault.azure.net", None)


def test_ec_key_with_curve(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--name", NAME, "--type", "ec", "--curve", "P-384")
    assert code == 0
    client.create_ec_key.assert_called_once_with(NAME, curve="P-384")
    client.create_rsa_key.assert_not_called()
    assert "EC, curve P-384" in out


def test_ec_default_curve_and_hsm_and_size(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--name", NAME, "--type", "ec", "--hsm")[0] == 0
    client.create_ec_key.assert_called_once_with(NAME, curve="P-256", hardware_protected=True)
    client.get_key.side_effect = [not_found(), fake_key()]
    assert run(capsys, "--name", NAME, "--size", "4096", "--hsm")[0] == 0
    client.create_rsa_key.assert_called_once_with(NAME, size=4096, hardware_protected=True)


def test_keep_skips_deletion(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--name", NAME, "--keep")
    assert code == 0
    client.begin_delete_key.assert_not_called()
    assert f"az keyvault key delete --vault-name {VAULT} --name {NAME}" in out


def test_purge_after_deletion(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    order: List[str] = []
    poller = FakePoller()
    poller.wait = lambda timeout=None: order.append("wait")  # type: ignore[method-assign]
    client.begin_delete_key.return_value = poller
    client.purge_deleted_key.side_effect = lambda name: order.append(f"purge {name}")
    code, out, _ = run(capsys, "--name", NAME, "--purge")
    assert code == 0
    assert order == ["wait", f"purge {NAME}"]
    assert f"The name '{NAME}' can be used again (Azure may take a few seconds to finish)." in out


def test_purge_protection_is_explained(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.purge_deleted_key.side_effect = http_error(
        HttpResponseError,
        403,
        "Forbidden",
        'Operation "purge" is not allowed because purge protection is enabled for this vault. '
        "Key Vault service will automatically purge it after the retention period has passed.",
    )
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.EXIT_PERMISSION
    lines = assert_one_error(err)
    assert "purge protection" in lines[0]
    assert "2025-04-02" in lines[1]
    client.begin_delete_key.assert_called_once()  # deleted once, no cleanup attempt after a finished delete


def test_purge_while_the_deletion_is_still_in_progress(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # Azure can answer a purge right after the deletion with 409 "Key is currently being deleted."
    client.purge_deleted_key.side_effect = http_error(
        ResourceExistsError, 409, "Conflict", f"Key {NAME} is currently being deleted."
    )
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.EXIT_SERVICE
    lines = assert_one_error(err)
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
    client.begin_delete_key.assert_called_once()


def test_purge_permission_missing(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.purge_deleted_key.side_effect = forbidden("purge")
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.EXIT_PERMISSION
    lines = assert_one_error(err)
    assert "--key-permissions get list create delete purge" in lines[1]


# --------------------------------------------------------------------------------------------------------
# Usage and input: exit 2, before any client exists
# --------------------------------------------------------------------------------------------------------


def test_help_lists_options_and_exit_codes(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
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
        "130  interrupted",
    ):
        assert code_line in out
    client.factory.assert_not_called()


@pytest.mark.parametrize(
    "name",
    ["", "has space", "under_score", "dot.ted", "slash/es", "ünïcode", "x" * 128, "new\nline", "emoji-🔑"],
)
def test_invalid_key_names_are_refused(
    name: str, client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--name", name)
    assert code == kv_keys.EXIT_USAGE
    assert "invalid key name" in assert_one_error(err)[0]
    client.factory.assert_not_called()


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
    client: mock.MagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEY_VAULT_NAME", vault_name)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_USAGE
    assert "invalid vault name" in assert_one_error(err)[0]
    client.factory.assert_not_called()


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
    ],
)
def test_invalid_vault_urls_are_refused(
    url: str, client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--vault-url", url, "--name", NAME)
    assert code == kv_keys.EXIT_USAGE
    assert "invalid vault URL" in assert_one_error(err)[0]
    client.factory.assert_not_called()


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
def test_bad_options(argv: List[str], client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--name", NAME, *argv)
    assert code == kv_keys.EXIT_USAGE
    assert_one_error(err)
    client.factory.assert_not_called()


# --------------------------------------------------------------------------------------------------------
# Which vault
# --------------------------------------------------------------------------------------------------------


def choose(argv: List[str], environ: Dict[str, str]) -> kv_keys.Vault:
    return kv_keys.choose_vault(kv_keys.parse_args(argv), environ)


def test_vault_order_url_then_name_then_embedded() -> None:
    both = {"KEY_VAULT_URL": "https://a-vault.vault.azure.net/", "KEY_VAULT_NAME": "b-vault"}
    assert choose([], both).url == "https://a-vault.vault.azure.net"
    assert (
        choose(["--vault-url", "https://c.managedhsm.azure.net"], both).url
        == "https://c.managedhsm.azure.net"
    )
    assert choose([], {"KEY_VAULT_NAME": "b-vault"}).url == "https://b-vault.vault.azure.net"
    assert choose([], {}).kind == "embedded"
    assert choose([], {"KEY_VAULT_NAME": "  ", "KEY_VAULT_URL": ""}).kind == "embedded"
    assert choose(["--local"], both).kind == "embedded"


def test_localvault_ca_is_trusted_for_loopback_urls_only(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("a CA certificate\n")
    ca = {"LOCALVAULT_CA_FILE": str(ca_file)}
    assert choose(["--vault-url", "https://127.0.0.1:8443"], ca).ca_file == str(ca_file)
    assert choose(["--vault-url", "https://[::1]:8443"], ca).ca_file == str(ca_file)
    assert choose(["--vault-url", "https://my-vault.vault.azure.net"], ca).ca_file is None
    assert choose([], {**ca, "KEY_VAULT_NAME": "my-vault"}).ca_file is None
    # for a vault in Azure the variable is ignored, so a stale one is no error there
    gone = {"LOCALVAULT_CA_FILE": str(tmp_path / "gone.pem")}
    assert choose(["--vault-url", "https://my-vault.vault.azure.net"], gone).ca_file is None


@pytest.mark.parametrize("what", ["missing file", "directory"])
def test_stale_localvault_ca_file_is_reported_before_any_request(
    what: str,
    tmp_path: Path,
    client: mock.MagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a stopped `python -m localvault` leaves behind: its export lines name a CA file it has removed.
    monkeypatch.setenv("LOCALVAULT_CA_FILE", str(tmp_path / "ca.pem" if what == "missing file" else tmp_path))
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    code, _, err = run(capsys, "--vault-url", "https://127.0.0.1:8443", "--name", NAME)
    assert code == kv_keys.EXIT_UNREACHABLE
    lines = assert_one_error(err)
    assert lines[0].startswith("error: cannot set up TLS: LOCALVAULT_CA_FILE names ")
    assert "not a file" in lines[0]
    assert "latest export lines" in lines[1] and "python -m localvault" in lines[1]
    assert "OSError" not in err and "CA certificate bundle" not in err
    client.factory.assert_not_called()


def test_empty_vault_url_option_is_a_usage_error(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With KEY_VAULT_NAME set, an empty --vault-url used to fall back to it silently.
    for value in ("", "   "):
        code, _, err = run(capsys, "--vault-url", value, "--name", NAME)
        assert code == kv_keys.EXIT_USAGE
        lines = assert_one_error(err)
        assert lines[0] == "error: --vault-url is empty"
        assert "drop --vault-url" in lines[1]
    client.factory.assert_not_called()


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://169.254.169.254/metadata/identity/oauth2/token",
        "http://10.0.0.4:8081/msi/token",
        "https://login.example.net/token",
        "not a url",
    ],
)
def test_non_local_identity_endpoint_is_refused_for_a_local_vault(
    endpoint: str,
    client: mock.MagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real managed identity's token must never be sent to a local port: refuse before any credential exists.
    monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    code, _, err = run(capsys, "--vault-url", "https://127.0.0.1:8443", "--name", NAME)
    assert code == kv_keys.EXIT_USAGE
    lines = assert_one_error(err)
    assert lines[0] == (
        f"error: IDENTITY_ENDPOINT is {endpoint}, not on this machine, but the vault https://127.0.0.1:8443 is: "
        "refusing to send a managed-identity token from there to a local port"
    )
    assert "python -m localvault" in lines[1]
    client.factory.assert_not_called()


def test_local_identity_endpoint_and_azure_vault_are_not_refused() -> None:
    local = {"IDENTITY_ENDPOINT": "http://localhost:4242/msi/token"}
    assert choose(["--vault-url", "https://127.0.0.1:8443"], local).url == "https://127.0.0.1:8443"
    remote = {"IDENTITY_ENDPOINT": "http://169.254.169.254/metadata/identity/oauth2/token"}
    assert choose(["--vault-url", "https://my-vault.vault.azure.net"], remote).kind == "url"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.3.2.1", "::1", "localhost", "LocalHost", "::ffff:127.0.0.1"]
)
def test_loopback_hosts(host: str) -> None:
    assert kv_keys.is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "169.254.169.254",
        "my-vault.vault.azure.net",
        "localhost.example.com",
        "127.0.0.1.nip.io",
        "",
    ],
)
def test_non_loopback_hosts(host: str) -> None:
    assert not kv_keys.is_loopback_host(host)


def find_policy(client: Any, name: str) -> Any:
    for policy in client._client._client._pipeline._impl_policies:
        inner = getattr(policy, "_policy", policy)
        if type(inner).__name__ == name:
            return inner
    raise AssertionError(name)


def test_azure_client_keeps_challenge_verification_and_default_trust() -> None:
    client = kv_keys.make_client(
        kv_keys.Vault(kind="azure", url="https://my-vault.vault.azure.net", label="my-vault")
    )
    try:
        assert find_policy(client, "ChallengeAuthPolicy")._verify_challenge_resource is True
        assert (
            type(find_policy(client, "ChallengeAuthPolicy")._credential).__name__ == "DefaultAzureCredential"
        )
        transport = client._client._client._pipeline._transport
        assert transport.connection_config.verify is True
    finally:
        client.close()


def test_loopback_client_trusts_the_local_ca_and_skips_only_the_challenge_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    vault = kv_keys.Vault(kind="url", url="https://127.0.0.1:8443", label="x", ca_file="ca.pem")
    client = kv_keys.make_client(vault)
    try:
        assert find_policy(client, "ChallengeAuthPolicy")._verify_challenge_resource is False
        credential = find_policy(client, "ChallengeAuthPolicy")._credential
        assert isinstance(credential, kv_keys.LocalTokenSource)
        assert type(credential.credential).__name__ == "ManagedIdentityCredential"
        transport = client._client._client._pipeline._transport
        assert transport.connection_config.verify == "ca.pem"
        assert transport._use_env_settings is False  # no proxy for loopback traffic
    finally:
        client.close()


def test_loopback_url_without_identity_variables_is_an_auth_error(capsys: pytest.CaptureFixture[str]) -> None:
    # make_client is the real one: it must refuse before ManagedIdentityCredential could probe 169.254.169.254.
    code, _, err = run(capsys, "--vault-url", "https://127.0.0.1:8443", "--name", NAME)
    assert code == kv_keys.EXIT_AUTH
    assert "IDENTITY_ENDPOINT" in assert_one_error(err)[0]


def test_missing_localvault_package_gives_a_clear_usage_error(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEY_VAULT_NAME")
    real_find_spec = kv_keys.importlib.util.find_spec
    monkeypatch.setattr(
        kv_keys.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "localvault" else real_find_spec(name, *a),
    )
    code, out, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_USAGE
    lines = assert_one_error(err)
    assert "localvault" in lines[0]
    assert "run kv_keys.py from a clone" in lines[1] and "KEY_VAULT_NAME" in lines[1]
    assert "nothing leaves this machine" in out.splitlines()[0]
    client.factory.assert_not_called()


# --------------------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------------------


def test_name_from_piped_stdin(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("  piped-name \n"))
    code, out, _ = run(capsys)
    assert code == 0
    assert out.startswith("Input a name for your key [quickstart-")
    client.create_rsa_key.assert_called_once_with("piped-name", size=2048)


def test_empty_answer_takes_the_suggested_unique_name(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = []
    for _ in range(2):
        client.get_key.side_effect = [not_found(), fake_key()]
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
        assert run(capsys)[0] == 0
        names.append(client.create_rsa_key.call_args.args[0])
    assert all(name.startswith("quickstart-") for name in names)
    assert names[0] != names[1]
    kv_keys.check_key_name(names[0])


def test_end_of_input_is_a_usage_error(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run(capsys)
    assert code == kv_keys.EXIT_USAGE
    assert "input ended" in assert_one_error(err)[0]
    client.factory.assert_not_called()


def test_invalid_piped_name(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("bad_name\n"))
    assert run(capsys)[0] == kv_keys.EXIT_USAGE
    client.factory.assert_not_called()


def test_ctrl_c_at_the_prompt(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builtins.input", mock.Mock(side_effect=KeyboardInterrupt))
    code, _, err = run(capsys)
    assert code == kv_keys.EXIT_INTERRUPTED
    assert "nothing was created" in assert_one_error(err)[1]
    client.factory.assert_not_called()


# --------------------------------------------------------------------------------------------------------
# Never harm what it did not create
# --------------------------------------------------------------------------------------------------------


def test_existing_key_is_refused_and_untouched(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = None
    client.get_key.return_value = fake_key("older")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    assert "already exists" in assert_one_error(err)[0]
    assert [c[0] for c in client.method_calls] == ["get_key", "close"]


def test_soft_deleted_name_is_explained(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_deleted_key.side_effect = None
    client.get_deleted_key.return_value = fake_deleted()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    lines = assert_one_error(err)
    assert "deleted key" in lines[0] and "2025-04-02" in lines[0]
    assert f"az keyvault key recover --vault-name {VAULT} --name {NAME}" in lines[1]
    assert f"az keyvault key purge --vault-name {VAULT} --name {NAME}" in lines[1]
    client.create_rsa_key.assert_not_called()


def test_lookup_forbidden_then_409_from_create(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = forbidden()
    client.create_rsa_key.side_effect = http_error(ResourceExistsError, 409, "Conflict", RECOVERABLE)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    lines = assert_one_error(err)
    assert "deleted key" in lines[0]
    assert f"az keyvault key recover --vault-name {VAULT} --name {NAME}" in lines[1]
    client.begin_delete_key.assert_not_called()


def test_409_from_create_after_a_clean_lookup(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_rsa_key.side_effect = http_error(ResourceExistsError, 409, "Conflict", RECOVERABLE)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    assert f"az keyvault key purge --vault-name {VAULT} --name {NAME}" in assert_one_error(err)[1]


def test_concurrent_create_after_the_name_check_is_never_deleted(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # The name was free, then someone else created it before our create: create added our version v1 on top
    # of theirs, and get returns v1, so only the version list shows that the key is not ours alone.
    client.list_properties_of_key_versions.return_value = [
        SimpleNamespace(version="theirs"),
        SimpleNamespace(version="v1"),
    ]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    lines = assert_one_error(err)
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
    client.begin_delete_key.assert_not_called()
    client.update_key_properties.assert_not_called()


def test_version_list_without_the_created_version_is_left_alone(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.list_properties_of_key_versions.return_value = [SimpleNamespace(version="someone-elses")]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    assert "something else is writing to this key" in assert_one_error(err)[0]
    client.begin_delete_key.assert_not_called()


def test_versions_not_listable_means_no_deletion(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # The name was free, but without the version list a concurrent writer's versions cannot be ruled out.
    client.list_properties_of_key_versions.side_effect = forbidden("list")
    code, out, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_PERMISSION
    lines = assert_one_error(err)
    assert lines[0] == (
        f"error: not deleting '{NAME}': this identity may not list the key's versions, so this run cannot tell "
        "whether the key holds versions that it did not create"
    )
    assert "--key-permissions get list create delete purge" in lines[1]
    assert "cleanup: nothing deleted" in err
    client.begin_delete_key.assert_not_called()
    assert f"Key with name '{NAME}' was found." in out


def test_versions_not_listable_is_fine_with_keep(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.list_properties_of_key_versions.side_effect = forbidden("list")
    code, _, err = run(capsys, "--name", NAME, "--keep")
    assert (code, err) == (0, "")
    client.begin_delete_key.assert_not_called()


def test_lookup_forbidden_and_key_existed_adds_no_deletion(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # get is forbidden (e.g. the existing key is disabled): create added a version; the script must not delete.
    client.get_key.side_effect = forbidden()
    client.list_properties_of_key_versions.return_value = [
        SimpleNamespace(version="old"),
        SimpleNamespace(version="v1"),
    ]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    lines = assert_one_error(err)
    assert "already existed" in lines[0] and "v1" in lines[0]
    assert (
        f"az keyvault key set-attributes --vault-name {VAULT} --name {NAME} --version v1 --enabled false"
        in lines[1]
    )
    client.begin_delete_key.assert_not_called()
    assert "nothing deleted" in err


def test_lookup_forbidden_and_key_new_is_deleted(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = [forbidden(), fake_key()]
    assert run(capsys, "--name", NAME)[0] == 0
    client.begin_delete_key.assert_called_once_with(NAME)


def test_unknown_ownership_is_never_deleted(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = [forbidden(), fake_key()]
    client.list_properties_of_key_versions.side_effect = forbidden("list")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_PERMISSION
    assert_one_error(err)
    client.begin_delete_key.assert_not_called()
    assert "this run created https://" in err


def test_other_version_appearing_is_left_alone(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = [not_found(), fake_key("someone-elses")]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_CONFLICT
    assert_one_error(err)
    client.begin_delete_key.assert_not_called()


# --------------------------------------------------------------------------------------------------------
# Errors before anything was created: 3, 4, 5, 1
# --------------------------------------------------------------------------------------------------------


def test_credential_failure(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = ClientAuthenticationError(message=DAC_FAILURE)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_AUTH
    lines = assert_one_error(err)
    assert lines[0] == (
        "error: authentication failed: DefaultAzureCredential tried Environment (not configured), "
        "SharedTokenCache (not signed in), AzureCli (not installed), AzurePowerShell (not installed), "
        "and none gave a token"
    )
    assert "az login" in lines[1]
    client.create_rsa_key.assert_not_called()


def test_credential_unavailable(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = CredentialUnavailableError(
        message="EnvironmentCredential authentication unavailable."
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_AUTH
    assert "az login" in assert_one_error(err)[1]


def test_real_default_azure_credential_failure_is_summarised(tmp_path: Path) -> None:
    # The real DefaultAzureCredential, limited to developer tools (AZURE_TOKEN_CREDENTIALS=dev), as a client would
    # call it; its report becomes one line. No tool is found or signed in, so nothing is sent anywhere.
    from azure.identity import DefaultAzureCredential

    # An empty PATH hides az, pwsh and azd; an empty HOME hides any token cache that could be refreshed.
    hidden = {"PATH": "", "HOME": str(tmp_path), "USERPROFILE": str(tmp_path)}
    with mock.patch.dict(os.environ, hidden), pytest.raises(ClientAuthenticationError) as caught:
        DefaultAzureCredential().get_token("https://vault.azure.net/.default")
    failure = kv_keys.explain(
        caught.value, kv_keys.Vault(kind="azure", url="https://v.vault.azure.net", label="v")
    )
    assert failure.code == kv_keys.EXIT_AUTH
    assert "AzureCli (not installed)" in failure.message
    assert "\n" not in failure.message


def test_vault_rejects_token_401(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = http_error(
        ClientAuthenticationError, 401, "Unauthorized", "AKV10032: Invalid issuer."
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_AUTH
    assert "az login --tenant" in assert_one_error(err)[1]


def test_401_with_localvault_identity_variables_says_so(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    client.get_key.side_effect = http_error(
        ClientAuthenticationError, 401, "Unauthorized", "AKV10032: Invalid issuer."
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_AUTH
    assert "unset them" in assert_one_error(err)[1]


def test_permission_denied_403(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = forbidden()
    client.create_rsa_key.side_effect = forbidden("create")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_PERMISSION
    lines = assert_one_error(err)
    assert "does not have keys create permission" in lines[0]
    assert f"az keyvault set-policy --name {VAULT} " in lines[1]
    assert "--key-permissions get list create delete purge" in lines[1]
    assert '"Key Vault Crypto Officer"' in lines[1]
    assert f"az keyvault show --name {VAULT}" in lines[1]
    client.begin_delete_key.assert_not_called()


def test_firewall_403(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = http_error(
        HttpResponseError,
        403,
        "Forbidden",
        "Client address is not authorized and caller is not a trusted service.",
    )
    client.create_rsa_key.side_effect = client.get_key.side_effect
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_PERMISSION
    assert "network-rule add" in assert_one_error(err)[1]


def dns_error() -> ServiceRequestError:
    return ServiceRequestError(
        "Failed to resolve host", error=socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    )


def test_dns_failure(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = dns_error()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_UNREACHABLE
    lines = assert_one_error(err)
    assert f"{VAULT}.vault.azure.net does not resolve" in lines[0]
    assert "az keyvault list" in lines[1]


def test_dns_failure_wrapped_like_requests_does(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # requests -> urllib3 -> gaierror, as __cause__ and args, the way a real lookup failure arrives
    inner = ConnectionError("Max retries exceeded (Caused by NameResolutionError)")
    inner.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    client.get_key.side_effect = ServiceRequestError(str(inner), error=inner)
    assert run(capsys, "--name", NAME)[0] == kv_keys.EXIT_UNREACHABLE


def test_connection_refused_and_tls_failures(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = ServiceRequestError(
        "cannot connect", error=ConnectionRefusedError(111, "refused")
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_UNREACHABLE
    assert "connection refused" in assert_one_error(err)[0]

    tls = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    client.get_key.side_effect = ServiceRequestError("TLS", error=tls)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_UNREACHABLE
    lines = assert_one_error(err)
    assert "TLS failed" in lines[0]
    assert "never turns verification off" in lines[1]


def test_unexpected_service_error(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = http_error(HttpResponseError, 500, "InternalServerError", "Something broke.")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_SERVICE
    assert "HTTP 500" in assert_one_error(err)[0]


def test_verbose_shows_the_traceback(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = http_error(HttpResponseError, 500, "InternalServerError", "Something broke.")
    code, _, err = run(capsys, "--name", NAME, "--verbose")
    assert code == kv_keys.EXIT_SERVICE
    assert "Traceback (most recent call last)" in err
    assert "error: " in err and "hint: " in err


def test_verbose_shows_the_sdk_error_behind_an_explained_failure(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # The soft-deleted 409 from create becomes a Failure with its own message; --verbose still shows the SDK error.
    client.create_rsa_key.side_effect = http_error(ResourceExistsError, 409, "Conflict", RECOVERABLE)
    code, _, err = run(capsys, "--name", NAME, "--verbose")
    assert code == kv_keys.EXIT_CONFLICT
    assert "Traceback (most recent call last)" in err
    assert (
        "azure.core.exceptions.ResourceExistsError: (Conflict) Key unit-key is currently in a deleted" in err
    )
    assert "in create_key" in err  # the frame that raised it
    lines = err.strip().splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert "soft-delete" in lines[error] and lines[error + 1].startswith("hint: recover it: ")

    code, _, err = run(capsys, "--name", NAME)  # without --verbose: the two lines only
    assert "Traceback" not in err and len(assert_one_error(err)) == 2


def test_verbose_shows_no_traceback_for_input_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--name", "bad_name", "--verbose")
    assert code == kv_keys.EXIT_USAGE
    assert len(assert_one_error(err)) == 2


def test_redaction_filter() -> None:
    import logging

    record = logging.LogRecord(
        "azure",
        logging.INFO,
        __file__,
        1,
        "headers: %s",
        ("'Authorization': 'Bearer eyJ0eXAi.abc-def_ghi'",),
        None,
    )
    kv_keys._Redact().filter(record)
    assert record.getMessage() == "headers: 'Authorization': 'Bearer REDACTED'"
    challenge = (
        "'WWW-Authenticate': 'Bearer authorization=\"https://login.example/t\", resource=\"https://vault\"'"
    )
    record = logging.LogRecord("azure", logging.INFO, __file__, 1, challenge, None, None)
    kv_keys._Redact().filter(record)
    assert record.getMessage() == challenge
    record = logging.LogRecord("azure", logging.INFO, __file__, 1, '{"access_token": "eyJ0.x.y"}', None, None)
    kv_keys._Redact().filter(record)
    assert "eyJ0" not in record.getMessage()


# --------------------------------------------------------------------------------------------------------
# Cleanup guarantee: after create and before delete, a failure or Ctrl-C deletes the key and says so
# --------------------------------------------------------------------------------------------------------


def test_cleanup_when_get_fails_after_create(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = [not_found(), forbidden()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_PERMISSION
    assert_one_error(err)
    client.begin_delete_key.assert_called_once_with(NAME)
    assert f"cleanup: done, the key '{NAME}' created by this run is deleted." in err


def test_keep_means_no_cleanup_after_a_failure(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = [not_found(), forbidden()]
    code, _, err = run(capsys, "--name", NAME, "--keep")
    assert code == kv_keys.EXIT_PERMISSION
    assert_one_error(err)
    client.begin_delete_key.assert_not_called()
    assert (
        f"cleanup: skipped (--keep): https://{VAULT}.vault.azure.net/keys/{NAME}/v1 stays in {VAULT}; "
        f"to delete it: az keyvault key delete --vault-name {VAULT} --name {NAME}"
    ) in err


def test_cleanup_when_delete_fails(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.begin_delete_key.side_effect = forbidden("delete")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_PERMISSION
    assert_one_error(err)
    assert client.begin_delete_key.call_count == 2  # the step, then the cleanup attempt
    assert f"the key https://{VAULT}.vault.azure.net/keys/{NAME}/v1 is still in {VAULT}" in err
    assert f"az keyvault key delete --vault-name {VAULT} --name {NAME}" in err


def test_failure_while_waiting_for_deletion(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.begin_delete_key.return_value = FakePoller(
        wait_error=http_error(HttpResponseError, 500, "Oops", "Oops.")
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_SERVICE
    assert_one_error(err)
    client.begin_delete_key.assert_called_once()
    assert "deletion of 'unit-key' was requested" in err


def test_ctrl_c_between_create_and_delete(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.get_key.side_effect = [not_found(), KeyboardInterrupt()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    lines = assert_one_error(err)
    assert lines[:2] == [
        "error: interrupted (Ctrl-C)",
        "hint: the key that this run created was deleted (see below)",
    ]
    client.begin_delete_key.assert_called_once_with(NAME)
    assert lines[2:] == [f"cleanup: done, the key '{NAME}' created by this run is deleted."]


def test_second_ctrl_c_during_cleanup_is_reported(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = [not_found(), KeyboardInterrupt()]
    client.begin_delete_key.side_effect = KeyboardInterrupt()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    lines = assert_one_error(err)
    assert (
        lines[1]
        == f"hint: the key that this run created may still be in {VAULT}: delete it yourself (see below)"
    )
    assert "cleanup failed (interrupted)" in err
    assert f"az keyvault key delete --vault-name {VAULT} --name {NAME}" in err


def test_ctrl_c_during_the_delete_request_is_not_reported_as_a_failed_cleanup(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C while DELETE was in flight: the vault deleted the key, so cleanup's own delete answers 404.
    client.begin_delete_key.side_effect = [KeyboardInterrupt(), not_found()]
    client.get_deleted_key.side_effect = [
        not_found(),
        fake_deleted(),
    ]  # the name check, then the confirmation
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    lines = assert_one_error(err)
    assert (
        lines[1]
        == "hint: the key that this run created is deleted: its deletion had gone through (see below)"
    )
    assert lines[2:] == [
        f"cleanup: nothing left to delete: {VAULT} answered that '{NAME}' is not there, it was already deleted; "
        f"it is kept as the deleted key https://{VAULT}.vault.azure.net/deletedkeys/{NAME} "
        "until 2025-04-02 00:00:00+00:00."
    ]
    assert "cleanup failed" not in err and "still in" not in err
    assert client.begin_delete_key.call_count == 2
    assert client.get_deleted_key.call_args_list == [mock.call(NAME), mock.call(NAME)]


def test_already_deleted_without_a_deleted_key_to_show(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_key.side_effect = [not_found(), http_error(HttpResponseError, 500, "Oops", "Oops.")]
    client.begin_delete_key.side_effect = not_found()  # e.g. someone else deleted it meanwhile
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_SERVICE
    lines = assert_one_error(err)
    assert lines[2:] == [
        f"cleanup: nothing left to delete: {VAULT} answered that '{NAME}' is not there, it was already deleted."
    ]


# Ctrl-C or a lost answer while the create request was in flight: the vault may have created the key.


def test_ctrl_c_during_create_deletes_the_key_it_made(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_rsa_key.side_effect = KeyboardInterrupt()
    client.get_key.side_effect = [not_found(), fake_key("made")]  # the name check, then the lookup
    client.list_properties_of_key_versions.return_value = [SimpleNamespace(version="made")]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    lines = assert_one_error(err)
    assert lines[1] == "hint: the key that the cut-off create request made was deleted (see below)"
    assert lines[2:] == [f"cleanup: done, the key '{NAME}' created by this run is deleted."]
    client.begin_delete_key.assert_called_once_with(NAME)
    assert "nothing was created" not in err and "may have been created" not in err


def test_ctrl_c_during_create_that_made_nothing(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_rsa_key.side_effect = KeyboardInterrupt()
    client.get_key.side_effect = [not_found(), not_found()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    lines = assert_one_error(err)
    assert lines[1] == "hint: nothing was created: the vault has no key by this name"
    assert lines[2:] == [f"cleanup: {VAULT} has no key '{NAME}': the cut-off create request created nothing"]
    assert "may have been created" not in err
    client.begin_delete_key.assert_not_called()


@pytest.mark.parametrize(
    ("situation", "why"),
    [
        ("the name was not checkable", "the name could not be checked before the create"),
        ("the key has two versions", f"the key '{NAME}' has 2 versions, so it is not this run's alone"),
        ("the lookup fails", "looking the key up failed (interrupted)"),
        ("versions are not listable", "this identity may not list the key's versions"),
    ],
)
def test_ctrl_c_during_create_that_cannot_be_settled_says_how_to_check(
    situation: str, why: str, client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_rsa_key.side_effect = KeyboardInterrupt()
    if situation == "the name was not checkable":
        client.get_key.side_effect = forbidden()
    elif situation == "the lookup fails":
        client.get_key.side_effect = [not_found(), KeyboardInterrupt()]
    else:
        client.get_key.side_effect = [not_found(), fake_key("made")]
    if situation == "the key has two versions":
        client.list_properties_of_key_versions.return_value = [
            SimpleNamespace(version="theirs"),
            SimpleNamespace(version="made"),
        ]
    elif situation == "versions are not listable":
        client.list_properties_of_key_versions.side_effect = forbidden("list")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    lines = assert_one_error(err)
    show = f"az keyvault key show --vault-name {VAULT} --name {NAME}"
    assert lines[1] == (
        f"hint: the key '{NAME}' may have been created before the create request was cut off; to check: {show}"
    )
    assert len(lines) == 3 and lines[2].startswith(f"cleanup: nothing deleted, since {why}")
    assert lines[2].endswith(f"; to check: {show}")
    client.begin_delete_key.assert_not_called()


def test_lost_response_during_create_looks_the_key_up(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_rsa_key.side_effect = ServiceResponseError("Connection aborted.")
    client.get_key.side_effect = [not_found(), fake_key()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_UNREACHABLE
    lines = assert_one_error(err)
    assert "Connection aborted." in lines[0] and "check the vault URL" in lines[1]  # the failure's own hint
    assert lines[2:] == [f"cleanup: done, the key '{NAME}' created by this run is deleted."]
    client.begin_delete_key.assert_called_once_with(NAME)


def test_refused_create_needs_no_lookup(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.create_rsa_key.side_effect = forbidden("create")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_PERMISSION
    assert len(assert_one_error(err)) == 2
    assert client.get_key.call_count == 1  # the name check only


def test_ctrl_c_after_create_with_unknown_ownership_deletes_nothing_and_says_so(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.list_properties_of_key_versions.side_effect = forbidden("list")
    client.get_key.side_effect = [not_found(), KeyboardInterrupt()]
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    lines = assert_one_error(err)
    assert lines[1] == (
        f"hint: nothing was deleted: this run cannot tell whether the key '{NAME}' holds versions that it did "
        "not create (see below)"
    )
    assert lines[2].startswith(
        "cleanup: nothing deleted, since this identity may not list the key's versions"
    )
    assert f"this run created https://{VAULT}.vault.azure.net/keys/{NAME}/v1" in lines[2]
    assert (
        lines[3]
        == f"cleanup: if the key is yours alone, delete it: az keyvault key delete --vault-name {VAULT} --name {NAME}"
    )
    assert "deleted now" not in err and "cleanup: done" not in err
    client.begin_delete_key.assert_not_called()


def test_ctrl_c_during_purge(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    client.purge_deleted_key.side_effect = KeyboardInterrupt()
    code, _, err = run(capsys, "--name", NAME, "--purge")
    assert code == kv_keys.EXIT_INTERRUPTED
    assert assert_one_error(err) == [
        "error: interrupted (Ctrl-C)",
        "hint: the key that this run created is deleted, but perhaps not purged; to purge it: "
        f"az keyvault key purge --vault-name {VAULT} --name {NAME}",
    ]
    client.begin_delete_key.assert_called_once()


def test_ctrl_c_while_waiting_for_the_deletion(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.begin_delete_key.return_value = FakePoller(wait_error=KeyboardInterrupt())
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    assert assert_one_error(err)[1:] == [
        "hint: the key that this run created is deleted; the vault finishes the deletion by itself",
        f"cleanup: the deletion of '{NAME}' was requested; the vault completes it.",
    ]
    client.begin_delete_key.assert_called_once()


def test_ctrl_c_before_create_created_nothing(
    client: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    client.get_deleted_key.side_effect = KeyboardInterrupt()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.EXIT_INTERRUPTED
    assert assert_one_error(err) == ["error: interrupted (Ctrl-C)", "hint: nothing was created"]
    client.create_rsa_key.assert_not_called()


# --------------------------------------------------------------------------------------------------------
# Waiting for the deletion: a spinner on a terminal, plain lines otherwise
# --------------------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """A stdout that says it is a terminal and signals once the spinner has drawn a frame."""

    def __init__(self) -> None:
        super().__init__()
        self.spun = threading.Event()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if "waiting until the deletion has finished" in text and text.endswith("s"):
            self.spun.set()
        return super().write(text)


def test_spinner_on_a_terminal(client: mock.MagicMock, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    poller = FakePoller()
    poller.wait = lambda timeout=None: terminal.spun.wait(30)  # type: ignore[method-assign]
    client.begin_delete_key.return_value = poller
    assert kv_keys.main(["--name", NAME]) == 0
    out = terminal.getvalue()
    assert "\r  waiting until the deletion has finished | 0." in out
    assert "\r\033[K" in out


def test_plain_lines_when_not_a_terminal(client: mock.MagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "--name", NAME)
    assert "  waiting until the deletion has finished ...\n done.\n" in out
    assert "\r" not in out


# --------------------------------------------------------------------------------------------------------
# --help and input errors do not import the Azure SDK
# --------------------------------------------------------------------------------------------------------


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.upper().endswith("_PROXY")}
    env["AZURE_TOKEN_CREDENTIALS"] = "dev"
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("argv", "stdin", "extra", "code"),
    [
        (["--help"], "", {}, 0),
        (["--name", "bad_name"], "", {}, 2),
        (["--name", "ok"], "", {"KEY_VAULT_NAME": "x"}, 2),
        ([], "", {}, 2),  # end of input at the prompt
        ([], "bad name\n", {"KEY_VAULT_NAME": "my-vault"}, 2),
        # an empty --vault-url; the fallback it must not take is a loopback port where nothing listens
        (["--name", "ok", "--vault-url", ""], "", {"KEY_VAULT_URL": "https://127.0.0.1:9"}, 2),
        (  # a stale LOCALVAULT_CA_FILE (relative to the clone, where no such file is)
            ["--name", "ok", "--vault-url", "https://127.0.0.1:9"],
            "",
            {"LOCALVAULT_CA_FILE": "no-such-localvault-dir/ca.pem"},
            5,
        ),
        (  # a loopback vault with a remote identity endpoint
            ["--name", "ok", "--vault-url", "https://127.0.0.1:9"],
            "",
            {
                "IDENTITY_ENDPOINT": "http://169.254.169.254/metadata/identity/oauth2/token",
                "IDENTITY_HEADER": "x",
            },
            2,
        ),
    ],
)
def test_help_and_input_errors_do_not_import_azure(
    argv: List[str], stdin: str, extra: Dict[str, str], code: int
) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "kv_keys.py"), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(**extra),
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == code, result.stderr
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert imported, "no -X importtime output"
    assert not [
        module for module in imported if module.startswith(("azure", "localvault", "requests", "msal"))
    ]
