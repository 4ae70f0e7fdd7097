"""``LocalVault``: the vault server, its identity endpoint, its certificates and its store, as one object."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, List, Optional

from . import proxy, tls
from .clock import Clock
from .control import KEY_PERMISSIONS, Controls
from .faults import HOLD_TIMEOUT, FaultPlan, Hold
from .models import KeyStore
from .persist import DATA_KEY_VARIABLE, DataDir, DataDirError, PersistedClock
from .proxy import ProxyServer
from .server import MAX_CONNECTIONS, IdentityServer, VaultServer
from .tokens import MANAGED_HSM_RESOURCE, VAULT_RESOURCE, TokenIssuer

LOOPBACK = "127.0.0.1"

POLL_INTERVAL = 0.02  # how quickly stop() is noticed


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalVault:
    """An Azure Key Vault (keys) on this machine, for the real SDK and DefaultAzureCredential.

    ``with LocalVault() as vault:`` starts it on 127.0.0.1 with ephemeral ports and returns once
    both endpoints are listening; leaving the block stops it and joins every thread.

    ``managed_hsm=True`` makes it a Managed HSM (tokens for ``https://managedhsm.azure.net``, oct-HSM
    keys, ``/rng``); by default it is a Premium key vault.

    Backups are sealed with a key shared by the vaults of this process, so a backup restores into any
    of them; pass ``backup_secret`` (32 bytes) to give a vault a key of its own.

    Each endpoint serves at most ``max_connections`` connections at once: beyond that it closes one
    that waits idle for its next request, or else the new one.

    Controls (each also settable at run time, and restored by ``reset()``; see the README's Controls):
    ``faults`` (``{"429": 0.2, "503": 0.1}``: rates of injected failures, ``drop`` closes the
    connection), ``fault_seed``, ``fault_operations`` (keys.json operationIds the rates apply to),
    ``key_permissions`` (access-policy key permissions; None: all), ``delete_delay`` (seconds a
    deletion or recovery takes on the vault's clock). Fixed for the vault's life: ``purge_protection``
    and ``sku`` (``"premium"`` or ``"standard"``, which refuses RSA-HSM and EC-HSM keys).

    ``data_dir`` keeps everything in that directory across restarts (see ``localvault.persist``):
    keys, the clock, the CA, the identity secret and the token-signing and backup-sealing keys.
    Its secrets are encrypted with a key derived from ``data_key`` (by default the environment
    variable LOCALVAULT_DATA_KEY) when the directory is created with one. A directory that cannot be
    used raises ``DataDirError`` with the reason. The directory is locked from ``start()`` to ``stop()``
    only; ``start()`` reads it anew.
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int = 0,
        identity_port: int = 0,
        retention_days: int = 90,
        backup_secret: Optional[bytes] = None,
        managed_hsm: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        data_dir: Optional[str] = None,
        data_key: Optional[str] = None,
        *,
        faults: Optional[Dict[str, float]] = None,
        fault_seed: Optional[int] = None,
        fault_operations: Optional[Iterable[str]] = None,
        key_permissions: Optional[Iterable[str]] = None,
        delete_delay: float = 0.0,
        purge_protection: bool = False,
        sku: str = "premium",
        proxy_port: int = 0,
        isolated: bool = True,
        vaults: Optional[Iterable[str]] = None,
        _parent: Optional[LocalVault] = None,
        _host: str = "",
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host = host.strip("[]")
        self.max_connections = max_connections
        self._port, self._identity_port = port, identity_port
        self.data_dir = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
        self._data_key = os.environ.get(DATA_KEY_VARIABLE) if data_key is None else data_key
        self._parent, self._host = _parent, _host
        if _parent is not None:  # a vault the proxy serves: the parent's tokens, identity and CA
            backup_secret = _parent._backup_secret
        self._data = None if self.data_dir is None else DataDir(self.data_dir, self._data_key, backup_secret)
        self._backup_secret = backup_secret if self._data is None else self._data.backup_key
        self.clock = Clock() if self._data is None else self._data.clock()
        self.managed_hsm = managed_hsm
        self.store = KeyStore(
            retention_days=retention_days,
            backup_secret=backup_secret if self._data is None else self._data.backup_key,
            clock=self.clock,
            managed_hsm=managed_hsm,
            delete_delay=delete_delay,
            purge_protection=purge_protection,
            sku=sku,
        )
        if _parent is not None:
            self.issuer, self._identity_secret = _parent.issuer, _parent._identity_secret
        elif self._data is None:
            self.issuer, self._identity_secret = TokenIssuer(), secrets.token_urlsafe(24)
        else:
            self.issuer, self._identity_secret = self._data.token_issuer(), self._data.identity_secret
        if self._data is not None:
            self._data_secrets = self._data.secrets()
            self._data.attach(self.store)
            self._close_data()  # checked; a vault never started holds no lock: start() reads DIR again
        self.faults = FaultPlan(dict(faults or {}), fault_seed, fault_operations)  # type: ignore[arg-type]
        self.controls = Controls(
            self.store,
            self.issuer.principal_id,
            self._identity_secret,
            self.faults,
            key_permissions,
            self.wait_idle,
        )
        self._dir: Optional[str] = None
        self._vault_server: Optional[VaultServer] = None
        self._identity_server: Optional[IdentityServer] = None
        self._proxy_server: Optional[ProxyServer] = None
        self._threads: List[threading.Thread] = []
        self._proxy_port, self.isolated = proxy_port, isolated
        self.allowed_vaults = None if vaults is None else proxy.check_vault_names(vaults)
        self._options = dict(
            retention_days=retention_days,
            max_connections=max_connections,
            faults=faults,
            fault_seed=fault_seed,
            fault_operations=fault_operations,
            key_permissions=key_permissions,
            delete_delay=delete_delay,
            purge_protection=purge_protection,
            sku=sku,
        )
        self._children: Dict[str, LocalVault] = {}
        self._making: Dict[str, threading.Event] = {}  # hosts whose vault a request is making now
        self._children_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalVault:
        """Generate certificates, bind the ports and start serving. Raises OSError if a port is taken."""
        if self._vault_server is not None:
            return self
        if self.data_dir is not None and self._data is None:
            self._reopen_data()
        if self._parent is not None:
            return self._start_proxied(self._parent)
        self._dir = tempfile.mkdtemp(prefix="localvault-")
        try:
            names = proxy.CERTIFICATE_NAMES
            if self._data is None:
                files = tls.generate(self._dir, _extra_ips(self.host), dns_names=names)
            else:
                authority, ca_file = self._data.authority, self._data.ca_file
                files = tls.generate(self._dir, _extra_ips(self.host), authority, ca_file, dns_names=names)
            self.ca_file = files.ca_file
            self.trust_bundle = tls.write_bundle(os.path.join(self._dir, "trust.pem"), self.ca_file)
            self.azure_config_dir = os.path.join(self._dir, "azure")
            os.mkdir(self.azure_config_dir, 0o700)
            self._context = tls.server_context(files)
            self._identity_server = IdentityServer(
                (LOOPBACK, self._identity_port), self.issuer, self._identity_secret, self.max_connections
            )
            self._vault_server = VaultServer(
                (self.host, self._port), self._context, self.store, self.issuer, self.max_connections
            )
            self._vault_server.base_url = self.url  # ids and links name the vault, whatever Host says
            self._vault_server.controls = self.controls
            self._vault_server.hidden = (self._identity_secret,)
            self._proxy_server = ProxyServer((LOOPBACK, self._proxy_port), self, self.max_connections)
            self._proxy_server.hidden = (self._identity_secret,)
        except BaseException:
            self._close_servers()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._close_data()
            raise
        for server in (self._identity_server, self._vault_server, self._proxy_server):
            thread = threading.Thread(
                target=server.serve_forever, args=(POLL_INTERVAL,), name=f"localvault-{type(server).__name__}"
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _start_proxied(self, parent: LocalVault) -> LocalVault:
        self.ca_file, self.trust_bundle = parent.ca_file, parent.trust_bundle
        server = VaultServer(
            (LOOPBACK, 0), parent._context, self.store, self.issuer, self.max_connections, bind=False
        )
        server.base_url, server.controls = self.url, self.controls
        server.hidden = (self._identity_secret,)
        self._vault_server = server
        return self

    def stop(self) -> None:
        """Stop serving, close every connection, join every thread and remove the certificate files."""
        self.controls.holds.release_all()
        with self._children_lock:
            children = list(self._children.values())
            self._children.clear()
        servers = [s for s in (self._vault_server, self._identity_server, self._proxy_server) if s is not None]
        # shutdown() waits out a poll interval; stop the servers at once. A proxied vault has no loop.
        stoppers = [threading.Thread(target=server.shutdown) for server in servers if self._parent is None]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in servers:
            server.close_connections()
        for child in children:
            child.stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._close_servers()
        self.store.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._close_data()

    # -- the vaults the proxy serves ------------------------------------------------------------

    def vault(self, host: str, **options: Any) -> LocalVault:
        """The vault the proxy serves at ``host`` (``contoso.vault.azure.net``, or a bare name for a key
        vault), started, made on first use with this vault's options overridden by ``options``.
        ValueError for a host that is no Key Vault or Managed HSM host, or a name ``vaults`` excludes."""
        found = proxy.vault_host(host if "." in host else f"{host}.vault.azure.net")
        if found is None:
            raise ValueError(f"{host!r} is not a Key Vault or Managed HSM host with a valid vault name")
        if self.allowed_vaults is not None and found.name not in self.allowed_vaults:
            raise ValueError(f"{found.name!r} is not among the vaults served ({', '.join(self.allowed_vaults)})")
        return self._proxied(found, options)

    def _proxied(self, found: proxy.VaultHost, options: Dict[str, Any]) -> LocalVault:
        if self._parent is not None or self._proxy_server is None:
            raise RuntimeError("LocalVault is not started")
        while True:
            with self._children_lock:
                child = self._children.get(found.host)
                if child is not None:
                    if options:
                        raise ValueError(f"{found.host} is served already; options apply only to a new vault")
                    return child
                making = self._making.get(found.host)
                if making is None:
                    if len(self._children) + len(self._making) >= proxy.MAX_VAULTS:
                        raise proxy.TooManyVaults(
                            f"localvault serves at most {proxy.MAX_VAULTS:,} vault names at once, and serves "
                            f"that many; {found.host} is not one of them."
                        )
                    making = self._making[found.host] = threading.Event()
                    break
            making.wait()  # another request is making this vault; then take it, or try again
        # Made outside the lock (a data directory's key derivation takes a tenth of a second), so that
        # requests to other vaults never wait for it.
        try:
            settings = dict(self._options, **options)
            if self.data_dir is not None:
                settings.setdefault("data_dir", os.path.join(self.data_dir, "vaults", found.host))
                settings.setdefault("data_key", self._data_key)
            child = LocalVault(managed_hsm=found.managed_hsm, _parent=self, _host=found.host, **settings)
            child.start()
        except BaseException:
            with self._children_lock:
                del self._making[found.host]
            making.set()
            raise
        with self._children_lock:
            del self._making[found.host]
            stopped = self._proxy_server is None
            if not stopped:
                self._children[found.host] = child
        making.set()
        if stopped:
            child.stop()
            raise RuntimeError("LocalVault is not started")
        return child

    def forget(self, vault: LocalVault) -> None:
        """Stop a vault the proxy serves and forget it: its name is a new, empty vault on next use (its
        data directory, if any, stays)."""
        with self._children_lock:
            if self._children.get(vault._host) is vault:
                del self._children[vault._host]
        vault.stop()

    def vaults(self) -> List[LocalVault]:
        """The vaults the proxy serves so far, by host."""
        with self._children_lock:
            return [self._children[host] for host in sorted(self._children)]

    def _close_data(self) -> None:
        """Release the data directory (it keeps everything); start() opens it again."""
        if self._data is not None:
            self._data.close()
            self._data = None

    def _reopen_data(self) -> None:
        assert self.data_dir is not None
        data = DataDir(self.data_dir, self._data_key)
        if data.secrets() != self._data_secrets:
            data.close()
            raise DataDirError(f"{self.data_dir} now holds another vault; make a new LocalVault for it.")
        assert isinstance(self.clock, PersistedClock)
        self.clock.bind(data)
        data.attach(self.store)
        self._data = data

    def _close_servers(self) -> None:
        for server in (self._vault_server, self._identity_server, self._proxy_server):
            if server is not None:
                server.server_close()
        self._vault_server = self._identity_server = self._proxy_server = None

    def __enter__(self) -> LocalVault:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every key, version and deleted key, put the clock back to real time, empty the request
        log, and put faults, delete delay and key permissions back to how the vault was created."""
        self.controls.reset()

    # -- controls -------------------------------------------------------------------------------

    def set_faults(
        self,
        rates: Optional[Dict[str, float]] = None,
        seed: Optional[int] = None,
        operations: Optional[Iterable[str]] = None,
    ) -> None:
        """Inject failures at these rates from now on, e.g. ``set_faults({"429": 0.2}, seed=7)``: a fault
        (``429``, ``500``, ``503`` or ``drop``) per rate, only for ``operations`` (keys.json operationIds)
        if given. ``{}`` stops them. The random sequence starts again from the seed. ValueError if invalid."""
        self.faults.configure(rates, seed, operations)

    def fail_next(
        self, count: int = 1, fault: str = "503", operations: Optional[Iterable[str]] = None
    ) -> None:
        """Fail the next ``count`` requests (of ``operations``, if given) with ``fault``."""
        self.faults.fail_next(count, fault, operations)

    def clear_faults(self) -> None:
        """No injected failures: no rates and no pending ``fail_next``."""
        self.faults.clear()

    def hold_next(self, operation: str, when: str = "before", timeout: float = HOLD_TIMEOUT) -> Hold:
        """Hold the next request of ``operation`` (a keys.json operationId, any case) ``before`` the vault
        acts on it or ``after`` (changed, its answer not sent), until the returned hold's ``release()``,
        the end of a ``with`` block on it, ``reset()``, or ``timeout`` seconds. ``hold.wait()`` waits
        until a request is held. Other requests go on meanwhile."""
        return self.controls.holds.hold_next(operation, when, timeout)

    @property
    def key_permissions(self) -> List[str]:
        """The key permissions tokens have, sorted."""
        return sorted(self.controls.key_permissions, key=str.lower)

    def set_key_permissions(self, permissions: Optional[Iterable[str]]) -> None:
        """Allow only these access-policy key permissions (any case; ``"all"``, or None, for every one);
        other operations get the service's 403. ValueError for an unknown name."""
        self.controls.set_key_permissions(permissions)

    def set_delete_delay(self, seconds: float) -> None:
        """Deletions and recoveries started from now take ``seconds`` of the vault's clock to complete."""
        self.store.set_delete_delay(seconds)

    def describe_controls(self) -> str:
        """The controls not at their defaults, in words, e.g. ``faults 429=0.2 (seed 7); sku standard``."""
        faults = self.faults.describe()
        parts = []
        if faults["rates"]:
            rates = ",".join(f"{kind}={rate:g}" for kind, rate in faults["rates"].items())
            seed = "" if faults["seed"] is None else f" (seed {faults['seed']})"
            only = "" if faults["operations"] is None else f" for {','.join(faults['operations'])}"
            parts.append(f"faults {rates}{seed}{only}")
        if self.store.delete_delay:
            parts.append(f"delete delay {self.store.delete_delay:g}s")
        if len(self.key_permissions) < len(KEY_PERMISSIONS):
            parts.append(f"key permissions {','.join(self.key_permissions) or 'none'}")
        if self.store.purge_protection:
            parts.append("purge protection")
        if self.store.sku != "premium" and not self.managed_hsm:
            parts.append(f"sku {self.store.sku}")
        return "; ".join(parts)

    def requests(self) -> List[Dict[str, Any]]:
        """The Key Vault requests served (the last 10,000), oldest first: ``method``, ``path`` (no query),
        ``operation`` (keys.json operationId or None), ``status`` (None for a dropped connection),
        ``fault`` (the injected fault or None) and ``time`` (ISO 8601, UTC)."""
        return self.controls.log.entries()

    def clear_requests(self) -> None:
        self.controls.log.clear()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is in flight on any endpoint: none being read, handled or answered,
        none waiting to be accepted, no unread bytes on an open connection. A request whose client has
        gone is still finished first, as the service does. False if ``timeout`` seconds pass first.
        A proxied vault waits for its own requests only."""
        deadline = time.monotonic() + timeout
        servers = [s for s in (self._vault_server, self._identity_server, self._proxy_server) if s is not None]
        if self._parent is None:
            servers += [child._vault_server for child in self.vaults() if child._vault_server is not None]
        while True:
            if not all(server.wait_idle(deadline) for server in servers):
                return False
            if all(server.is_idle() for server in servers):
                return True

    # -- what clients need ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The vault's own HTTPS port (a proxied vault answers on its parent's proxy port only)."""
        owner = self if self._parent is None else self._parent
        assert owner._vault_server is not None, "LocalVault is not started"
        return owner._vault_server.server_address[1]

    @property
    def proxy_port(self) -> int:
        owner = self if self._parent is None else self._parent
        assert owner._proxy_server is not None, "LocalVault is not started"
        return owner._proxy_server.server_address[1]

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def url(self) -> str:
        """``https://127.0.0.1:PORT``; for a vault the proxy serves, the host it serves, such as
        ``https://contoso.vault.azure.net``."""
        if self._parent is not None:
            return f"https://{self._host}"
        host = LOOPBACK if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.port}"

    @property
    def resource(self) -> str:
        """The resource the vault's tokens are for: a key vault's or a Managed HSM's."""
        return MANAGED_HSM_RESOURCE if self.managed_hsm else VAULT_RESOURCE

    @property
    def identity_endpoint(self) -> str:
        owner = self if self._parent is None else self._parent
        assert owner._identity_server is not None, "LocalVault is not started"
        return f"http://{LOOPBACK}:{owner._identity_server.server_address[1]}/msi/token"

    def environ(self) -> Dict[str, str]:
        """Variables that bring every stock SDK here unchanged: HTTPS through the proxy (both cases,
        as Python reads one and JavaScript the other), loopback past it, trust in localvault's CA for
        requests, aiohttp and Node, and ``DefaultAzureCredential()``'s tokens from this vault. A
        ``KEY_VAULT_URL`` is the vault's own URL: ``https://127.0.0.1:PORT`` (reached past the proxy, so a
        client needs ``verify_challenge_resource=False`` and the CA), or a proxied vault's real address.
        The standalone command's export lines leave it out, so that ``KEY_VAULT_NAME`` can choose."""
        owner = self if self._parent is None else self._parent
        variables = {
            "HTTPS_PROXY": owner.proxy_url,
            "https_proxy": owner.proxy_url,
            "NO_PROXY": LOOPBACK,
            "no_proxy": LOOPBACK,
            "REQUESTS_CA_BUNDLE": owner.trust_bundle,
            "SSL_CERT_FILE": owner.trust_bundle,
            "NODE_EXTRA_CA_CERTS": owner.ca_file,
            "IDENTITY_ENDPOINT": owner.identity_endpoint,
            "IDENTITY_HEADER": owner._identity_secret,
            # The Azure CLI's login for this vault, apart from yours: `az login --identity` here
            # replaces nothing in ~/.azure, and no real login is found by DefaultAzureCredential.
            "AZURE_CONFIG_DIR": owner.azure_config_dir,
            "LOCALVAULT_URL": owner.url,
            "LOCALVAULT_CA_FILE": owner.ca_file,
            "KEY_VAULT_URL": self.url,
        }
        return variables

    def credential(self) -> LocalVaultCredential:
        """A token credential served by this vault's identity endpoint, independent of os.environ."""
        return LocalVaultCredential(self.identity_endpoint, self._identity_secret)

    def key_client(self, credential: Any = None, **kwargs: Any) -> Any:
        """A ``KeyClient`` for this vault: TLS verified against ``ca_file``, tokens from this vault."""
        from azure.keyvault.keys import KeyClient

        return KeyClient(self.url, credential or self.credential(), **self._sdk_options(kwargs))

    def crypto_client(self, key: Any, credential: Any = None, **kwargs: Any) -> Any:
        """A ``CryptographyClient`` for a key of this vault: a ``KeyVaultKey``, a key id, or a key name
        (the latest version). TLS verified against ``ca_file``, tokens from this vault."""
        from azure.keyvault.keys.crypto import CryptographyClient

        if isinstance(key, str) and "/" not in key:
            key = f"{self.url}/keys/{key}"
        return CryptographyClient(key, credential or self.credential(), **self._sdk_options(kwargs))

    def _sdk_options(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        kwargs.setdefault("connection_verify", self.ca_file)
        if self._parent is None:  # loopback: the challenge names vault.azure.net, not 127.0.0.1
            kwargs.setdefault("verify_challenge_resource", False)
        else:  # the real address, reached through the proxy, with the challenge checked
            kwargs.setdefault("proxies", {"https": self.proxy_url})
        return kwargs


def _extra_ips(host: str) -> List[str]:
    """The bind address, for the leaf certificate, if it is an IP address that it does not name already."""
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        if not address.is_loopback and not address.is_unspecified:
            return [str(address)]
    return []


class LocalVaultCredential:
    """Gets tokens from a localvault identity endpoint with the App Service protocol azure-identity uses.

    ``DefaultAzureCredential`` does the same once ``environ()`` is applied; this one needs no
    environment, so several vaults can be used side by side in one process.
    """

    def __init__(self, endpoint: str, secret: str) -> None:
        self._endpoint, self._secret = endpoint, secret

    def get_token(self, *scopes: str, **_: Any) -> Any:
        import requests
        from azure.core.credentials import AccessToken
        from azure.core.exceptions import ClientAuthenticationError

        resource = scopes[0][: -len("/.default")] if scopes[0].endswith("/.default") else scopes[0]
        response = requests.get(
            self._endpoint,
            params={"api-version": "2019-08-01", "resource": resource or VAULT_RESOURCE},
            headers={"X-IDENTITY-HEADER": self._secret},
            timeout=10,
        )
        if response.status_code != 200:
            raise ClientAuthenticationError(f"localvault identity endpoint answered {response.status_code}")
        payload = response.json()
        return AccessToken(payload["access_token"], int(payload["expires_on"]))

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalVaultCredential:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass
