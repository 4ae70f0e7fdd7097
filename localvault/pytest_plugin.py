"""pytest plugin: one localvault per test session, and a vault of its own at a real address per test.

Installed, it is active in every pytest run (``-p no:localvault.pytest_plugin`` turns it off); from a
clone, enable it with ``-p localvault.pytest_plugin``.

At configure time, before any test module can import aiohttp, it starts the session's vault and applies
its ``environ()`` to ``os.environ``: ``HTTPS_PROXY`` (both cases) to its isolated proxy, ``NO_PROXY`` for
loopback, ``REQUESTS_CA_BUNDLE`` and ``SSL_CERT_FILE`` (certifi's CAs plus localvault's),
``NODE_EXTRA_CA_CERTS``, and the identity variables, so that ``DefaultAzureCredential()`` gets its tokens
here. They are restored when the run ends. The proxy is isolated: a test can never reach the internet
through it (any host but a vault's gets 403). ``localvault_environ = false`` in the ini file leaves
``os.environ`` alone.

Fixtures:
- ``vault_url``: ``https://NAME.vault.azure.net`` (``.managedhsm.azure.net`` with ``managed_hsm``), a
  fresh name and so a fresh, empty vault for each test; ``KEY_VAULT_URL`` is set to it for the test.
  The code under test needs nothing else: ``KeyClient(vault_url, DefaultAzureCredential())``.
- ``localvault_options``: the options of that vault, ``{}`` by default; override it in a conftest or a
  test module to get, for instance, ``{"managed_hsm": True}``, ``{"key_permissions": ["get"]}``,
  ``{"faults": {"503": 0.5}, "fault_seed": 1}``, ``{"purge_protection": True}`` or
  ``{"data_dir": str(tmp_path)}`` (any keyword of :class:`~localvault.LocalVault`).
- ``vault_at_url``: the :class:`~localvault.LocalVault` serving ``vault_url``, for its controls (clock,
  faults, permissions, requests()).
- ``localvault``: the session's vault at ``https://127.0.0.1:PORT``, reset for this test, with
  ``key_client`` and ``crypto_client`` (a factory) built for it, and ``unique_key_name``.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from .vault import LocalVault

_STASH = pytest.StashKey["_Session"]()


class _Session:
    def __init__(self, apply_environ: bool) -> None:
        self.vault: Optional[LocalVault] = None
        self.apply_environ = apply_environ
        self.saved: Dict[str, Optional[str]] = {}

    def start(self) -> LocalVault:
        if self.vault is None:
            self.vault = LocalVault().start()
            if self.apply_environ:
                self._apply(self.vault.environ())
        return self.vault

    def _apply(self, variables: Dict[str, str]) -> None:
        self.saved = {name: os.environ.get(name) for name in (*variables, "AZURE_TOKEN_CREDENTIALS")}
        os.environ.update(variables)
        # A developer's AZURE_TOKEN_CREDENTIALS=dev would skip managed identity, and so this vault.
        os.environ.pop("AZURE_TOKEN_CREDENTIALS", None)

    def stop(self) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved = {}
        if self.vault is not None:
            self.vault.stop()
            self.vault = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "localvault_environ",
        "apply the session localvault's environment (proxy, trust, identity) to os.environ at configure time",
        type="bool",
        default=True,
    )


def pytest_configure(config: pytest.Config) -> None:
    session = _Session(config.getini("localvault_environ"))
    config.stash[_STASH] = session
    if session.apply_environ:
        session.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_STASH, None)
    if session is not None:
        session.stop()


@pytest.fixture(scope="session")
def localvault_session(pytestconfig: pytest.Config) -> LocalVault:
    return pytestconfig.stash[_STASH].start()


@pytest.fixture
def localvault(localvault_session: LocalVault) -> LocalVault:
    localvault_session.reset()
    return localvault_session


@pytest.fixture
def localvault_options() -> Dict[str, Any]:
    """The options of the vault at ``vault_url``: override this fixture to change them."""
    return {}


@pytest.fixture
def vault_at_url(
    localvault_session: LocalVault, localvault_options: Dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalVault]:
    options = dict(localvault_options)
    suffix = "managedhsm.azure.net" if options.pop("managed_hsm", False) else "vault.azure.net"
    vault = localvault_session.vault(f"t{uuid.uuid4().hex[:21]}.{suffix}", **options)
    monkeypatch.setenv("KEY_VAULT_URL", vault.url)
    try:
        yield vault
    finally:
        localvault_session.forget(vault)


@pytest.fixture
def vault_url(vault_at_url: LocalVault) -> str:
    return vault_at_url.url


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
