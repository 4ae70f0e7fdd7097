"""localvault at a vault's real address, through its proxy port: code written for Azure, unchanged.

The witnesses run in subprocesses whose only setup is a standalone localvault's export lines. The other
tests run in this process, where the pytest plugin applied the session vault's environment at configure
time: ``KeyClient("https://NAME.vault.azure.net", DefaultAzureCredential())`` reaches it as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError
from azure.identity import DefaultAzureCredential
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm
from helpers import EXPORTED_NAMES, REPO, Standalone, environ_without_vaults

from localvault import LocalVault

API = {"api-version": "2025-07-01"}
JS = REPO / "tests" / "js"
WITNESS_NAMES = {kind: f"{kind}{uuid.uuid4().hex[:12]}" for kind in ("sync", "aio", "js")}


def fresh_name(prefix: str = "p") -> str:
    return f"{prefix}{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------------------------------------
# A standalone localvault, and programs that see only its export lines
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standalone() -> Iterator[Standalone]:
    """`python -m localvault --isolated`, serving only the witnesses' vault names."""
    names = [arg for name in WITNESS_NAMES.values() for arg in ("--vault", name)]
    vault = Standalone("--isolated", *names)
    yield vault
    vault.stop()


def run_witness(command: List[str], standalone: Standalone, name: str) -> None:
    result = subprocess.run(
        [*command, f"https://{name}.vault.azure.net"],
        capture_output=True,
        text=True,
        env=standalone.env(),
        cwd=REPO,
        timeout=240,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.split() == ["OK", "27"], result.stdout


def test_unchanged_python_sync(standalone: Standalone) -> None:
    run_witness([sys.executable, "tests/unchanged/keys_sync.py"], standalone, WITNESS_NAMES["sync"])


def test_unchanged_python_aio(standalone: Standalone) -> None:
    pytest.importorskip("aiohttp", reason="aiohttp (requirements-dev.txt) runs the async witness")
    run_witness([sys.executable, "tests/unchanged/keys_aio.py"], standalone, WITNESS_NAMES["aio"])


def test_unchanged_javascript(standalone: Standalone) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript witness needs it")
    assert (JS / "node_modules" / "@azure" / "keyvault-keys").is_dir(), (
        "the JavaScript SDK is not installed: run `npm ci --prefix tests/js` (as .ci/run does)"
    )
    run_witness([node, "tests/js/keys.mjs"], standalone, WITNESS_NAMES["js"])


def connect(port: int, target: str) -> Tuple[int, bytes, socket.socket]:
    """Send ``CONNECT target`` to a proxy port; the status, the body of a refusal, and the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    status = int(head.split(b" ", 2)[1])
    body = b""
    if status != 200:
        length = int(
            next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:]
        )
        while len(body) < length:
            body += sock.recv(length - len(body))
    return status, body, sock


def test_standalone_serves_only_its_names_and_refuses_other_hosts(standalone: Standalone) -> None:
    status, body, sock = connect(standalone.proxy_port, "fabrikam.vault.azure.net:443")
    sock.close()
    assert status == 502
    served = ", ".join(sorted(WITNESS_NAMES.values()))
    assert (
        body.decode()
        == f"localvault serves no vault at fabrikam.vault.azure.net:443; it serves only {served} (--vault).\n"
    )
    status, body, sock = connect(standalone.proxy_port, "pypi.org:443")
    sock.close()
    assert status == 403
    assert body.decode() == (
        "localvault's proxy is isolated and does not reach pypi.org:443; "
        "add pypi.org to NO_PROXY and no_proxy to reach it directly.\n"
    )


def test_stopping_prints_the_unset_line_and_removes_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "localvault.env"
    vault = Standalone("--isolated", "--env-file", str(env_file))
    assert env_file.stat().st_mode & 0o777 == 0o600
    rest, _ = vault.stop()
    lines = rest.splitlines()
    assert lines[-1] == "unset " + " ".join(vault.exports), lines
    assert lines[-2] == (
        f"# localvault stopped; {env_file} removed. Undo its exports in each shell that loaded them:"
    )
    assert not env_file.exists()


# --------------------------------------------------------------------------------------------------------
# In this process: the session vault's proxy, applied to os.environ by the plugin
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def credential() -> Iterator[DefaultAzureCredential]:
    credential = DefaultAzureCredential()
    yield credential
    credential.close()


def test_the_plugin_applied_the_proxy_environment(localvault_session: LocalVault) -> None:
    environ = localvault_session.environ()
    for name in EXPORTED_NAMES:
        assert os.environ[name] == environ[name], name
    assert os.environ["HTTPS_PROXY"] == f"http://127.0.0.1:{localvault_session.proxy_port}"
    assert os.environ["NO_PROXY"] == os.environ["no_proxy"] == "127.0.0.1"
    # The Azure CLI's login is the vault's own, apart from ~/.azure: empty, private, gone with the vault.
    config = Path(os.environ["AZURE_CONFIG_DIR"])
    assert config.is_dir() and config.stat().st_mode & 0o777 == 0o700
    assert Path(localvault_session.ca_file).parent == config.parent
    bundle = Path(os.environ["REQUESTS_CA_BUNDLE"]).read_text()
    assert Path(localvault_session.ca_file).read_text().strip() in bundle
    assert bundle.count("BEGIN CERTIFICATE") > 10  # certifi's CAs too, so other HTTPS keeps working


def test_each_name_is_a_vault_of_its_own(
    credential: DefaultAzureCredential, localvault_session: LocalVault, unique_key_name: str
) -> None:
    first, second, hsm = fresh_name(), fresh_name(), fresh_name()
    a = KeyClient(f"https://{first}.vault.azure.net", credential)
    b = KeyClient(f"https://{second}.vault.azure.net", credential)
    h = KeyClient(f"https://{hsm}.managedhsm.azure.net", credential)
    try:
        in_a = a.create_rsa_key(unique_key_name, size=2048)
        in_b = b.create_ec_key(unique_key_name)
        in_h = h.create_oct_key(unique_key_name, hardware_protected=True)
        assert in_a.id.startswith(f"https://{first}.vault.azure.net/keys/{unique_key_name}/")
        assert in_b.id.startswith(f"https://{second}.vault.azure.net/keys/{unique_key_name}/")
        assert in_h.id.startswith(f"https://{hsm}.managedhsm.azure.net/keys/{unique_key_name}/")
        assert (in_a.key_type, in_b.key_type, in_h.key_type) == ("RSA", "EC", "oct-HSM")
        assert a.get_key(unique_key_name).id == in_a.id and b.get_key(unique_key_name).id == in_b.id
        # A key vault has no oct-HSM keys; its deletions are its own.
        with pytest.raises(HttpResponseError) as refused:
            a.create_oct_key(fresh_name("oct"), hardware_protected=True)
        assert refused.value.status_code == 400
        a.begin_delete_key(unique_key_name).wait()
        assert [k.name for k in a.list_deleted_keys()] == [unique_key_name]
        assert list(b.list_deleted_keys()) == []
        assert b.get_key(unique_key_name).id == in_b.id
        # The session's own vault, at 127.0.0.1, holds none of them.
        own = localvault_session.key_client()
        with pytest.raises(ResourceNotFoundError):
            own.get_key(unique_key_name)
        own.close()
        hosts = {vault.url for vault in localvault_session.vaults()}
        assert {f"https://{first}.vault.azure.net", f"https://{hsm}.managedhsm.azure.net"} <= hosts
    finally:
        for client in (a, b, h):
            client.close()


def test_ids_and_links_name_the_host_the_client_used(credential: DefaultAzureCredential) -> None:
    vault_url = f"https://{fresh_name()}.vault.azure.net"
    client = KeyClient(vault_url, credential)
    try:
        key = client.create_rsa_key("signer", size=2048)
        assert key.id.startswith(f"{vault_url}/keys/signer/")
        for i in range(25):
            client.create_ec_key(f"page-{i}")
        assert len(list(client.list_properties_of_keys())) == 26  # the SDK followed nextLink here
        policy = client.get_key_rotation_policy("signer")
        assert policy.id == f"{vault_url}/keys/signer/rotationpolicy"

        crypto = CryptographyClient(key.id, credential)  # the key's id, as an application keeps it
        digest = b"\x01" * 32
        signature = crypto.sign(SignatureAlgorithm.rs256, digest).signature
        assert crypto.verify(SignatureAlgorithm.rs256, digest, signature).is_valid
        crypto.close()

        deleted = client.begin_delete_key("signer").result()
        assert deleted.recovery_id == f"{vault_url}/deletedkeys/signer"
    finally:
        client.close()
    token = credential.get_token("https://vault.azure.net/.default").token
    page = requests.get(
        f"{vault_url}/keys", params={**API, "maxresults": "1"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert page.status_code == 200
    host = vault_url[len("https://") :]
    assert page.json()["nextLink"].startswith(f"https://{host}:443/keys?")


def test_no_vault_name_is_ever_resolved(
    credential: DefaultAzureCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: List[Any] = []
    guarded = socket.getaddrinfo  # the conftest guard, which refuses any lookup beyond loopback

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return guarded(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    name = fresh_name()
    client = KeyClient(f"https://{name}.vault.azure.net", credential)
    try:
        client.create_ec_key("resolved-nowhere")
        assert client.get_key("resolved-nowhere").name == "resolved-nowhere"
    finally:
        client.close()
    assert looked_up, "the client looked nothing up at all: this test saw no connection"
    assert {str(host) for host in looked_up} == {"127.0.0.1"}, looked_up


def test_the_session_proxy_is_isolated(localvault_session: LocalVault) -> None:
    assert localvault_session.isolated
    status, body, sock = connect(localvault_session.proxy_port, "login.microsoftonline.com:443")
    sock.close()
    assert status == 403
    assert body.decode().count("\n") == 1 and "add login.microsoftonline.com to NO_PROXY" in body.decode()
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get("https://login.microsoftonline.com/common", timeout=30)


@pytest.mark.parametrize(
    "request_head, status, line",
    [
        ("CONNECT nohostport HTTP/1.1", 400, "The CONNECT target 'nohostport' is not host:port."),
        ("CONNECT contoso.vault.azure.net:99999 HTTP/1.1", 400, "is not host:port"),
        (
            "CONNECT contoso.vault.azure.net:444 HTTP/1.1",
            502,
            "localvault serves no vault at contoso.vault.azure.net:444.",
        ),
        ("CONNECT -bad-.vault.azure.net:443 HTTP/1.1", 400, "is not host:port"),
        (
            "CONNECT a.vault.azure.net:443 HTTP/1.1",
            502,
            "localvault serves no vault at a.vault.azure.net:443.",
        ),
        ("GET http://example.com/ HTTP/1.1", 405, "localvault's proxy tunnels HTTPS only (CONNECT host:443)"),
        ("GARBAGE", 400, ""),
    ],
)
def test_malformed_or_unserved_proxy_requests(
    localvault_session: LocalVault, request_head: str, status: int, line: str
) -> None:
    with socket.create_connection(("127.0.0.1", localvault_session.proxy_port), timeout=30) as sock:
        sock.sendall(f"{request_head}\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == str(status).encode(), answer
    assert line in body.decode()
    assert body.decode().count("\n") == 1


def test_pass_through_tunnels_other_hosts_unread(localvault_session: LocalVault) -> None:
    # The target is a TLS server on loopback: the session vault's own port. The handshake through the
    # tunnel meets that server's certificate, so the proxy relayed the bytes and terminated nothing.
    with LocalVault(isolated=False) as tunnel:
        status, _, sock = connect(tunnel.proxy_port, f"127.0.0.1:{localvault_session.port}")
        assert status == 200
        context = ssl.create_default_context(cafile=localvault_session.ca_file)
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(
                b"GET /keys?api-version=2025-07-01 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert b'WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/' in answer
        # And a vault name is still served in process, not tunnelled.
        status, _, sock = connect(tunnel.proxy_port, "contoso.vault.azure.net:443")
        sock.close()
        assert status == 200


def test_vaults_limits_the_names_served(tmp_path: Path) -> None:
    with LocalVault(vaults=["Contoso"]) as vault:
        assert vault.allowed_vaults == ("contoso",)
        status, body, sock = connect(vault.proxy_port, "fabrikam.vault.azure.net:443")
        sock.close()
        assert (status, body) == (
            502,
            b"localvault serves no vault at fabrikam.vault.azure.net:443; it serves only contoso (--vault).\n",
        )
        client = vault.vault("contoso.vault.azure.net").key_client()
        try:
            assert client.create_ec_key("allowed").name == "allowed"
        finally:
            client.close()
        refused = KeyClient(
            "https://fabrikam.vault.azure.net",
            vault.credential(),
            proxies={"https": vault.proxy_url},
            connection_verify=vault.trust_bundle,
            retry_total=0,
        )
        with pytest.raises(ServiceRequestError):
            refused.get_key("anything")
        refused.close()
    with pytest.raises(ValueError, match="invalid vault name 'no--pe'"):
        LocalVault(vaults=["no--pe"])


def test_the_control_api_on_a_proxied_vault(credential: DefaultAzureCredential, unique_key_name: str) -> None:
    vault_url, other_url = (
        f"https://{fresh_name()}.vault.azure.net",
        f"https://{fresh_name()}.vault.azure.net",
    )
    client, other = KeyClient(vault_url, credential), KeyClient(other_url, credential)
    control = {"X-IDENTITY-HEADER": os.environ["IDENTITY_HEADER"]}
    try:
        client.create_ec_key(unique_key_name)
        other.create_ec_key(unique_key_name)
        answer = requests.put(
            f"{vault_url}/_localvault/permissions", json={"keys": ["list"]}, headers=control
        )
        assert answer.status_code == 200, answer.text
        with pytest.raises(HttpResponseError) as denied:
            client.get_key(unique_key_name)
        assert denied.value.status_code == 403
        assert other.get_key(unique_key_name).name == unique_key_name  # another name keeps its permissions
        clock = requests.post(f"{vault_url}/_localvault/clock", json={"advance": "P1D"}, headers=control)
        assert clock.status_code == 200, clock.text
        logged = requests.get(f"{vault_url}/_localvault/requests", headers=control).json()
        assert [entry["operation"] for entry in logged["requests"]][-1] == "GetKey"
        assert (
            requests.put(f"{vault_url}/_localvault/permissions", json={"keys": ["list"]}).status_code == 401
        )
    finally:
        client.close()
        other.close()


def test_a_proxied_vault_persists_in_the_data_directory(tmp_path: Path) -> None:
    with LocalVault(data_dir=str(tmp_path), data_key="a passphrase") as vault:
        client = vault.vault("persisted.vault.azure.net").key_client()
        key = client.create_rsa_key("kept", size=2048)
        client.close()
    assert (tmp_path / "vaults" / "persisted.vault.azure.net").is_dir()
    with LocalVault(data_dir=str(tmp_path), data_key="a passphrase") as vault:
        client = vault.vault("persisted.vault.azure.net").key_client()
        assert client.get_key("kept").id == key.id
        client.close()
        own = vault.key_client()
        assert list(own.list_properties_of_keys()) == []  # the vault at 127.0.0.1 is another vault
        own.close()


# --------------------------------------------------------------------------------------------------------
# management.azure.com: what `az login --identity` asks
# --------------------------------------------------------------------------------------------------------


def test_management_lists_no_subscriptions_for_a_localvault_token(localvault_session: LocalVault) -> None:
    credential = localvault_session.credential()
    token = credential.get_token("https://management.azure.com/.default").token
    vault_token = credential.get_token("https://vault.azure.net/.default").token
    credential.close()
    bearer = {"Authorization": f"Bearer {token}"}
    for path in ("/subscriptions", "/tenants"):
        answer = requests.get(
            f"https://management.azure.com{path}", params={"api-version": "2022-12-01"}, headers=bearer
        )
        assert (answer.status_code, answer.json()) == (200, {"value": []})
    other = requests.get("https://management.azure.com/subscriptions/x/resourceGroups", headers=bearer)
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "NotFound"
    assert "localvault emulates no Resource Manager operation" in other.json()["error"]["message"]
    for headers in ({}, {"Authorization": f"Bearer {vault_token}"}):
        refused = requests.get("https://management.azure.com/subscriptions", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "InvalidAuthenticationToken"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")


# --------------------------------------------------------------------------------------------------------
# The plugin's fixtures: a fresh vault at a real address per test, options by fixture override
# --------------------------------------------------------------------------------------------------------


def test_vault_url_is_a_fresh_vault_for_unchanged_code(vault_url: str, vault_at_url: LocalVault) -> None:
    assert vault_url.startswith("https://t") and vault_url.endswith(".vault.azure.net")
    assert os.environ["KEY_VAULT_URL"] == vault_url
    credential = DefaultAzureCredential()
    client = KeyClient(vault_url, credential)
    assert list(client.list_properties_of_keys()) == []
    key = client.create_rsa_key("mine", size=2048)
    crypto = CryptographyClient(key.id, credential)
    signature = crypto.sign(SignatureAlgorithm.rs256, b"\x02" * 32).signature
    assert crypto.verify(SignatureAlgorithm.rs256, b"\x02" * 32, signature).is_valid
    assert [entry["operation"] for entry in vault_at_url.requests()][-2:] == [
        "GetKey",
        "sign",
    ]  # verify runs locally
    for closing in (crypto, client, credential):
        closing.close()


class TestOptionsByFixtureOverride:
    @pytest.fixture
    def localvault_options(self, tmp_path: Path) -> Dict[str, Any]:
        return {
            "managed_hsm": True,
            "key_permissions": ["create", "get"],
            "data_dir": str(tmp_path),
            "data_key": "a passphrase",
        }

    def test_a_managed_hsm_with_permissions_and_a_data_directory(
        self, vault_url: str, vault_at_url: LocalVault, tmp_path: Path
    ) -> None:
        assert vault_url.endswith(".managedhsm.azure.net") and vault_at_url.managed_hsm
        credential = DefaultAzureCredential()
        client = KeyClient(vault_url, credential)
        key = client.create_oct_key("symmetric", hardware_protected=True)
        assert key.key_type == "oct-HSM"
        assert client.get_key("symmetric").id == key.id
        with pytest.raises(HttpResponseError) as denied:
            client.begin_delete_key("symmetric")
        assert denied.value.status_code == 403
        client.close()
        credential.close()
        assert [path.name for path in (tmp_path / "keys").iterdir()] == ["symmetric.json"]


def test_the_witnesses_are_the_code_a_user_writes() -> None:
    # The witnesses must stay code written for Azure: no localvault import, no verification switched off.
    unchanged = REPO / "tests" / "unchanged"
    for path in (unchanged / "keys_sync.py", unchanged / "keys_aio.py", JS / "keys.mjs"):
        text = path.read_text()
        for word in (
            "import localvault",
            "from localvault",
            "verify_challenge_resource",
            "connection_verify",
            "127.0.0.1",
            "rejectUnauthorized",
            "NODE_TLS_REJECT_UNAUTHORIZED",
            "proxies",
            "proxyOptions",
        ):
            assert word not in text, (path.name, word)
    assert json.loads((JS / "package.json").read_text())["dependencies"].keys() >= {
        "@azure/identity",
        "@azure/keyvault-keys",
    }


def test_the_quickstart_at_a_real_address_with_only_the_export_lines(localvault_session: LocalVault) -> None:
    # KEY_VAULT_NAME=NAME python kv_keys.py: DefaultAzureCredential and challenge verification as for
    # Azure; its recover and purge hints are the az commands that work in that shell.
    name = fresh_name("q")
    env = dict(environ_without_vaults(), **localvault_session.environ(), KEY_VAULT_NAME=name)
    del env["KEY_VAULT_URL"]
    result = subprocess.run(
        [sys.executable, "kv_keys.py", "--name", "real-address"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"  id:         https://{name}.vault.azure.net/keys/real-address/" in result.stdout
    assert f"az keyvault key recover --vault-name {name} --name real-address" in result.stdout
    assert f"az keyvault key purge --vault-name {name} --name real-address" in result.stdout
    client = localvault_session.vault(f"{name}.vault.azure.net").key_client()
    try:
        assert [key.name for key in client.list_deleted_keys()] == ["real-address"]
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------------
# Making vaults: bounded in number, never while other requests wait
# --------------------------------------------------------------------------------------------------------


def test_the_number_of_vault_names_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from localvault import proxy

    monkeypatch.setattr(proxy, "MAX_VAULTS", 2)
    with LocalVault() as vault:
        for name in ("first", "second"):
            status, _, sock = connect(vault.proxy_port, f"{name}.vault.azure.net:443")
            sock.close()
            assert status == 200
        status, body, sock = connect(vault.proxy_port, "third.vault.azure.net:443")
        sock.close()
        assert (status, body.decode()) == (
            502,
            "localvault serves at most 2 vault names at once, and serves that many; "
            "third.vault.azure.net is not one of them.\n",
        )
        vault.forget(vault.vault("first"))
        status, _, sock = connect(vault.proxy_port, "third.vault.azure.net:443")
        sock.close()
        assert status == 200


def test_making_a_vault_stalls_no_request_to_another(monkeypatch: pytest.MonkeyPatch) -> None:
    making, release = threading.Event(), threading.Event()
    start_proxied = LocalVault._start_proxied

    def slow_for_one(self: LocalVault, parent: LocalVault) -> LocalVault:
        if self._host == "slow.vault.azure.net":
            making.set()
            assert release.wait(60)
        return start_proxied(self, parent)

    monkeypatch.setattr(LocalVault, "_start_proxied", slow_for_one)
    with LocalVault() as vault:
        fast = vault.vault("fast").key_client()
        fast.create_ec_key("before")
        outcome: List[Any] = []
        thread = threading.Thread(
            target=lambda: outcome.append(connect(vault.proxy_port, "slow.vault.azure.net:443"))
        )
        thread.start()
        try:
            assert making.wait(30)
            # While the slow vault is being made: the existing vault answers, and a new one is made.
            assert fast.get_key("before").name == "before"
            other = vault.vault("other").key_client()
            assert other.create_ec_key("meanwhile").name == "meanwhile"
            other.close()
            assert thread.is_alive() and not outcome
        finally:
            release.set()
            thread.join(60)
            fast.close()
        status, _, sock = outcome[0]
        sock.close()
        assert status == 200


def test_a_vault_whose_data_directory_is_unusable_is_refused_in_one_line(tmp_path: Path) -> None:
    with LocalVault(data_dir=str(tmp_path), data_key="a passphrase") as vault:
        broken = tmp_path / "vaults" / "broken.vault.azure.net"
        broken.mkdir(parents=True)
        (broken / "localvault.json").write_text("{not json")
        status, body, sock = connect(vault.proxy_port, "broken.vault.azure.net:443")
        sock.close()
        assert status == 502
        assert body.count(b"\n") == 1 and b"localvault.json" in body
        status, _, sock = connect(vault.proxy_port, "healthy.vault.azure.net:443")
        sock.close()
        assert status == 200
