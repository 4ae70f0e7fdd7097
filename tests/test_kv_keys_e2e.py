"""End-to-end: `python kv_keys.py` as a subprocess against localvault, checked through the real SDK.

Every vault here is a localvault on 127.0.0.1: the session's (the `localvault` fixture, emptied before each
test), one that kv_keys.py starts itself, or a standalone `python -m localvault`. The subprocesses get an
environment without proxies, Azure credentials or KEY_VAULT_* variables, so nothing leaves loopback.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.keyvault.keys import KeyClient
from helpers import KV_KEYS, REPO, error_lines, use_env

from localvault import LocalVault


def kv_keys(
    *argv: str, env: Dict[str, str], stdin: Optional[str] = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, KV_KEYS, *argv],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.fixture
def vault_env(localvault: LocalVault, clean_env: Dict[str, str]) -> Dict[str, str]:
    """The session localvault, as `python -m localvault` users see it: KEY_VAULT_URL and friends."""
    return dict(clean_env, **localvault.environ())


def key_names(key_client) -> List[str]:
    return sorted(k.name for k in key_client.list_properties_of_keys())


def deleted_names(key_client) -> List[str]:
    return sorted(k.name for k in key_client.list_deleted_keys())


def assert_error(result: subprocess.CompletedProcess, code: int) -> List[str]:
    assert result.returncode == code, (result.stdout, result.stderr)
    return error_lines(result.stderr)


# --------------------------------------------------------------------------------------------------------
# Where the vault comes from
# --------------------------------------------------------------------------------------------------------


def test_embedded_localvault_when_nothing_is_configured(
    unique_key_name: str, clean_env: Dict[str, str]
) -> None:
    result = kv_keys("--name", unique_key_name, env=clean_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert "localvault" in lines[0] and "nothing leaves this machine" in lines[0]
    assert any(line.startswith("Creating a key in localvault at https://127.0.0.1:") for line in lines)
    assert f"Key with name '{unique_key_name}' was found." in lines
    assert lines.count(" done.") == 2
    assert any(line.startswith("  recovery id: https://127.0.0.1:") for line in lines)


def test_local_flag_wins_over_configured_variables(unique_key_name: str, clean_env: Dict[str, str]) -> None:
    # Both variables are set, to values that fail on loopback if used: nothing listens on port 9, and "x" is
    # not a valid vault name. --local must not even look at them.
    env = dict(clean_env, KEY_VAULT_URL="https://127.0.0.1:9", KEY_VAULT_NAME="x")
    result = kv_keys("--local", "--name", unique_key_name, env=env)
    assert result.returncode == 0, result.stderr
    assert "nothing leaves this machine" in result.stdout.splitlines()[0]
    assert "127.0.0.1:9 " not in result.stdout


def test_session_vault_through_its_environment(
    vault_env: Dict[str, str], key_client: KeyClient, unique_key_name: str
) -> None:
    result = kv_keys("--name", unique_key_name, env=vault_env)
    assert result.returncode == 0, result.stderr
    assert f"Creating a key in {vault_env['KEY_VAULT_URL']} called '{unique_key_name}' ..." in result.stdout
    assert "nothing leaves" not in result.stdout
    # deleted for real, and the deletion had finished: the deleted key is listed
    assert key_names(key_client) == []
    deleted = key_client.get_deleted_key(unique_key_name)
    assert deleted.recovery_id.endswith(f"/deletedkeys/{unique_key_name}")
    assert deleted.key_type == "RSA" and len(deleted.key.n) * 8 == 2048
    assert f"  recovery id: {deleted.recovery_id}" in result.stdout
    assert "KeyClient.begin_recover_deleted_key" in result.stdout


def test_vault_url_option_against_a_standalone_localvault(
    standalone_localvault: Dict[str, str], clean_env: Dict[str, str]
) -> None:
    url = standalone_localvault["LOCALVAULT_URL"]
    env = dict(clean_env, **standalone_localvault)  # the export lines carry no KEY_VAULT_URL: the vault comes from --vault-url
    result = kv_keys("--vault-url", url, "--name", "standalone-key", "--purge", env=env)
    assert result.returncode == 0, result.stderr
    assert f"Creating a key in {url} called 'standalone-key' ..." in result.stdout
    assert "The name 'standalone-key' can be used again." in result.stdout


def test_standalone_ca_is_not_trusted_without_its_variable(
    standalone_localvault: Dict[str, str], clean_env: Dict[str, str]
) -> None:
    # At its direct URL the CA is trusted only through LOCALVAULT_CA_FILE or the exported CA bundles: without
    # them TLS is verified against the normal trust store, and fails.
    env = dict(clean_env, **standalone_localvault)
    for name in ("LOCALVAULT_CA_FILE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        del env[name]
    url = standalone_localvault["LOCALVAULT_URL"]
    lines = assert_error(kv_keys("--vault-url", url, "--name", "no-ca-key", env=env), 5)
    assert "TLS failed" in lines[0]
    assert "LOCALVAULT_CA_FILE" in lines[1]


def test_connection_refused_on_a_free_port(vault_env: Dict[str, str]) -> None:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago; nothing listens on it now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(vault_env, KEY_VAULT_URL=f"https://127.0.0.1:{port}")
    lines = assert_error(kv_keys("--name", "refused-key", env=env), 5)
    assert "connection refused" in lines[0]
    assert lines[1] == (
        "hint: is localvault still running there? Start it again with the same --port (and --data, which "
        "keeps its CA and secrets), or use the export lines of the localvault that is running"
    )


# --------------------------------------------------------------------------------------------------------
# The key name: piped, end of input, invalid
# --------------------------------------------------------------------------------------------------------


def test_piped_name(vault_env: Dict[str, str], key_client: KeyClient, unique_key_name: str) -> None:
    result = kv_keys(env=vault_env, stdin=f"{unique_key_name}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Input a name for your key [quickstart-")
    assert deleted_names(key_client) == [unique_key_name]


def test_end_of_input_creates_nothing(vault_env: Dict[str, str], key_client: KeyClient) -> None:
    lines = assert_error(kv_keys(env=vault_env, stdin=""), 2)
    assert "input ended" in lines[0]
    assert key_names(key_client) == [] and deleted_names(key_client) == []


INVALID_NAMES = ["under_score", "with space", "dot.ted", "x" * 128, "slash/key", "ünïcode", "semi;colon"]


def test_invalid_names_create_nothing(vault_env: Dict[str, str], key_client: KeyClient) -> None:
    for name in INVALID_NAMES:
        for result in (kv_keys("--name", name, env=vault_env), kv_keys(env=vault_env, stdin=name + "\n")):
            assert "invalid key name" in assert_error(result, 2)[0]
            assert "Creating" not in result.stdout
    assert key_names(key_client) == [] and deleted_names(key_client) == []


# --------------------------------------------------------------------------------------------------------
# Never harm what it did not create
# --------------------------------------------------------------------------------------------------------


def test_existing_name_is_refused_and_the_key_is_unchanged(
    vault_env: Dict[str, str],
    key_client: KeyClient,
    unique_key_name: str,
) -> None:
    key_client.create_rsa_key(unique_key_name, size=2048)
    key_client.create_rsa_key(unique_key_name, size=2048)
    before = sorted(
        (v.id, v.enabled, v.updated_on) for v in key_client.list_properties_of_key_versions(unique_key_name)
    )

    lines = assert_error(kv_keys("--name", unique_key_name, env=vault_env), 6)
    assert "already exists" in lines[0]

    after = sorted(
        (v.id, v.enabled, v.updated_on) for v in key_client.list_properties_of_key_versions(unique_key_name)
    )
    assert after == before and len(after) == 2
    assert deleted_names(key_client) == []


def test_soft_deleted_name_is_explained(
    vault_env: Dict[str, str], key_client: KeyClient, unique_key_name: str
) -> None:
    key_client.create_ec_key(unique_key_name)
    key_client.begin_delete_key(unique_key_name).wait()

    lines = assert_error(kv_keys("--name", unique_key_name, env=vault_env), 6)
    assert "deleted key" in lines[0] and "soft-delete" in lines[0]
    assert f"KeyClient.begin_recover_deleted_key('{unique_key_name}')" in lines[1]
    assert f"KeyClient.purge_deleted_key('{unique_key_name}')" in lines[1]
    assert key_names(key_client) == []
    assert deleted_names(key_client) == [unique_key_name]


def test_purge_then_the_same_name_again(
    vault_env: Dict[str, str], key_client: KeyClient, unique_key_name: str
) -> None:
    first = kv_keys("--name", unique_key_name, "--purge", env=vault_env)
    assert first.returncode == 0, first.stderr
    with pytest.raises(ResourceNotFoundError):
        key_client.get_deleted_key(unique_key_name)

    second = kv_keys("--name", unique_key_name, env=vault_env)
    assert second.returncode == 0, second.stderr
    assert deleted_names(key_client) == [unique_key_name]

    third = kv_keys("--name", unique_key_name, env=vault_env)  # without --purge the name is now taken
    assert "deleted key" in assert_error(third, 6)[0]


# --------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------


def test_keep_leaves_the_key(vault_env: Dict[str, str], key_client: KeyClient, unique_key_name: str) -> None:
    result = kv_keys("--name", unique_key_name, "--keep", env=vault_env)
    assert result.returncode == 0, result.stderr
    assert "Deleting" not in result.stdout
    kept = key_client.get_key(unique_key_name)
    assert kept.properties.enabled
    assert [v.version for v in key_client.list_properties_of_key_versions(unique_key_name)] == [
        kept.properties.version
    ]
    assert f"same version as created: {kept.properties.version}" in result.stdout


def test_ec_key(vault_env: Dict[str, str], key_client: KeyClient, unique_key_name: str) -> None:
    result = kv_keys("--name", unique_key_name, "--type", "ec", "--curve", "P-384", env=vault_env)
    assert result.returncode == 0, result.stderr
    assert "type:       EC, curve P-384" in result.stdout
    deleted = key_client.get_deleted_key(unique_key_name)
    assert deleted.key_type == "EC" and deleted.key.crv == "P-384"


def test_verbose_logs_http_with_the_token_redacted(vault_env: Dict[str, str], unique_key_name: str) -> None:
    result = kv_keys("--name", unique_key_name, "--verbose", env=vault_env)
    assert result.returncode == 0, result.stderr
    assert "Request URL: 'https://127.0.0.1:" in result.stderr
    assert "'Authorization': 'REDACTED'" in result.stderr
    assert "eyJ" not in result.stderr  # no JSON Web Token, from localvault or anywhere
    assert vault_env["IDENTITY_HEADER"] not in result.stderr


# --------------------------------------------------------------------------------------------------------
# Failures that must be blamed on the right thing
# --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago; nothing listens on it now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_refused_identity_endpoint_is_an_auth_error_not_the_vaults(
    vault_env: Dict[str, str], key_client: KeyClient
) -> None:
    # The vault runs; only the token endpoint is gone (e.g. variables from an older localvault run).
    endpoint = f"http://127.0.0.1:{free_port()}/msi/token"
    result = kv_keys("--name", "no-token-key", env=dict(vault_env, IDENTITY_ENDPOINT=endpoint))
    lines = assert_error(result, 3)
    assert lines[0] == (
        f"error: no token from localvault's identity endpoint {endpoint} (IDENTITY_ENDPOINT): connection refused"
    )
    assert "restart `python -m localvault`" in lines[1] and "latest export lines" in lines[1]
    assert "new ports" not in lines[1]  # untrue for a vault restarted with --port and --data
    assert vault_env["KEY_VAULT_URL"] not in result.stderr  # the vault is not blamed
    assert "Creating" not in result.stdout  # it failed at the name check, before any create
    assert key_names(key_client) == [] and deleted_names(key_client) == []


def test_wrong_identity_header_is_an_auth_error(vault_env: Dict[str, str], key_client: KeyClient) -> None:
    result = kv_keys("--name", "wrong-header-key", env=dict(vault_env, IDENTITY_HEADER="not-the-secret"))
    lines = assert_error(result, 3)
    assert lines[0].startswith(
        f"error: no token from localvault's identity endpoint {vault_env['IDENTITY_ENDPOINT']} (IDENTITY_ENDPOINT): "
    )
    assert "X-IDENTITY-HEADER" in lines[0]  # localvault's reason, as its endpoint gave it
    assert "latest export lines" in lines[1]
    assert vault_env["IDENTITY_HEADER"] not in result.stderr and "not-the-secret" not in result.stderr
    assert key_names(key_client) == []


def test_stale_ca_file_of_a_stopped_localvault(vault_env: Dict[str, str], tmp_path: Path) -> None:
    env = dict(vault_env, LOCALVAULT_CA_FILE=str(tmp_path / "localvault-stopped" / "ca.pem"))
    lines = assert_error(kv_keys("--name", "stale-ca-key", env=env), 5)
    assert "LOCALVAULT_CA_FILE" in lines[0] and "not a file" in lines[0]
    assert "latest export lines" in lines[1]


# --------------------------------------------------------------------------------------------------------
# Races and interruptions, in process against the session vault: the real SDK, with one call intercepted
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def in_process(
    localvault: LocalVault, clean_env: Dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> LocalVault:
    """kv_keys.main() in this process, configured like a user of `python -m localvault` (KEY_VAULT_URL ...)."""
    env = {name: value for name, value in clean_env.items() if name != "AZURE_TOKEN_CREDENTIALS"}
    use_env(monkeypatch, {**env, **localvault.environ()})  # as the session vault's key_client needs it too
    return localvault


def intercept(monkeypatch: pytest.MonkeyPatch, method: str, before_answer) -> List[str]:
    """Make kv_keys's KeyClient run before_answer(client, name) after its first `method` call reached the vault."""
    import kv_keys

    calls: List[str] = []
    real_make_client = kv_keys.make_client

    def make_client(vault):
        client = real_make_client(vault)
        real = getattr(client, method)

        def call(name, *args, **kwargs):
            calls.append(name)
            result = real(name, *args, **kwargs)
            if len(calls) == 1:
                before_answer(client, name)
            return result

        setattr(client, method, call)
        return client

    monkeypatch.setattr(kv_keys, "make_client", make_client)
    return calls


def test_key_created_by_someone_else_after_the_name_check_is_never_deleted(
    in_process: LocalVault,
    key_client: KeyClient,
    unique_key_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kv_keys

    theirs = []
    real_check = kv_keys.check_name_is_free

    def check_then_another_writer_creates(client, vault, name):
        free = real_check(client, vault, name)
        theirs.append(key_client.create_ec_key(name))  # another writer, between the check and the create
        return free

    monkeypatch.setattr(kv_keys, "check_name_is_free", check_then_another_writer_creates)
    code = kv_keys.main(["--name", unique_key_name])
    _, err = capsys.readouterr()

    assert code == 6, err
    versions = {v.version: v for v in key_client.list_properties_of_key_versions(unique_key_name)}
    their_version = theirs[0].properties.version
    [our_version] = set(versions) - {their_version}
    assert versions[their_version].enabled and versions[our_version].enabled  # nothing deleted or disabled
    assert key_client.get_key(unique_key_name, their_version).key_type == "EC"
    assert deleted_names(key_client) == []
    lines = error_lines(err)
    assert f"This run added version {our_version} to it and deleted nothing" in lines[0]
    assert f"KeyClient.update_key_properties('{unique_key_name}', '{our_version}', enabled=False)" in lines[1]
    assert lines[2].startswith("cleanup: nothing deleted")


def test_ctrl_c_while_the_delete_request_is_in_flight(
    in_process: LocalVault,
    key_client: KeyClient,
    unique_key_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kv_keys

    def ctrl_c(client, name):
        raise KeyboardInterrupt  # the vault has deleted the key; the answer is never handled

    calls = intercept(monkeypatch, "begin_delete_key", ctrl_c)
    code = kv_keys.main(["--name", unique_key_name])
    _, err = capsys.readouterr()

    assert code == 130, err
    assert calls == [unique_key_name, unique_key_name]  # the cleanup tried once more, and got "not found"
    deleted = key_client.get_deleted_key(unique_key_name)
    assert key_names(key_client) == []
    lines = error_lines(err)
    assert lines[:2] == [
        "error: interrupted (Ctrl-C)",
        "hint: the key that this run created is deleted: its deletion had gone through (see below)",
    ]
    assert lines[2].startswith("cleanup: nothing left to delete: ")
    assert f"it is kept as the deleted key {deleted.recovery_id} until " in lines[2]
    assert "cleanup failed" not in err and "still in" not in err


def test_first_ctrl_c_while_the_create_request_is_in_flight(
    in_process: LocalVault,
    key_client: KeyClient,
    unique_key_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kv_keys

    def ctrl_c(client, name):
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the vault has created the key, and answers

    intercept(monkeypatch, "create_rsa_key", ctrl_c)
    code = kv_keys.main(["--name", unique_key_name])
    _, err = capsys.readouterr()

    assert code == 130, err
    assert key_names(key_client) == [] and deleted_names(key_client) == [unique_key_name]
    assert err.startswith("\nfinishing the create request, then cleaning up; Ctrl-C again to stop now\n")
    assert error_lines(err)[1:] == [
        "hint: the key that this run created was deleted (see below)",
        f"cleanup: done, the key '{unique_key_name}' created by this run is deleted.",
    ]


def test_401_from_a_loopback_vault_is_blamed_on_localvaults_variables(
    vault_env: Dict[str, str], key_client: KeyClient
) -> None:
    # The vault's URL and CA, but the identity variables of another localvault: its tokens are refused.
    with LocalVault() as other:
        env = dict(vault_env, **{k: v for k, v in other.environ().items() if k.startswith("IDENTITY_")})
        lines = assert_error(kv_keys("--name", "other-token-key", env=env), 3)
    assert lines[0].startswith(f"error: {vault_env['KEY_VAULT_URL']} rejected the credential (HTTP 401)")
    assert "another localvault" in lines[1] and "latest export lines" in lines[1]
    assert "az login" not in lines[1]
    assert key_names(key_client) == []
