"""Starting, stopping, resetting and sharing localvault: threads, sockets, files and concurrency."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import threading

import pytest
from azure.core.exceptions import ResourceNotFoundError
from helpers import pytest_with_localvault

from localvault import LocalVault


def test_start_returns_listening_and_stop_leaves_nothing_behind():
    before = set(threading.enumerate())
    vault = LocalVault().start()
    directory, port = os.path.dirname(vault.ca_file), vault.port
    # listening as soon as start() returns
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    client = vault.key_client()
    client.create_ec_key("lifecycle")
    client.close()
    vault.stop()
    assert set(threading.enumerate()) <= before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    assert not os.path.exists(directory)


def test_stop_closes_idle_keep_alive_connections():
    before = set(threading.enumerate())
    vault = LocalVault().start()
    client = vault.key_client()
    client.create_ec_key("keepalive")  # leaves a pooled keep-alive connection open
    vault.stop()  # must not wait for the client to hang up
    assert set(threading.enumerate()) <= before
    client.close()


def test_a_stopped_vault_can_start_again_on_its_ports_at_once():
    vault = LocalVault().start()
    ports = {"port": vault.port, "identity_port": int(vault.identity_endpoint.split(":")[2].split("/")[0])}
    client = vault.key_client()
    client.create_ec_key("restart")  # a keep-alive connection, which stop() closes: its port waits in TIME_WAIT
    vault.stop()
    client.close()
    again = LocalVault(**ports).start()  # what `python -m localvault --port P` does after a Ctrl-C
    try:
        assert again.port == ports["port"]
        assert again.key_client().create_ec_key("restart").name == "restart"
    finally:
        again.stop()


@pytest.mark.timeout(60)
def test_stop_does_not_wait_for_connections_stuck_before_tls():
    before = set(threading.enumerate())
    vault = LocalVault().start()
    plain = socket.create_connection(("127.0.0.1", vault.port), timeout=10)  # never starts TLS
    identity_port = int(vault.identity_endpoint.split(":")[2].split("/")[0])
    idle = socket.create_connection(("127.0.0.1", identity_port), timeout=10)  # never sends a request
    vault.stop()  # would wait out the idle timeout if it could not close them
    assert set(threading.enumerate()) <= before
    plain.close()
    idle.close()


def test_key_files_are_private_and_ca_is_public():
    with LocalVault() as vault:
        directory = os.path.dirname(vault.ca_file)
        key_mode = stat.S_IMODE(os.stat(os.path.join(directory, "key.pem")).st_mode)
        assert key_mode & 0o077 == 0
        assert stat.S_IMODE(os.stat(vault.ca_file).st_mode) & 0o004
        with open(vault.ca_file) as handle:
            assert "PRIVATE KEY" not in handle.read()


def test_environ_and_url(localvault):
    env = localvault.environ()
    assert {"KEY_VAULT_URL", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "LOCALVAULT_CA_FILE"} <= set(env)
    assert env["KEY_VAULT_URL"] == localvault.url
    assert localvault.url.startswith("https://127.0.0.1:")
    assert env["IDENTITY_ENDPOINT"].startswith("http://127.0.0.1:")
    assert env["LOCALVAULT_CA_FILE"] == localvault.ca_file


def test_reset_empties_keys_and_deleted_keys(localvault, key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)
    key_client.create_ec_key(unique_key_name + "-gone")
    key_client.begin_delete_key(unique_key_name + "-gone").wait()
    localvault.reset()
    assert list(key_client.list_properties_of_keys()) == []
    assert list(key_client.list_deleted_keys()) == []
    with pytest.raises(ResourceNotFoundError):
        key_client.get_key(unique_key_name)


RESET_CHECK = """
import pytest

@pytest.fixture
def vault(FIXTURE):
    return FIXTURE

def test_one_changes_everything(vault):
    with vault.key_client() as client:
        client.create_ec_key("left-behind")
        client.create_ec_key("deleted-left-behind")
        client.begin_delete_key("deleted-left-behind").wait()
    vault.set_faults({"429": 0.01})
    vault.set_key_permissions(["get"])
    vault.set_delete_delay(5)
    vault.clock.advance(hours=1)

def test_two_finds_it_all_reset(vault):
    with vault.key_client() as client:
        assert [k.name for k in client.list_properties_of_keys()] == []
        assert [k.name for k in client.list_deleted_keys()] == []
    assert vault.describe_controls() == "" and vault.clock.offset == 0
    assert {r["operation"] for r in vault.requests()} == {"GetKeys", "GetDeletedKeys"}  # this test's only
"""


@pytest.mark.parametrize("fixture, outcome", [("localvault", "2 passed"), ("localvault_session", "1 failed, 1 passed")])
def test_the_fixture_resets_the_vault_between_tests(tmp_path, clean_env, fixture, outcome):
    # Two tests in order, in a pytest of their own: what the first changes, the second must not see. The
    # session's vault without the fixture's reset shows that the second test would see it.
    (tmp_path / "test_reset.py").write_text(RESET_CHECK.replace("FIXTURE", fixture))
    result = pytest_with_localvault(tmp_path, clean_env)
    assert result.stdout.strip().splitlines()[-1].startswith(outcome), result.stdout + result.stderr


def test_eight_threads_create_versions_of_one_key(localvault, unique_key_name):
    per_thread, threads_count = 5, 8
    created, errors = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(threads_count)

    def work() -> None:
        client = localvault.key_client()
        try:
            barrier.wait()
            for _ in range(per_thread):
                version = client.create_ec_key(unique_key_name).properties.version
                with lock:
                    created.append(version)
        except Exception as exc:  # reported below, with the thread's error
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=work) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    client = localvault.key_client()
    listed = [p.version for p in client.list_properties_of_key_versions(unique_key_name, max_page_size=7)]
    client.close()
    assert len(created) == len(set(created)) == per_thread * threads_count
    assert sorted(listed) == sorted(created)


def test_two_vaults_side_by_side_are_independent(key_client, unique_key_name):
    with LocalVault() as other:
        other_client = other.key_client()
        other_client.create_ec_key(unique_key_name)
        with pytest.raises(ResourceNotFoundError):
            key_client.get_key(unique_key_name)
        other_client.close()


def _tls_to(vault: LocalVault) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=vault.ca_file)
    return context.wrap_socket(
        socket.create_connection(("127.0.0.1", vault.port), timeout=10), server_hostname="127.0.0.1"
    )


def test_wait_idle_waits_for_a_request_whose_client_has_gone(localvault, key_client, unique_key_name):
    token = localvault.credential().get_token("https://vault.azure.net/.default").token
    body = json.dumps({"kty": "RSA", "key_size": 4096}).encode()
    head = (
        f"POST /keys/{unique_key_name}/create?api-version=7.5 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with _tls_to(localvault) as conn:
        conn.sendall(head + body[:5])
        assert localvault.wait_idle(timeout=0.2) is False  # half a request is in flight
        conn.sendall(body[5:])
    # the client hung up without reading the answer; the vault still finishes the create
    assert localvault.wait_idle() is True
    assert [p.name for p in key_client.list_properties_of_key_versions(unique_key_name)] == [unique_key_name]


def test_wait_idle_is_true_with_idle_keep_alive_connections(localvault, key_client, unique_key_name):
    key_client.create_ec_key(unique_key_name)  # leaves a pooled keep-alive connection open
    assert localvault.wait_idle(timeout=5) is True


def test_clock_moves_the_vaults_time_and_reset_returns_it(localvault, key_client, unique_key_name):
    before = key_client.create_ec_key(unique_key_name).properties.created_on
    assert localvault.clock.advance(days=30) == 30 * 86400
    moved = key_client.create_ec_key(unique_key_name).properties.created_on
    assert (moved - before).days in (29, 30)  # 30 days on, less what the first create took
    with pytest.raises(ValueError):
        localvault.clock.advance(seconds=-1)
    localvault.reset()
    assert localvault.clock.offset == 0
    back = key_client.create_ec_key(unique_key_name).properties.created_on
    assert (back - before).days == 0
