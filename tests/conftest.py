"""Fixtures shared by the tests: nothing leaves loopback, raw requests to localvault, a clean environment and a
standalone localvault for kv_keys.py, and a KeyClient double. What the tests share besides fixtures is in
helpers.py."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List
from unittest import mock

import pytest
from azure.keyvault.keys import KeyClient
from helpers import (
    VAULT,
    FakePoller,
    RawVault,
    Standalone,
    environ_without_vaults,
    fake_key,
    is_loopback,
    not_found,
    use_env,
)

import kv_keys


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any test that resolves or connects to anything beyond loopback; the attempt itself is refused."""
    attempts: List[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not is_loopback(host):
            attempts.append(f"DNS lookup of {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: {host} is not loopback")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            attempts.append(f"connection to {address!r}")
            raise ConnectionRefusedError(f"test guard: {address[0]} is not loopback")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert not attempts, f"the test tried to leave loopback: {attempts}"


@pytest.fixture
def raw(localvault: Any) -> Iterator[RawVault]:
    client = RawVault(localvault)
    yield client
    client.close()


@pytest.fixture
def client_at_url(vault_at_url: Any) -> Iterator[KeyClient]:
    """A KeyClient for the plugin's vault of this test (``vault_at_url``, shaped by ``localvault_options``)."""
    client = vault_at_url.key_client()
    yield client
    client.close()


@pytest.fixture
def raw_at_url(vault_at_url: Any) -> Iterator[RawVault]:
    """``requests`` for the plugin's vault of this test, with a token for its resource."""
    client = RawVault(vault_at_url)
    yield client
    client.close()


@pytest.fixture
def clean_env() -> Dict[str, str]:
    """A copy of os.environ without vault, identity, Azure, proxy or CA-bundle variables, with DefaultAzureCredential kept to
    developer tools (AZURE_TOKEN_CREDENTIALS=dev): for a subprocess, or for this process through use_env()."""
    return dict(environ_without_vaults(), AZURE_TOKEN_CREDENTIALS="dev")


@pytest.fixture
def standalone_localvault(clean_env: Dict[str, str]) -> Iterator[Dict[str, str]]:
    """`python -m localvault --port 0` in its own process; yields the variables it exports; stops it with SIGTERM."""
    vault = Standalone(env=clean_env)
    try:
        yield vault.exports
    finally:
        rest, _ = vault.stop()
    assert "# localvault stopped." in rest


@pytest.fixture
def azure_vault_env(clean_env: Dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean os.environ naming an Azure vault (KEY_VAULT_NAME); nothing is sent there: make_client is a fake."""
    use_env(monkeypatch, dict(clean_env, KEY_VAULT_NAME=VAULT))


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A KeyClient double, specced on KeyClient, for the happy path: the name is free, create works, get finds
    the same version. kv_keys.make_client returns it; that factory is its `factory` attribute."""
    fake = mock.create_autospec(KeyClient, instance=True)
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
