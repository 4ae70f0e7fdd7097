"""Shared helpers for talking to localvault on the wire, below the SDK."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import requests

API_VERSION = "2025-07-01"


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
