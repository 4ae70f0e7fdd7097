"""The control API under /_localvault/, from plain ``requests`` trusting the vault's CA, and ``reset()``."""

from __future__ import annotations

import errno
import http.client
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
from typing import Iterator

import pytest
import requests
from helpers import control

from localvault import LocalVault
from localvault.cli import build_parser, read_exports
from localvault.clock import MAX_CLOCK
from localvault.control import CONTROL_ROUTES, KEY_PERMISSIONS, Controls
from localvault.exceptions import Forbidden, ServiceUnavailable
from localvault.persist import DataDir
from localvault.urls import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EC_BODY = {"kty": "EC", "crv": "P-256"}
NO_FAULTS = {"rates": {}, "seed": None, "operations": None, "next": [], "delete_delay": 0.0}


ALL_CONTROL_CALLS = [(method, name) for name, methods in CONTROL_ROUTES.items() for method in methods]


@pytest.mark.parametrize("method, name", ALL_CONTROL_CALLS)
@pytest.mark.parametrize("secret", [None, "wrong", "", "sécret".encode().decode("latin-1")])
def test_control_api_is_refused_without_the_secret(localvault, raw, unique_key_name, method, name, secret):
    assert raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY).status_code == 200
    response = control(
        localvault, method, name, secret=secret, json={"keys": [], "advance": 3600, "rates": {}}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "Unauthorized"
    # nothing happened: the key, clock, permissions and log are as they were
    assert localvault.clock.offset == 0
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 200
    assert len(localvault.requests()) == 2


def test_unknown_control_routes_and_methods(localvault):
    assert control(localvault, "GET", "nothing").status_code == 404
    response = control(localvault, "PATCH", "clock")
    assert response.status_code == 405 and response.json()["error"]["code"] == "MethodNotAllowed"
    assert control(localvault, "POST", "clock", data=b"{not json").status_code == 400


def test_reset_through_the_api(localvault, raw, unique_key_name):
    assert raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY).status_code == 200
    localvault.set_key_permissions(["get"])
    localvault.fail_next(5, "503", ["GetKeys"])
    localvault.set_delete_delay(3)
    localvault.clock.advance(days=1)
    assert control(localvault, "POST", "reset").status_code == 204
    assert localvault.clock.offset == 0
    assert control(localvault, "GET", "faults").json() == NO_FAULTS
    assert control(localvault, "GET", "permissions").json() == {
        "keys": sorted(KEY_PERMISSIONS, key=str.lower)
    }
    assert control(localvault, "GET", "requests").json() == {"requests": []}
    assert raw.request("GET", "/keys").json()["value"] == []


def test_reset_returns_to_the_settings_the_vault_started_with():
    start = {"rates": {"503": 0.5}, "seed": 3, "operations": ["GetKey"], "next": [], "delete_delay": 2.0}
    with LocalVault(
        faults={"503": 0.5},
        fault_seed=3,
        fault_operations=["GetKey"],
        key_permissions=["get"],
        delete_delay=2,
    ) as vault:
        assert control(vault, "GET", "faults").json() == start
        assert control(vault, "DELETE", "faults").json() == NO_FAULTS
        assert control(vault, "PUT", "permissions", json={"keys": ["all"]}).status_code == 200
        vault.reset()
        assert control(vault, "GET", "faults").json() == start
        assert vault.key_permissions == ["get"]


def test_clock_through_the_api(localvault, key_client, unique_key_name):
    assert control(localvault, "GET", "clock").json()["offset"] == 0
    assert control(localvault, "POST", "clock", json={"advance": 3600}).json()["offset"] == 3600
    state = control(localvault, "POST", "clock", json={"advance": "P1D"}).json()
    assert state["offset"] == 3600 + 86400 and state["time"].endswith("Z")
    key = key_client.create_ec_key(unique_key_name)
    assert abs(key.properties.created_on.timestamp() - state["now"]) < 60
    for bad in (
        {"advance": -1},
        {"advance": "P-1D"},
        {"advance": "soon"},
        {"advance": True},
        {},
        {"advance": 1e30},
    ):
        response = control(localvault, "POST", "clock", json=bad)
        assert response.status_code == 400 and response.json()["error"]["code"] == "BadParameter"
    assert localvault.clock.offset == 3600 + 86400


def test_faults_through_the_api(localvault, raw, unique_key_name):
    assert raw.request("POST", f"/keys/{unique_key_name}/create", json=EC_BODY).status_code == 200
    body = {"rates": {"503": 1}, "seed": 1, "operations": ["getkey"], "next": [{"fault": "429", "count": 1}]}
    described = control(localvault, "PUT", "faults", json=body).json()
    assert described == {
        "rates": {"503": 1.0},
        "seed": 1,
        "operations": ["GetKey"],
        "next": [{"fault": "429", "count": 1, "operations": None}],
        "delete_delay": 0.0,
    }
    assert raw.request("GET", "/keys").status_code == 429  # the next-N fault first
    assert raw.request("GET", "/keys").status_code == 200
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 503
    # control requests are subject to neither faults nor permissions
    localvault.set_key_permissions([])
    assert control(localvault, "GET", "faults").status_code == 200
    for bad in (
        {"rates": {"503": 2}},
        {"rates": {"503": 0.1}, "operations": ["Nope"]},
        {"next": [{"count": 0}]},
        {"delete_delay": -1},
        {"rates": []},
    ):
        response = control(localvault, "PUT", "faults", json=bad)
        assert response.status_code == 400, bad
    assert control(localvault, "GET", "faults").json()["rates"] == {"503": 1.0}  # unchanged by a 400
    assert control(localvault, "PUT", "faults", json={"delete_delay": 1.5}).json() == dict(
        NO_FAULTS, delete_delay=1.5
    )
    assert control(localvault, "DELETE", "faults").json() == NO_FAULTS


def test_permissions_through_the_api(localvault, raw):
    assert control(localvault, "PUT", "permissions", json={"keys": ["Get", "LIST"]}).json() == {
        "keys": ["get", "list"]
    }
    assert raw.request("GET", "/keys").status_code == 200
    assert raw.request("POST", "/keys/k/create", json=EC_BODY).status_code == 403
    for bad in ({"keys": ["get", "nope"]}, {"keys": "get"}, {}):
        assert control(localvault, "PUT", "permissions", json=bad).status_code == 400
    assert control(localvault, "GET", "permissions").json() == {"keys": ["get", "list"]}


def test_requests_log_through_the_api(localvault, key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    list(key_client.list_properties_of_keys(max_page_size=1))
    entries = control(localvault, "GET", "requests").json()["requests"]
    served = [(e["method"], e["path"], e["operation"], e["status"]) for e in entries if e["status"] != 401]
    assert served == [
        ("POST", f"/keys/{unique_key_name}/create", "CreateKey", 200),
        ("GET", "/keys", "GetKeys", 200),
    ]
    assert all(e["time"].endswith("Z") and e["fault"] is None for e in entries)
    assert not any("?" in e["path"] for e in entries)  # the query is never logged
    assert control(localvault, "DELETE", "requests").status_code == 204
    assert localvault.requests() == []


def test_an_answer_larger_than_the_write_buffer_is_in_the_log_before_it_reaches_the_client(monkeypatch):
    with LocalVault() as vault, vault.key_client() as client:
        tags = {f"{i:02d}" + "n" * 510: "v" * 256 for i in range(15)}
        for i in range(8):  # a page of them is about 90 KB, past the handler's 64 KB write buffer
            client.create_ec_key(f"large-{i}", tags=tags)
        token = vault.credential().get_token("https://vault.azure.net/.default").token
        context = ssl.create_default_context(cafile=vault.ca_file)
        plain = socket.create_connection(("127.0.0.1", vault.port), timeout=30)
        head = f"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        with plain, context.wrap_socket(plain, server_hostname="127.0.0.1") as tls:

            def answer() -> bytes:
                tls.sendall(head.encode())
                response = http.client.HTTPResponse(tls, method="GET")
                response.begin()
                assert response.status == 200
                return response.read()

            answer()  # and with it the TLS session tickets the server sent after the handshake
            answered_first = []
            record = vault.controls.log.record

            def noting(*args: object) -> None:  # loopback delivers as it sends: readable means answered
                answered_first.append(bool(select.select([tls.fileno()], [], [], 0)[0]))
                record(*args)

            monkeypatch.setattr(vault.controls.log, "record", noting)
            assert len(answer()) > 64 * 1024
        assert answered_first == [False]
        assert [e["operation"] for e in vault.requests()][-1] == "GetKeys"


def test_request_log_is_bounded(localvault):
    log = localvault.controls.log
    for number in range(10_005):
        log.record("GET", f"/keys/k{number}?api-version=7.5", 200, None)
    # the oldest five are dropped; the rest are kept, oldest first
    assert [e["path"] for e in localvault.requests()] == [f"/keys/k{n}" for n in range(5, 10_005)]


def test_wait_idle_does_not_wait_for_itself_but_for_other_requests(localvault):
    assert control(localvault, "POST", "wait-idle", json={"timeout": 5}).json() == {"idle": True}
    context = ssl.create_default_context(cafile=localvault.ca_file)
    plain = socket.create_connection(("127.0.0.1", localvault.port), timeout=10)
    with plain, context.wrap_socket(plain, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /keys?api-version=7.5 HTTP/1.1\r\n")  # a request still being read
        assert control(localvault, "POST", "wait-idle", json={"timeout": 0.2}).json() == {"idle": False}
    assert control(localvault, "POST", "wait-idle", json={"timeout": 10}).json() == {"idle": True}
    assert control(localvault, "POST", "wait-idle", json={"timeout": 61}).status_code == 400


@pytest.fixture
def standalone() -> Iterator[dict]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localvault",
            "--port",
            "0",
            "--faults",
            "503=1",
            "--fault-seed",
            "7",
            "--fault-operations",
            "GetKeys",
            "--key-permissions",
            "get,list,create",
            "--delete-delay",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        yield read_exports(process.stdout)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def test_standalone_vault_is_controlled_from_plain_requests(standalone):
    url, ca = standalone["LOCALVAULT_URL"], standalone["LOCALVAULT_CA_FILE"]
    session = requests.Session()
    session.headers["X-IDENTITY-HEADER"] = standalone["IDENTITY_HEADER"]
    faults = session.get(f"{url}/_localvault/faults", timeout=30, verify=ca).json()
    assert faults == {
        "rates": {"503": 1.0},
        "seed": 7,
        "operations": ["GetKeys"],
        "next": [],
        "delete_delay": 0.5,
    }
    assert session.get(f"{url}/_localvault/permissions", timeout=30, verify=ca).json() == {
        "keys": ["create", "get", "list"]
    }
    token = requests.get(
        standalone["IDENTITY_ENDPOINT"],
        params={"api-version": "2019-08-01", "resource": "https://vault.azure.net"},
        headers={"X-IDENTITY-HEADER": standalone["IDENTITY_HEADER"]},
        timeout=30,
    ).json()["access_token"]
    vault = requests.Session()
    vault.headers["Authorization"] = f"Bearer {token}"
    assert vault.get(f"{url}/keys?api-version=7.5", timeout=30, verify=ca).status_code == 503
    assert vault.delete(f"{url}/keys/k?api-version=7.5", timeout=30, verify=ca).status_code == 403
    assert session.delete(f"{url}/_localvault/faults", timeout=30, verify=ca).status_code == 200
    assert vault.get(f"{url}/keys?api-version=7.5", timeout=30, verify=ca).status_code == 200
    assert session.post(f"{url}/_localvault/reset", timeout=30, verify=ca).status_code == 204
    assert vault.get(f"{url}/keys?api-version=7.5", timeout=30, verify=ca).status_code == 503
    log = session.get(f"{url}/_localvault/requests", timeout=30, verify=ca).json()["requests"]
    assert [(e["operation"], e["status"], e["fault"]) for e in log] == [("GetKeys", 503, "503")]
    session.close()
    vault.close()


def test_export_lines_name_the_controls_in_force():
    vault = LocalVault(
        faults={"429": 0.2}, fault_seed=7, key_permissions=["get"], purge_protection=True, sku="standard"
    )
    assert (
        vault.describe_controls()
        == "faults 429=0.2 (seed 7); key permissions get; purge protection; sku standard"
    )
    assert LocalVault().describe_controls() == ""


def test_readme_documents_each_control_option_in_the_words_of_help():
    parser = build_parser("python -m localvault")
    group = next(g for g in parser._action_groups if g.title == "controls")
    with open(os.path.join(ROOT, "localvault", "README.md"), encoding="utf-8") as readme:
        lines = readme.read().splitlines()
    text = " ".join(" ".join(lines).split())
    examples = [line for line in lines if line.startswith("python -m localvault ")]
    for action in group._group_actions:
        help_text = action.help % {"default": action.default} if "%(default)" in action.help else action.help
        option = action.option_strings[0]
        assert " ".join(help_text.split()) in text, option
        assert any(option in example.split() for example in examples), option


# -- failures inside the control API ------------------------------------------------------------------

FULL_DISK = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every later write to the data directory fails as on a full disk (removing files still works)."""

    def write(self: DataDir, relative: str, data: bytes) -> None:
        raise FULL_DISK

    monkeypatch.setattr(DataDir, "_write", write)


def test_an_unexpected_error_in_the_control_api_is_a_500_in_the_services_json(localvault, monkeypatch):
    def broken(self: Controls) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Controls, "describe_faults", broken)
    response = control(localvault, "GET", "faults")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "InternalServerError"
    assert "a bug" not in response.text
    assert control(localvault, "GET", "clock").status_code == 200  # and it keeps serving


def test_the_clock_cannot_pass_the_year_9000_and_get_clock_keeps_answering(localvault):
    with pytest.raises(ValueError, match="year 9000"):
        localvault.clock.advance(days=365 * 8000)
    assert localvault.clock.offset == 0
    localvault.clock.advance(seconds=MAX_CLOCK - localvault.clock.now() - 60)
    state = control(localvault, "GET", "clock").json()
    assert state["time"].startswith("8999-12-31T") or state["time"].startswith("9000-")
    localvault.reset()


def test_a_clock_advance_that_cannot_be_written_changes_nothing(tmp_path, monkeypatch):
    with LocalVault(data_dir=str(tmp_path / "vault"), data_key="passphrase") as vault:
        vault.clock.advance(hours=1)
        _full_disk(monkeypatch)
        response = control(vault, "POST", "clock", json={"advance": "P1D"})
        assert response.status_code == 500, response.text
        assert response.json()["error"]["message"].startswith("The clock was not moved")
        assert os.strerror(errno.ENOSPC) in response.json()["error"]["message"]
        assert control(vault, "GET", "clock").json()["offset"] == 3600
        with pytest.raises(OSError):
            vault.clock.advance(days=1)
        assert vault.clock.offset == 3600
        monkeypatch.undo()
    with LocalVault(data_dir=str(tmp_path / "vault"), data_key="passphrase") as vault:
        assert vault.clock.offset == 3600


def test_reset_on_a_full_disk_changes_nothing_and_says_so(tmp_path, monkeypatch, unique_key_name):
    data_dir = str(tmp_path / "vault")
    with LocalVault(data_dir=data_dir, data_key="passphrase") as vault:
        vault.key_client().create_ec_key(unique_key_name)
        vault.clock.advance(days=1)
        vault.set_key_permissions(["get"])
        _full_disk(monkeypatch)
        response = control(vault, "POST", "reset")
        assert response.status_code == 500, response.text
        assert response.json()["error"]["message"].startswith("Nothing was reset")
        assert vault.key_client().get_key(unique_key_name).name == unique_key_name
        assert vault.clock.offset == 86400
        assert vault.key_permissions == ["get"]
        monkeypatch.undo()
        assert control(vault, "POST", "reset").status_code == 204
        assert os.listdir(os.path.join(data_dir, "keys")) == []
    with LocalVault(data_dir=data_dir, data_key="passphrase") as vault:
        assert vault.clock.offset == 0 and not list(vault.key_client().list_properties_of_keys())


def test_faults_are_injected_before_permissions_are_checked(unique_key_name):
    with LocalVault(key_permissions=[]) as vault:
        route = resolve("GET", f"/keys/{unique_key_name}")[0]
        vault.fail_next(1, "503")
        with pytest.raises(ServiceUnavailable):
            vault.controls.inject_fault(route)
        vault.controls.inject_fault(route)  # the fault is spent; no permission is checked here
        with pytest.raises(Forbidden):
            vault.controls.authorize(route)
        vault.set_key_permissions(["get"])
        vault.controls.authorize(route)
