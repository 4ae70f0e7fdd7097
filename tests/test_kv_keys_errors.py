"""kv_keys.py with a KeyClient double: each failure is one line, a hint and its exit code.

kv_keys.make_client is patched (fixture `fake_client` in conftest.py), so no test here sends anything anywhere.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ServiceRequestError,
)
from azure.identity import CredentialUnavailableError
from helpers import (
    DAC_FAILURE,
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
# Errors before anything was created: 3, 4, 5, 1
# --------------------------------------------------------------------------------------------------------


def test_credential_failure(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = ClientAuthenticationError(message=DAC_FAILURE)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.AUTH
    lines = error_lines(err)
    assert lines[0] == (
        "error: authentication failed: DefaultAzureCredential tried Environment (not configured), "
        "SharedTokenCache (not signed in), AzureCli (not installed), AzurePowerShell (not installed), "
        "and none gave a token"
    )
    assert "az login" in lines[1]
    fake_client.create_rsa_key.assert_not_called()


def test_credential_unavailable(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = CredentialUnavailableError(
        message="EnvironmentCredential authentication unavailable."
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.AUTH
    assert "az login" in error_lines(err)[1]


def test_real_default_azure_credential_failure_is_summarised(tmp_path: Path) -> None:
    kv_keys.import_azure_sdk()  # as main() does once the input is checked
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
    assert failure.code == kv_keys.ExitStatus.AUTH
    assert "AzureCli (not installed)" in failure.message
    assert "\n" not in failure.message


def test_vault_rejects_token_401(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = http_error(
        ClientAuthenticationError, 401, "Unauthorized", "AKV10032: Invalid issuer."
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.AUTH
    assert "az login --tenant" in error_lines(err)[1]


def test_401_with_localvault_identity_variables_says_so(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    fake_client.get_key.side_effect = http_error(
        ClientAuthenticationError, 401, "Unauthorized", "AKV10032: Invalid issuer."
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.AUTH
    assert "unset them" in error_lines(err)[1]


def test_permission_denied_403(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = forbidden()
    fake_client.create_rsa_key.side_effect = forbidden("create")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.PERMISSION
    lines = error_lines(err)
    assert "does not have keys create permission" in lines[0]
    assert f"az keyvault set-policy --name {VAULT} " in lines[1]
    assert "--key-permissions get list create delete purge" in lines[1]
    assert '"Key Vault Crypto Officer"' in lines[1]
    assert f"az keyvault show --name {VAULT}" in lines[1]
    fake_client.begin_delete_key.assert_not_called()


def test_firewall_403(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = http_error(
        HttpResponseError,
        403,
        "Forbidden",
        "Client address is not authorized and caller is not a trusted service.",
    )
    fake_client.create_rsa_key.side_effect = fake_client.get_key.side_effect
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.PERMISSION
    assert "network-rule add" in error_lines(err)[1]


def dns_error() -> ServiceRequestError:
    return ServiceRequestError(
        "Failed to resolve host", error=socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    )


def test_dns_failure(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = dns_error()
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.UNREACHABLE
    lines = error_lines(err)
    assert f"{VAULT}.vault.azure.net does not resolve" in lines[0]
    assert "az keyvault list" in lines[1]


def test_dns_failure_wrapped_like_requests_does(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # requests -> urllib3 -> gaierror, as __cause__ and args, the way a real lookup failure arrives
    inner = ConnectionError("Max retries exceeded (Caused by NameResolutionError)")
    inner.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    fake_client.get_key.side_effect = ServiceRequestError(str(inner), error=inner)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.UNREACHABLE
    lines = error_lines(err)
    assert f"{VAULT}.vault.azure.net does not resolve" in lines[0]
    assert "az keyvault list" in lines[1]


def test_connection_refused_and_tls_failures(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client.get_key.side_effect = ServiceRequestError(
        "cannot connect", error=ConnectionRefusedError(111, "refused")
    )
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.UNREACHABLE
    assert "connection refused" in error_lines(err)[0]

    tls = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    fake_client.get_key.side_effect = ServiceRequestError("TLS", error=tls)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.UNREACHABLE
    lines = error_lines(err)
    assert "TLS failed" in lines[0]
    assert "never turns verification off" in lines[1]


def test_unexpected_service_error(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = http_error(HttpResponseError, 500, "InternalServerError", "Something broke.")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.SERVICE
    assert "HTTP 500" in error_lines(err)[0]


def test_verbose_shows_the_traceback(fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]) -> None:
    fake_client.get_key.side_effect = http_error(HttpResponseError, 500, "InternalServerError", "Something broke.")
    code, _, err = run(capsys, "--name", NAME, "--verbose")
    assert code == kv_keys.ExitStatus.SERVICE
    assert "Traceback (most recent call last)" in err
    assert "error: " in err and "hint: " in err


def test_verbose_shows_the_sdk_error_behind_an_explained_failure(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # The soft-deleted 409 from create becomes a Failure with its own message; --verbose still shows the SDK error.
    fake_client.create_rsa_key.side_effect = http_error(ResourceExistsError, 409, "Conflict", RECOVERABLE)
    code, _, err = run(capsys, "--name", NAME, "--verbose")
    assert code == kv_keys.ExitStatus.CONFLICT
    assert "Traceback (most recent call last)" in err
    assert (
        "azure.core.exceptions.ResourceExistsError: (Conflict) Key unit-key is currently in a deleted" in err
    )
    assert "in run_quickstart" in err  # the frame that raised it
    lines = err.strip().splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert "soft-delete" in lines[error] and lines[error + 1].startswith("hint: recover it: ")

    code, _, err = run(capsys, "--name", NAME)  # without --verbose: the two lines only
    assert "Traceback" not in err and len(error_lines(err)) == 2


def test_verbose_shows_no_traceback_for_input_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--name", "bad_name", "--verbose")
    assert code == kv_keys.ExitStatus.USAGE
    assert len(error_lines(err)) == 2


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


def test_verbose_log_redacts_tokens_on_the_azure_and_localvault_loggers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Fails if the redaction filter is not on the handler that --verbose puts on both loggers.
    import logging

    with kv_keys.sdk_logging(verbose=True):
        logging.getLogger("azure.core.pipeline").info("'Authorization': 'Bearer eyJ0eXAi.abc-def_ghi'")
        logging.getLogger("localvault.server").info(
            'token answer: {"access_token": "eyJ0.x.y", "expires_on": 1}'
        )
        logging.getLogger("azure").info("%s", '{"access_token":"eyJ1.a.b"}')
    err = capsys.readouterr().err
    assert "azure.core.pipeline INFO: 'Authorization': 'Bearer REDACTED'" in err
    assert 'localvault.server INFO: token answer: {"access_token": "REDACTED", "expires_on": 1}' in err
    assert '{"access_token":"REDACTED"}' in err
    assert "eyJ" not in err


def test_401_from_a_loopback_vault_gets_a_localvault_hint(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    fake_client.get_key.side_effect = http_error(ClientAuthenticationError, 401, "Unauthorized", "Invalid token.")
    code, _, err = run(capsys, "--vault-url", "https://127.0.0.1:8443", "--name", NAME)
    assert code == kv_keys.ExitStatus.AUTH
    lines = error_lines(err)
    assert (
        lines[0]
        == "error: https://127.0.0.1:8443 rejected the credential (HTTP 401): (Unauthorized) Invalid token."
    )
    assert lines[1] == (
        "hint: the token came from another localvault's identity endpoint, or this localvault has restarted "
        "since IDENTITY_ENDPOINT and IDENTITY_HEADER were set: run here the latest export lines that "
        "`python -m localvault` printed"
    )


HSM = "https://my-hsm.managedhsm.azure.net"


def test_managed_hsm_permission_hint_names_both_roles(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # "Managed HSM Crypto User" creates, gets, lists and deletes; only "Managed HSM Crypto Officer" purges or
    # recovers deleted keys (Microsoft's list of Managed HSM local RBAC built-in roles).
    fake_client.purge_deleted_key.side_effect = forbidden("purge")
    code, _, err = run(capsys, "--vault-url", HSM, "--name", NAME, "--purge")
    assert code == kv_keys.ExitStatus.PERMISSION
    hint = error_lines(err)[1]
    assert '"Managed HSM Crypto User" (create, get, list, delete)' in hint
    assert 'for --purge, "Managed HSM Crypto Officer"' in hint
    assert "az keyvault role assignment create --hsm-name my-hsm" in hint


@pytest.mark.parametrize(
    ("url", "recover_needs", "purge_needs"),
    [
        (
            None,
            '(needs the key permission recover, or the role "Key Vault Crypto Officer")',
            '(needs the key permission purge, or the role "Key Vault Crypto Officer")',
        ),
        (
            HSM,
            '(needs the role "Managed HSM Crypto Officer")',
            '(needs the role "Managed HSM Crypto Officer")',
        ),
    ],
)
def test_recovery_hints_say_what_recovery_needs(
    url: Any, recover_needs: str, purge_needs: str, fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    option = "--vault-name" if url is None else "--hsm-name"
    where = VAULT if url is None else "my-hsm"
    vault_args = [] if url is None else ["--vault-url", url]
    recover = f"az keyvault key recover {option} {where} --name {NAME} {recover_needs}"

    _, out, _ = run(capsys, *vault_args, "--name", NAME)  # the deletion's report
    assert f"  to recover:  {recover}" in out.splitlines()

    fake_client.get_key.side_effect = [not_found(), fake_key()]
    fake_client.get_deleted_key.side_effect = None
    fake_client.get_deleted_key.return_value = fake_deleted()  # the name belongs to a deleted key
    _, _, err = run(capsys, *vault_args, "--name", NAME)
    hint = error_lines(err)[1]
    assert f"recover it: {recover}" in hint
    assert f"purge it for good: az keyvault key purge {option} {where} --name {NAME} {purge_needs}" in hint

    fake_client.get_deleted_key.side_effect = not_found()
    fake_client.get_key.side_effect = [not_found(), fake_key()]
    fake_client.purge_deleted_key.side_effect = http_error(
        HttpResponseError, 403, "Forbidden", "Operation purge is not allowed: purge protection is enabled."
    )
    _, _, err = run(capsys, *vault_args, "--name", NAME, "--purge")
    assert error_lines(err)[1].endswith(f"or get it back: {recover}")


def test_localvault_recovery_hints_name_the_sdk_call_only() -> None:
    vault = kv_keys.Vault(kind="url", url="https://127.0.0.1:8443", label="https://127.0.0.1:8443")
    failure = kv_keys.soft_deleted_failure(vault, NAME, None)
    assert (
        f"recover it: KeyClient.begin_recover_deleted_key('{NAME}') on https://127.0.0.1:8443   or"
        in failure.hint
    )
    assert "needs" not in failure.hint


# --------------------------------------------------------------------------------------------------------
# A throttled or unavailable Azure vault: the script's own retries of the create
# --------------------------------------------------------------------------------------------------------


def busy(status: int, retry_after: str = "") -> HttpResponseError:
    code = {429: "Throttled", 503: "ServiceUnavailable"}[status]
    error = http_error(HttpResponseError, status, code, "Request was not processed.")
    if retry_after:
        error.response.headers["Retry-After"] = retry_after
    return error


def test_create_retries_follow_retry_after_capped_else_back_off(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list = []
    monkeypatch.setattr(kv_keys.time, "sleep", waits.append)
    fake_client.create_rsa_key.side_effect = [busy(429, "7"), busy(429, "120"), busy(503), busy(503), fake_key()]
    code, out, err = run(capsys, "--name", NAME)
    assert (code, err) == (0, "")
    assert waits == [
        7,
        30,
        4,
        8,
    ]  # Retry-After, at most 30 s; without it 1, 2, 4, 8, 16 s by the retry's rank
    assert (
        "  the vault is throttling requests (HTTP 429): trying the create again in 7 s (retry 1 of 5)" in out
    )
    assert "  the vault is unavailable (HTTP 503): trying the create again in 8 s (retry 4 of 5)" in out
    assert fake_client.create_rsa_key.call_count == 5


def test_persistent_throttling_on_azure_names_the_limits(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_keys.time, "sleep", lambda seconds: None)
    fake_client.create_rsa_key.side_effect = busy(429, "1")
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.BUSY
    lines = error_lines(err)
    assert lines[0].startswith(f"error: {VAULT} is throttling requests (HTTP 429), still after 5 retries: ")
    assert "20 creates" in lines[1] and "localvault" not in lines[1]
    assert len(lines) == 2  # nothing was created: no cleanup
    assert fake_client.create_rsa_key.call_count == 6


def test_ctrl_c_while_waiting_to_retry_the_create_created_nothing(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(kv_keys.time, "sleep", ctrl_c)
    fake_client.create_rsa_key.side_effect = busy(503)
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert error_lines(err) == ["error: interrupted (Ctrl-C)", "hint: nothing was created"]
    assert fake_client.create_rsa_key.call_count == 1


def test_ctrl_c_during_a_create_answered_503_stops_without_retrying(
    fake_client: mock.NonCallableMagicMock, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_keys.time, "sleep", mock.Mock(side_effect=AssertionError("no retry after Ctrl-C")))

    def create(name: str, **kwargs: Any) -> Any:
        kv_keys.signal.getsignal(kv_keys.signal.SIGINT)(
            kv_keys.signal.SIGINT, None
        )  # lets the request finish
        raise busy(503)

    fake_client.create_rsa_key.side_effect = create
    code, _, err = run(capsys, "--name", NAME)
    assert code == kv_keys.ExitStatus.INTERRUPTED
    assert error_lines(err) == ["error: interrupted (Ctrl-C)", "hint: nothing was created"]
