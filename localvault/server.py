"""HTTP machinery: the TLS vault server, the plain-HTTP managed-identity endpoint, and the one place
that turns exceptions into the service's error JSON."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import select
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Set, Tuple
from urllib.parse import parse_qsl, urlsplit

from . import control, urls
from .exceptions import BadParameter, PayloadTooLarge, Unauthorized, VaultError
from .faults import DROP, DropConnection, fault_of
from .models import KeyStore
from .responses import Request
from .tokens import MANAGED_HSM_RESOURCE, TENANT_ID, VAULT_RESOURCE, TokenIssuer

log = logging.getLogger("localvault")

API_VERSIONS = ("7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01")
LATEST_API_VERSION = API_VERSIONS[-1]
MAX_BODY = 256 * 1024
MAX_DRAIN = 16 * 1024 * 1024
IDLE_TIMEOUT = 120.0


def challenge(resource: str) -> str:
    return f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", resource="{resource}"'


CHALLENGE = challenge(VAULT_RESOURCE)
MANAGED_HSM_CHALLENGE = challenge(MANAGED_HSM_RESOURCE)
MISSING_TOKEN = "AKV10000: Request is missing a Bearer, PoP, or MTLS_POP token."
INVALID_TOKEN = "The access token is invalid: its signature, audience or expiry could not be verified."
VAULT_AUDIENCES = (VAULT_RESOURCE, VAULT_RESOURCE + "/")
MANAGED_HSM_AUDIENCES = (MANAGED_HSM_RESOURCE, MANAGED_HSM_RESOURCE + "/")
SERVICE_HEADERS = {
    "Cache-Control": "no-cache",
    "Pragma": "no-cache",
    "Expires": "-1",
    "Strict-Transport-Security": "max-age=31536000;includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "x-ms-keyvault-service-version": "1.9.0.0",
    "x-ms-keyvault-region": "localvault",
}


class _Server(ThreadingHTTPServer):
    """Threading server that can be stopped with every connection closed and every thread joined."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = False

    def __init__(self, address: Tuple[str, int], handler: type) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._connections: Set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        # Connections accepted and not waiting for their next request; and those that are waiting.
        self._busy = 0
        self._waiting: Set[socket.socket] = set()
        self._activity = threading.Condition()
        super().__init__(address, handler)

    def track(self, sock: socket.socket, active: bool) -> bool:
        """Add or drop a connection; False when adding one after close_connections(), which must end."""
        with self._connections_lock:
            if active and self._closing:
                return False
            (self._connections.add if active else self._connections.discard)(sock)
            return True

    def close_connections(self) -> None:
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._set_busy(+1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._set_busy(-1)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._set_busy(-1)

    def _set_busy(self, delta: int, waiting: Optional[socket.socket] = None) -> None:
        with self._activity:
            self._busy += delta
            if waiting is not None:
                (self._waiting.add if delta < 0 else self._waiting.discard)(waiting)
            self._activity.notify_all()

    def wait_for_request(self, sock: socket.socket) -> None:
        self._set_busy(-1, sock)

    def request_arrived(self, sock: socket.socket) -> None:
        self._set_busy(+1, sock)

    def is_idle(self) -> bool:
        """No request being read or handled, none waiting to be accepted, no unread bytes anywhere."""
        with self._activity:
            if self._busy:
                return False
            waiting = list(self._waiting)
        with contextlib.suppress(OSError, ValueError):
            if any(isinstance(s, ssl.SSLSocket) and s.pending() for s in waiting):
                return False
            readable, _, _ = select.select([self.socket, *waiting], [], [], 0)
            return not readable
        return False

    def wait_idle(self, deadline: float) -> bool:
        while not self.is_idle():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._activity:
                # woken by any change; a short wait covers bytes arriving on a waiting connection
                self._activity.wait(min(remaining, 0.01))
        return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IDLE_TIMEOUT)
        if not self.track(request, True):
            return
        try:
            super().finish_request(request, client_address)
        finally:
            self.track(request, False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class VaultServer(_Server):
    """HTTPS server for the keys API. The TLS handshake happens in the connection's own thread."""

    controls: control.Controls  # faults, permissions, the request log; set by LocalVault

    def __init__(
        self, address: Tuple[str, int], context: ssl.SSLContext, store: KeyStore, issuer: TokenIssuer
    ) -> None:
        self.context, self.store, self.issuer = context, store, issuer
        super().__init__(address, VaultHandler)
        self.base_url = ""  # the vault's URL, which names it in ids and links; set by LocalVault once bound

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request.settimeout(IDLE_TIMEOUT)
        # Wrap first and shake hands after, so stop() can shut down a connection stuck in the handshake.
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            if not self.track(tls, True):
                return
            tls.do_handshake()
            self.RequestHandlerClass(tls, client_address, self)
        except (OSError, ssl.SSLError):
            log.debug("connection from %s failed", client_address, exc_info=True)
        finally:
            self.track(tls, False)
            tls.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"
    wbufsize = 64 * 1024  # headers and body leave in one write, flushed after each request
    server_version = "localvault"

    def version_string(self) -> str:
        return self.server_version

    def handle_one_request(self) -> None:
        # As the stdlib's, but the server knows when this connection waits for its next request.
        waiting = not self._request_started()
        if waiting:
            self.server.wait_for_request(self.connection)
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (ConnectionError, socket.timeout, ssl.SSLError):
            self.close_connection = True
            return
        finally:
            if waiting:
                self.server.request_arrived(self.connection)
        try:
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "The request line is too long.")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, f"Unsupported method ({self.command!r})")
                return
            method()
            self.wfile.flush()
        except (ConnectionError, socket.timeout, ssl.SSLError):  # the client went away mid-request
            self.close_connection = True

    def _request_started(self) -> bool:
        """Whether bytes of the next request are here already: buffered, decrypted or on the socket.
        TLS may hold a record that select() cannot see, so this tries a read without blocking."""
        self.connection.setblocking(False)
        try:
            return bool(self.rfile.peek(1))
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True  # the read that follows meets the same error and ends the connection
        finally:
            self.connection.settimeout(IDLE_TIMEOUT)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_json(self, status: int, body: Optional[Dict[str, Any]], headers: Dict[str, str]) -> None:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        if status != 204:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Malformed HTTP, answered in the service's error format instead of the stdlib's HTML page."""
        self.close_connection = True
        error = {
            "code": "BadParameter" if code < 500 else "InternalError",
            "message": message or "Bad request",
        }
        self.send_json(code, {"error": error}, {"Connection": "close"})

    def _content_length(self) -> Optional[int]:
        """The declared body length; None for a chunked or unreadable one."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        raw = self.headers.get("Content-Length", "0").strip() or "0"
        return int(raw) if raw.isascii() and raw.isdigit() else None

    def skip_body(self) -> None:
        """Read and drop the body, so the client sees the answer rather than a reset connection;
        a body too large or of unknown length ends the connection instead."""
        length = self._content_length()
        if length is None or length > MAX_DRAIN:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)

    def read_body(self) -> bytes:
        length = self._content_length()
        if length is None:
            self.close_connection = True
            raise BadParameter("The request needs a valid Content-Length; chunked bodies are not supported.")
        if length > MAX_BODY:
            self.skip_body()
            raise PayloadTooLarge(f"The request body is larger than {MAX_BODY} bytes.")
        return self.rfile.read(length)


class VaultHandler(_Handler):
    server: VaultServer

    def _dispatch(self) -> None:
        if control.is_control(self.path):
            return control.handle(self)
        headers = dict(SERVICE_HEADERS, **{"x-ms-request-id": str(uuid.uuid4())})
        fault: Optional[str] = None
        try:
            self._authenticate(headers)
            status, payload = self._handle(self.read_body())
        except DropConnection:  # an injected fault: no answer at all
            self.close_connection = True
            self.server.controls.log.record(self.command, self.path, None, DROP)
            return
        except VaultError as error:
            status, payload, fault = error.status, error.body(), fault_of(error)
            headers.update(error.headers)
        except Exception:  # a bug in localvault; the server keeps serving
            log.exception("internal error handling %s %s", self.command, self.path)
            status, payload = (
                500,
                {"error": {"code": "InternalError", "message": "localvault internal error"}},
            )
        self.send_json(status, payload, headers)
        # logged before the answer is flushed, so a client that has its answer finds it in the log
        self.server.controls.log.record(self.command, self.path, status, fault)

    def _handle(self, body: bytes) -> Tuple[int, Optional[Dict[str, Any]]]:
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        api_version = query.get("api-version")
        if not api_version:
            raise BadParameter("The 'api-version' query parameter is missing.")
        if api_version not in API_VERSIONS:
            raise BadParameter(
                f"The specified version ({api_version}) is not recognized. "
                f"Consider using the latest supported version ({LATEST_API_VERSION})."
            )
        route, params = urls.resolve(self.command, split.path)
        self.server.controls.check(route)
        request = Request(
            self.server.store, self.server.base_url, split.path.rstrip("/"), api_version, query, body
        )
        return route.handler(request, **params)

    def _authenticate(self, headers: Dict[str, str]) -> None:
        managed_hsm = self.server.store.managed_hsm
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            if self.server.issuer.verify(
                token.strip(), MANAGED_HSM_AUDIENCES if managed_hsm else VAULT_AUDIENCES
            ):
                return
            message = INVALID_TOKEN
        else:
            message = MISSING_TOKEN
        headers["WWW-Authenticate"] = MANAGED_HSM_CHALLENGE if managed_hsm else CHALLENGE
        self.skip_body()
        raise Unauthorized(message)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch


class IdentityServer(_Server):
    """The App Service managed-identity protocol (api-version 2019-08-01), over plain HTTP on loopback."""

    def __init__(self, address: Tuple[str, int], issuer: TokenIssuer, secret: str) -> None:
        self.issuer, self.secret = issuer, secret
        super().__init__(address, IdentityHandler)


class IdentityHandler(_Handler):
    server: IdentityServer
    path_prefix = "/msi/token"

    def _reply(self, status: int, body: Dict[str, Any]) -> None:
        self.send_json(status, body, {"Cache-Control": "no-store"})

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query))
        if split.path.rstrip("/") != self.path_prefix:
            return self._reply(404, {"statusCode": 404, "message": "Not found"})
        if not hmac.compare_digest(self.headers.get("X-IDENTITY-HEADER", ""), self.server.secret):
            return self._reply(
                401, {"statusCode": 401, "message": "The X-IDENTITY-HEADER is missing or wrong."}
            )
        if query.get("api-version") != "2019-08-01":
            return self._reply(400, {"statusCode": 400, "message": "api-version must be 2019-08-01."})
        resource = query.get("resource", "")
        if not resource:
            return self._reply(400, {"statusCode": 400, "message": "The 'resource' parameter is required."})
        token, expires_on = self.server.issuer.issue(resource)
        self._reply(
            200,
            {
                "access_token": token,
                "expires_on": str(expires_on),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": self.server.issuer.principal_id,
            },
        )

    def do_POST(self) -> None:
        self.read_body()
        self._reply(405, {"statusCode": 405, "message": "Use GET."})
