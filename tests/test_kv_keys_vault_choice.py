"""kv_keys.py: which vault, which credential, which TLS trust; all decided before any request.

kv_keys.make_client is patched (fixture `fake_client` in conftest.py), so no test here sends anything anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List
from unittest import mock

import pytest
from helpers import (
    NAME,
    error_lines,
    run,
)

import kv_keys

pytestmark = pytest.mark.usefixtures("azure_vault_env")

# --------------------------------------------------------------------------------------------------------
# Which vault
# --------------------------------------------------------------------------------------------------------


LOCAL_IDENTITY = {"IDENTITY_ENDPOINT": "http://127.0.0.1:9/msi/token", "IDENTITY_HEADER": "secret"}


@pytest.mark.parametrize("missing", ["IDENTITY_ENDPOINT", "IDENTITY_HEADER"])
def test_half_of_the_identity_variables_names_the_missing_one(
    missing: str, fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable, value in LOCAL_IDENTITY.items():
        if variable != missing:
            monkeypatch.setenv(variable, value)
    code, _, err = run(capsys, "--vault-url", "https://127.0.0.1:8443", "--name", NAME)
    assert code == kv_keys.ExitStatus.AUTH
    lines = error_lines(err)
    assert lines[0] == f"error: no credential for https://127.0.0.1:8443: {missing} is not set"
    assert "python -m localvault" in lines[1]
    fake_client.factory.assert_not_called()


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
    ca = {"LOCALVAULT_CA_FILE": str(ca_file), **LOCAL_IDENTITY}
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
    fake_client: mock.NonCallableMagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a stopped `python -m localvault` leaves behind: its export lines name a CA file it has removed.
    monkeypatch.setenv("LOCALVAULT_CA_FILE", str(tmp_path / "ca.pem" if what == "missing file" else tmp_path))
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    code, _, err = run(capsys, "--vault-url", "https://127.0.0.1:8443", "--name", NAME)
    assert code == kv_keys.ExitStatus.UNREACHABLE
    lines = error_lines(err)
    assert lines[0].startswith("error: cannot set up TLS: LOCALVAULT_CA_FILE names ")
    assert "not a file" in lines[0]
    assert "latest export lines" in lines[1] and "python -m localvault" in lines[1]
    assert "OSError" not in err and "CA certificate bundle" not in err
    fake_client.factory.assert_not_called()


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
@pytest.mark.parametrize("vault", [["--vault-url", "https://contoso.vault.azure.net"], []])  # [] KEY_VAULT_NAME
def test_a_stale_ca_bundle_is_reported_before_any_request_to_azure(
    variable: str,
    vault: List[str],
    tmp_path: Path,
    fake_client: mock.NonCallableMagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a stopped `python -m localvault` leaves in a shell that ran its export lines: a bundle it removed.
    bundle = tmp_path / "ca-bundle.pem"
    monkeypatch.setenv(variable, str(bundle))
    code, _, err = run(capsys, *vault, "--name", NAME)
    assert code == kv_keys.ExitStatus.UNREACHABLE
    lines = error_lines(err)
    assert lines[0].startswith(f"error: cannot set up TLS: {variable} names {bundle}, which does not exist")
    assert "`unset` line" in lines[1] and f"unset {variable}" in lines[1]
    assert "OSError" not in err
    fake_client.factory.assert_not_called()

    bundle.write_text("")  # it exists: what is in it is for requests to judge, when it connects
    code, _, err = run(capsys, *vault, "--name", NAME)
    assert code == kv_keys.ExitStatus.OK, err
    fake_client.factory.assert_called_once()


def test_empty_vault_url_option_is_a_usage_error(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With KEY_VAULT_NAME set, an empty --vault-url used to fall back to it silently.
    for value in ("", "   "):
        code, _, err = run(capsys, "--vault-url", value, "--name", NAME)
        assert code == kv_keys.ExitStatus.USAGE
        lines = error_lines(err)
        assert lines[0] == "error: --vault-url is empty"
        assert "drop --vault-url" in lines[1]
    fake_client.factory.assert_not_called()


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
    fake_client: mock.NonCallableMagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real managed identity's token must never be sent to a local port: refuse before any credential exists.
    monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    code, _, err = run(capsys, "--vault-url", "https://127.0.0.1:8443", "--name", NAME)
    assert code == kv_keys.ExitStatus.USAGE
    lines = error_lines(err)
    assert lines[0] == (
        f"error: IDENTITY_ENDPOINT is {endpoint}, not on this machine, but the vault https://127.0.0.1:8443 is: "
        "refusing to send a managed-identity token from there to a local port"
    )
    assert "python -m localvault" in lines[1]
    fake_client.factory.assert_not_called()


@pytest.mark.parametrize(
    "identity",
    [{}, {"IDENTITY_ENDPOINT": "http://10.0.0.4:8081/msi/token", "IDENTITY_HEADER": "secret"}],
    ids=["no identity variables", "a remote identity endpoint"],
)
@pytest.mark.parametrize("source", ["--vault-url", "KEY_VAULT_URL"])
def test_a_refused_local_vault_url_hint_names_where_the_url_came_from(
    source: str,
    identity: Dict[str, str],
    fake_client: mock.NonCallableMagicMock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable, value in identity.items():
        monkeypatch.setenv(variable, value)
    argv = ["--name", NAME]
    if source == "--vault-url":
        argv += ["--vault-url", "https://127.0.0.1:8443"]
    else:
        monkeypatch.setenv("KEY_VAULT_URL", "https://127.0.0.1:8443")
    code, _, err = run(capsys, *argv)
    assert code in (kv_keys.ExitStatus.AUTH, kv_keys.ExitStatus.USAGE)
    hint = error_lines(err)[1]
    way_back = "drop --vault-url" if source == "--vault-url" else "unset KEY_VAULT_URL"
    assert hint.endswith(f", or {way_back} to use the embedded localvault"), hint
    fake_client.factory.assert_not_called()


def test_local_identity_endpoint_and_azure_vault_are_not_refused() -> None:
    local = {"IDENTITY_ENDPOINT": "http://localhost:4242/msi/token", "IDENTITY_HEADER": "secret"}
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
    kv_keys.import_azure_sdk()  # as main() does once the input is checked
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
    kv_keys.import_azure_sdk()  # as main() does once the input is checked
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
    assert code == kv_keys.ExitStatus.AUTH
    assert "IDENTITY_ENDPOINT" in error_lines(err)[0]


def test_missing_localvault_package_gives_a_clear_usage_error(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEY_VAULT_NAME")
    real_find_spec = kv_keys.importlib.util.find_spec
    monkeypatch.setattr(
        kv_keys.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "localvault" else real_find_spec(name, *a),
    )
    code, out, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.USAGE
    lines = error_lines(err)
    assert "localvault" in lines[0]
    assert "run kv_keys.py from a clone" in lines[1] and "KEY_VAULT_NAME" in lines[1]
    assert "`uv run --with PATH_TO_CLONE kv_keys.py`" in lines[1] and "`pip install PATH_TO_CLONE`" in lines[1]
    assert out == ""  # it never claimed that localvault started
    fake_client.factory.assert_not_called()
