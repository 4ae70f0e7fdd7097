"""Shared helpers for talking to localvault on the wire, below the SDK."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Iterator, List

import pytest
import requests

API_VERSION = "2025-07-01"


def _is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any test that resolves or connects to anything beyond loopback; the attempt itself is refused."""
    attempts: List[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback(host):
            attempts.append(f"DNS lookup of {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: {host} is not loopback")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            attempts.append(f"connection to {address!r}")
            raise ConnectionRefusedError(f"test guard: {address[0]} is not loopback")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert not attempts, f"the test tried to leave loopback: {attempts}"


class RawVault:
    """``requests`` against localvault with a real token and its CA trusted; no SDK in between."""

    def __init__(self, vault: Any) -> None:
        self.vault = vault
        self.session = requests.Session()
        self.session.verify = vault.ca_file
        token = vault.credential().get_token("https://vault.azure.net/.default").token
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


@pytest.fixture
def raw(localvault: Any) -> Iterator[RawVault]:
    client = RawVault(localvault)
    yield client
    client.close()


def error_of(response: requests.Response) -> dict:
    """The service's error object, after checking the envelope."""
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    return body["error"]
