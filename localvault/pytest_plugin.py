"""pytest plugin: one localvault per test session, emptied before each test.

Enable it with ``-p localvault.pytest_plugin`` (or ``pytest_plugins = ["localvault.pytest_plugin"]``).

Fixtures:
- ``localvault``: the running :class:`~localvault.LocalVault`, reset for this test. While the session's
  vault runs, its ``environ()`` is applied to ``os.environ``, so ``DefaultAzureCredential()`` and code
  that reads ``KEY_VAULT_URL`` find it.
- ``key_client``: a ``KeyClient`` for that vault using ``DefaultAzureCredential``, which gets its tokens
  from the vault's managed-identity endpoint (environment and workload identity are excluded, so a
  developer's Azure variables cannot send a test to Microsoft Entra ID).
- ``crypto_client``: a factory, ``crypto_client(key_or_id)``, of ``CryptographyClient``s for keys of that
  vault (a ``KeyVaultKey``, a key id or a key name), with the same credential as ``key_client``;
  closed after the test.
- ``unique_key_name``: a key name no other test uses.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any, Callable, Iterator, List

import pytest

from .vault import LocalVault


@pytest.fixture(scope="session")
def localvault_session() -> Iterator[LocalVault]:
    with LocalVault() as vault:
        variables = vault.environ()
        saved = {name: os.environ.get(name) for name in (*variables, "AZURE_TOKEN_CREDENTIALS")}
        os.environ.update(variables)
        # A developer's AZURE_TOKEN_CREDENTIALS=dev would skip managed identity, and so this vault.
        os.environ.pop("AZURE_TOKEN_CREDENTIALS", None)
        try:
            yield vault
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def localvault(localvault_session: LocalVault) -> LocalVault:
    localvault_session.reset()
    return localvault_session


def _managed_identity_credential() -> Any:
    from azure.identity import DefaultAzureCredential

    # Environment and workload identity come before managed identity in the chain; a developer's
    # AZURE_CLIENT_SECRET must not send the test to Microsoft Entra ID.
    return DefaultAzureCredential(
        exclude_environment_credential=True, exclude_workload_identity_credential=True
    )


@pytest.fixture
def key_client(localvault: LocalVault) -> Iterator[object]:
    credential = _managed_identity_credential()
    client = localvault.key_client(credential=credential)
    try:
        yield client
    finally:
        client.close()
        credential.close()


@pytest.fixture
def crypto_client(localvault: LocalVault) -> Iterator[Callable[[Any], Any]]:
    credential = _managed_identity_credential()
    clients: List[Any] = []

    def make(key: Any) -> Any:
        clients.append(localvault.crypto_client(key, credential=credential))
        return clients[-1]

    try:
        yield make
    finally:
        for client in clients:
            client.close()
        credential.close()


@pytest.fixture
def unique_key_name(request: pytest.FixtureRequest) -> str:
    stem = re.sub(r"[^0-9a-zA-Z-]+", "-", request.node.name).strip("-")[:80]
    return f"{stem}-{uuid.uuid4().hex[:12]}"
