"""The proxy port: with ``HTTPS_PROXY`` set to it, any SDK reaches localvault at a vault's real address.

A client asks ``CONNECT contoso.vault.azure.net:443``. The proxy answers 200, and from then on that
connection is localvault's own TLS, with a certificate for the host from localvault's CA, served by the
vault of that name: the first label names the vault, the suffix says key vault or Managed HSM, and each
name is a vault of its own, made on first use. Nothing resolves the name: the proxy is told it.

``management.azure.com`` answers the two Resource Manager requests ``az login --identity`` makes.
Any other host is tunnelled to its real destination, unread, or, when the vault is isolated, refused
with 403 and a line that names the host and the fix.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import threading
import uuid
from typing import TYPE_CHECKING, Any, Dict, Iterable, NamedTuple, Optional, Tuple

from .exceptions import VaultError
from .http11 import LINGER_TIMEOUT, MAX_CONNECTIONS, Handler, Server, log, split_target
from .persist import DataDirError
from .server import VaultServer
from .tokens import TENANT_ID, TokenIssuer

if TYPE_CHECKING:
    from .vault import LocalVault

KEY_VAULT_SUFFIXES = ("vault.azure.net", "vault.azure.cn", "vault.usgovcloudapi.net")
MANAGED_HSM_SUFFIXES = ("managedhsm.azure.net", "managedhsm.azure.cn", "managedhsm.usgovcloudapi.net")
MANAGEMENT_HOSTS = ("management.azure.com",)
MANAGEMENT_AUDIENCES = (
    "https://management.azure.com",
    "https://management.azure.com/",
    "https://management.core.windows.net",
    "https://management.core.windows.net/",
)
CERTIFICATE_NAMES = tuple(f"*.{suffix}" for suffix in KEY_VAULT_SUFFIXES + MANAGED_HSM_SUFFIXES) + MANAGEMENT_HOSTS
# Azure's rule for vault and Managed HSM names: 3 to 24 letters, digits and hyphens, a letter first,
# no hyphen last, no two in a row.
_VAULT_NAME = re.compile(r"(?!.*--)[a-z][a-z0-9-]{1,22}[a-z0-9]")
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)*")
MAX_VAULTS = 1024  # names served at once: each is a vault in memory (and a directory with --data)
CONNECT_TIMEOUT = 10.0  # to reach a tunnelled host
TUNNEL_IDLE_TIMEOUT = 600.0  # a tunnel with no byte either way for this long is closed


class TooManyVaults(Exception):
    """The proxy serves MAX_VAULTS names already; a new one is refused."""


class VaultHost(NamedTuple):
    host: str  # lower case, e.g. contoso.vault.azure.net
    name: str
    managed_hsm: bool


def vault_host(host: str) -> Optional[VaultHost]:
    """The vault a host names, or None if it is no Key Vault or Managed HSM host with a valid name."""
    host = host.lower().rstrip(".")
    name, _, suffix = host.partition(".")
    if suffix not in KEY_VAULT_SUFFIXES + MANAGED_HSM_SUFFIXES or not _VAULT_NAME.fullmatch(name):
        return None
    return VaultHost(host, name, suffix in MANAGED_HSM_SUFFIXES)


def is_vault_suffix(host: str) -> bool:
    return host.lower().rstrip(".").partition(".")[2] in KEY_VAULT_SUFFIXES + MANAGED_HSM_SUFFIXES


def check_vault_names(names: Iterable[str]) -> Tuple[str, ...]:
    """The names, lower case, sorted; ValueError for one that is not a valid vault name."""
    checked = set()
    for name in names:
        lower = name.strip().lower()
        if not _VAULT_NAME.fullmatch(lower):
            raise ValueError(
                f"invalid vault name {name!r}: 3 to 24 letters, digits and hyphens, starting with a letter, "
                "ending with a letter or digit, no two hyphens in a row"
            )
        checked.add(lower)
    return tuple(sorted(checked))


def _authority(target: str) -> Optional[Tuple[str, int]]:
    """``host:port`` of a CONNECT request, host lower case; None if it is not one."""
    host, sep, port = target.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
        return None
    host = host.lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not re.fullmatch(r"[0-9a-f:.]{2,45}", host):
            return None
    elif len(host) > 253 or not _HOST.fullmatch(host):
        return None
    return host, int(port)


class ProxyServer(Server):
    """The loopback proxy port of a LocalVault. A connection to a vault is handed, once its CONNECT is
    answered, to that vault's own server, which does the TLS handshake and serves it as its port would."""

    def __init__(self, address: Tuple[str, int], vault: LocalVault, max_connections: int = MAX_CONNECTIONS):
        self.vault = vault
        self.management = ManagementServer(vault._context, vault.issuer, max_connections)
        self._handoffs: Dict[Any, Tuple[Server, Any]] = {}
        self._handoffs_lock = threading.Lock()
        super().__init__(address, ProxyHandler, max_connections)

    def destination(self, host: str, port: int) -> Tuple[str, Any]:
        """What a CONNECT to host:port gets: ("serve", server), ("refuse", (status, line)) or ("tunnel", None)."""
        found = vault_host(host)
        allowed = self.vault.allowed_vaults
        if found is not None and port == 443 and (allowed is None or found.name in allowed):
            try:
                return "serve", self.vault._proxied(found, {})._vault_server
            except (TooManyVaults, DataDirError) as exc:  # a full proxy; a data directory it cannot use
                return "refuse", (502, str(exc).splitlines()[0][:500])
        if found is not None or is_vault_suffix(host):
            served = "" if allowed is None else f"; it serves only {', '.join(allowed)} (--vault)"
            return "refuse", (502, f"localvault serves no vault at {host}:{port}{served}.")
        if host in MANAGEMENT_HOSTS and port == 443:
            return "serve", self.management
        if self.vault.isolated:
            return "refuse", (
                403,
                f"localvault's proxy is isolated and does not reach {host}:{port}; "
                f"add {host} to NO_PROXY and no_proxy to reach it directly.",
            )
        return "tunnel", None

    def hand_off(self, sock: Any, server: Server, client_address: Any) -> None:
        """Serve ``sock`` by ``server`` once this proxy's handler has finished with it."""
        with self._handoffs_lock:
            self._handoffs[sock] = (server, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._handoffs_lock:
            handoff = self._handoffs.pop(request, None)
        if handoff is None:
            super().shutdown_request(request)
            return
        server, client_address = handoff
        server.process_request(request, client_address)  # that server's admission and thread

    def close_connections(self) -> None:
        super().close_connections()
        self.management.close_connections()

    def server_close(self) -> None:
        super().server_close()
        self.management.server_close()

    def is_idle(self) -> bool:
        return super().is_idle() and self.management.is_idle()


class ProxyHandler(Handler):
    server: ProxyServer
    server_version = "localvault-proxy"

    def do_CONNECT(self) -> None:
        target = _authority(self.path)
        if target is None:
            return self._refuse(400, f"The CONNECT target {self.path[:300]!r} is not host:port.")
        host, port = target
        if self._request_started():  # bytes sent before the answer: not a tunnel we can hand on
            return self._refuse(400, "Send nothing after CONNECT before the proxy has answered.")
        kind, detail = self.server.destination(host, port)
        if kind == "refuse":
            return self._refuse(*detail)
        if kind == "serve":
            self._established()
            self.close_connection = True
            self.server.hand_off(self.connection, detail, self.client_address)
            return
        self._tunnel(host, port)

    def do_other(self) -> None:
        self._refuse(
            405,
            f"localvault's proxy tunnels HTTPS only (CONNECT host:443); {self.command} is not proxied. "
            "Send plain-HTTP requests directly (add their host to NO_PROXY and no_proxy).",
        )

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_other

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        self._refuse(code, message or "Bad request")

    def _refuse(self, status: int, line: str) -> None:
        self.close_connection = self._linger = True
        body = (line + "\n").encode("utf-8", "replace")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        log.debug("proxy refused %s: %s", self.path[:300], line)

    def _established(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()

    def _tunnel(self, host: str, port: int) -> None:
        """Relay bytes both ways, unread, until both sides have finished or the tunnel idles too long."""
        try:
            upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            return self._refuse(502, f"localvault's proxy cannot reach {host}:{port}: {exc.strerror or exc}.")
        self.close_connection = True
        with upstream:
            self._established()
            _relay(self.connection, upstream)


def _relay(client: socket.socket, upstream: socket.socket) -> None:
    peers = {client: upstream, upstream: client}
    open_reads = [client, upstream]
    with contextlib.suppress(OSError, ValueError):
        while open_reads:
            readable, _, _ = select.select(open_reads, [], [], TUNNEL_IDLE_TIMEOUT)
            if not readable:
                return
            for sock in readable:
                data = sock.recv(65536)
                if data:
                    peers[sock].settimeout(LINGER_TIMEOUT + TUNNEL_IDLE_TIMEOUT)
                    peers[sock].sendall(data)
                else:  # that side has finished sending: pass the end on, keep the other direction
                    open_reads.remove(sock)
                    with contextlib.suppress(OSError):
                        peers[sock].shutdown(socket.SHUT_WR)


class ManagementServer(VaultServer):
    """``https://management.azure.com`` for ``az login --identity``: the subscriptions and tenants it
    lists, both empty, for a localvault token; Resource Manager's 404 for anything else."""

    def __init__(self, context: ssl.SSLContext, issuer: TokenIssuer, max_connections: int) -> None:
        super().__init__(("127.0.0.1", 0), context, None, issuer, max_connections, bind=False)  # type: ignore[arg-type]
        self.RequestHandlerClass = ManagementHandler


class ManagementHandler(Handler):
    server: ManagementServer

    def error_body(self, error: VaultError) -> Dict[str, Any]:
        return {"error": {"code": error.code, "message": error.message}}

    def _serve(self) -> None:
        headers = {"x-ms-request-id": str(uuid.uuid4()), "Cache-Control": "no-cache"}
        try:
            self.read_body()
            status, body = self._answer(headers)
        except VaultError as error:
            status, body = error.status, self.error_body(error)
        self.send_json(status, body, headers)

    def _answer(self, headers: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.server.issuer.verify(token.strip(), MANAGEMENT_AUDIENCES):
            headers["WWW-Authenticate"] = (
                f'Bearer authorization_uri="https://login.microsoftonline.com/{TENANT_ID}", '
                'error="invalid_token", error_description="The access token is missing or invalid."'
            )
            return 401, {
                "error": {
                    "code": "InvalidAuthenticationToken",
                    "message": "The access token is missing or invalid: localvault accepts only tokens from "
                    "its own identity endpoint, for https://management.azure.com/.",
                }
            }
        split = split_target(self.path)
        path = split.path.rstrip("/").lower()
        if self.command == "GET" and path in ("/subscriptions", "/tenants"):
            return 200, {"value": []}
        return 404, {
            "error": {
                "code": "NotFound",
                "message": f"localvault emulates no Resource Manager operation but GET /subscriptions and "
                f"GET /tenants (both empty): {self.command} {split.path[:200]} is not served.",
            }
        }

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_other = _serve
