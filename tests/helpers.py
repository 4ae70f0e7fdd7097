"""What the tests share besides fixtures: localvault on the wire below the SDK or in its own process,
kv_keys.py's environment and report, and a KeyClient double's parts (the fixtures that use them are in
conftest.py)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

import kv_keys
from localvault.cli import read_exports

API_VERSION = "2025-07-01"
# What `python -m localvault` exports: the proxy, trust for every SDK, the identity endpoint, the direct URL.
EXPORTED_NAMES = (
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "AZURE_CONFIG_DIR",
    "LOCALVAULT_URL",
    "LOCALVAULT_CA_FILE",
)


def is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class RawVault:
    """``requests`` against localvault with a real token (a key vault's or a Managed HSM's) and its CA trusted;
    no SDK in between."""

    def __init__(self, vault: Any) -> None:
        self.vault = vault
        self.session = requests.Session()
        self.session.verify = vault.ca_file
        token = vault.credential().get_token(vault.resource + "/.default").token
        self.session.headers["Authorization"] = f"Bearer {token}"

    def request(
        self, method: str, path: str, api_version: str = API_VERSION, **kwargs: Any
    ) -> requests.Response:
        params = kwargs.pop("params", {})
        if api_version is not None:
            params = {"api-version": api_version, **params}
        kwargs.setdefault("verify", self.vault.ca_file)
        return self.session.request(method, self.vault.url + path, params=params, timeout=30, **kwargs)

    def close(self) -> None:
        self.session.close()


def list_keys_with(vault: Any, token: str) -> requests.Response:
    """GET /keys with this bearer token, and no other credential: how the vault judges a token."""
    return requests.get(
        f"{vault.url}/keys",
        params={"api-version": API_VERSION},
        headers={"Authorization": f"Bearer {token}"},
        verify=vault.ca_file,
        timeout=30,
    )


def error_of(response: requests.Response) -> dict:
    """The service's error object, after checking the envelope."""
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    return body["error"]


def control(vault: Any, method: str, name: str, secret: Any = True, **kwargs: Any) -> requests.Response:
    """A control API request, with the vault's identity secret unless ``secret`` says otherwise."""
    headers = kwargs.pop("headers", {})
    if secret is True:
        headers["X-IDENTITY-HEADER"] = vault.environ()["IDENTITY_HEADER"]
    elif secret is not None:
        headers["X-IDENTITY-HEADER"] = secret
    return requests.request(
        method, f"{vault.url}/_localvault/{name}", headers=headers, verify=vault.ca_file, timeout=30, **kwargs
    )


# --------------------------------------------------------------------------------------------------------
# kv_keys.py: its environment and its report
# --------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
KV_KEYS = str(REPO / "kv_keys.py")
# Variables that choose a vault or a credential; kv_keys tests start without any of them.
VAULT_VARIABLE_PREFIXES = ("KEY_VAULT_", "IDENTITY_", "LOCALVAULT_", "AZURE_", "MSI_", "IMDS_")


def environ_without_vaults() -> Dict[str, str]:
    """os.environ without anything that chooses a vault, a credential, a proxy or a CA bundle."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(VAULT_VARIABLE_PREFIXES)
        and not name.upper().endswith("_PROXY")
        and name not in EXPORTED_NAMES
    }


def pytest_with_localvault(directory: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """A pytest of its own in ``directory``, with localvault's plugin and this clone importable."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "localvault.pytest_plugin", "-p", "no:cacheprovider"],
        cwd=directory,
        env=dict(env, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=240,
    )


def use_env(monkeypatch: pytest.MonkeyPatch, env: Dict[str, str]) -> None:
    """Make os.environ equal to env for this test (monkeypatch puts it back)."""
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def error_lines(stderr: str) -> List[str]:
    """kv_keys.py's report, returned as its lines: `error: ...`, `hint: ...`, then only `cleanup: ...` lines,
    and no traceback. Lines that say a Ctrl-C is being handled (`finishing the ... request`) are left out."""
    lines = [line for line in stderr.strip().splitlines() if line and not line.startswith("finishing the ")]
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    assert all(line.startswith("cleanup: ") for line in lines[2:]), stderr
    return lines


# --------------------------------------------------------------------------------------------------------
# kv_keys.py unit tests: the parts of a KeyClient double whose errors are the real azure.core exception
# classes, built the way the SDK builds them from an HTTP response (the double is conftest's fake_client)
# --------------------------------------------------------------------------------------------------------

VAULT = "quickstart-vault"
NAME = "unit-key"
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


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Tuple[int, str, str]:
    code = kv_keys.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class Standalone:
    """`python -m localvault --port 0 ARGS` in its own process, its export lines read (from stdout, or from its
    `--env-file`); `stop()` ends it with SIGTERM and returns the rest of its output."""

    def __init__(self, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localvault", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ_without_vaults() if env is None else env,
            cwd=REPO,
        )
        watchdog = threading.Timer(60, self.process.kill)  # if it never prints its exports, fail, not hang
        watchdog.start()
        try:
            assert self.process.stdout is not None
            self.exports = read_exports(self.process.stdout)
        finally:
            watchdog.cancel()
        if "--env-file" in args:  # the export lines went to the file, not to stdout
            assert self.exports == {}
            self.exports = read_exports(Path(args[args.index("--env-file") + 1]).read_text().splitlines())
        assert set(self.exports) == set(EXPORTED_NAMES), self.exports

    @property
    def proxy_port(self) -> int:
        return int(self.exports["HTTPS_PROXY"].rsplit(":", 1)[1])

    def env(self) -> Dict[str, str]:
        return dict(environ_without_vaults(), **self.exports)

    def stop(self) -> Tuple[str, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        rest, errors = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, errors
        return rest, errors
