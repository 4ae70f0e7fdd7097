"""HTTP machinery: the TLS vault server, the plain-HTTP managed-identity endpoint, and the one place
that turns exceptions into the service's error JSON."""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import re
import select
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Set, Tuple
from urllib.parse import SplitResult, parse_qsl, urlsplit

from . import control, urls
from .exceptions import BadParameter, MethodNotAllowed, PayloadTooLarge, Unauthorized, VaultError
from .faults import DROP, DropConnection, fault_of
from .models import KeyStore
from .responses import Request
from .tokens import MANAGED_HSM_RESOURCE, TENANT_ID, VAULT_RESOURCE, TokenIssuer

log = logging.getLogger("localvault")

# Every published version a current SDK or the Azure CLI sends (az pins 7.6-preview.2); the last is the latest.
API_VERSIONS = (
    "2016-10-01",
    "7.0",
    "7.1-preview",
    "7.1",
    "7.2-preview",
    "7.2",
    "7.3-preview",
    "7.3",
    "7.4-preview.1",
    "7.4",
    "7.5-preview.1",
    "7.5",
    "7.6-preview.1",
    "7.6-preview.2",
    "7.6",
    "2025-06-01-preview",
    "2025-07-01",
)
LATEST_API_VERSION = API_VERSIONS[-1]
MAX_BODY = 256 * 1024
MAX_DRAIN = 16 * 1024 * 1024
IDLE_TIMEOUT = 120.0  # for a request's first byte
REQUEST_TIMEOUT = 30.0  # for the TLS handshake; and for the rest of a request, headers and body, in all
LINGER_TIMEOUT = 2.0  # to read and drop what a client still sends after an answer that ends its connection
MAX_CONNECTIONS = 128  # per server; beyond it idle connections are closed, or else the new one
TOO_LARGE = f"The request body is larger than {MAX_BODY} bytes."
BAD_FRAMING = (
    "The request body needs one valid Content-Length; Transfer-Encoding (chunked or any other) "
    "is not supported."
)


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
_CLIENT_GONE = (ConnectionError, socket.timeout, ssl.SSLError)
_PROTOCOL_CODES = {
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    413: "RequestEntityTooLarge",
    505: "HttpVersionNotSupported",
}
_TOKEN_LIKE = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*")


class ProtocolError(VaultError):
    """Malformed HTTP, found before any route: always the client's mistake, never InternalError."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, _PROTOCOL_CODES.get(status, "BadParameter")


def split_target(target: str) -> SplitResult:
    """The request target's parts; BadParameter for one that is no URL (``http://[/keys``)."""
    try:
        return urlsplit(target)
    except ValueError:
        raise BadParameter("The request target is not a valid URL.") from None


def _printable(text: str) -> str:
    """Client-controlled text for the log: control characters escaped, anything like a token hidden."""
    return _TOKEN_LIKE.sub("<token>", text.translate(BaseHTTPRequestHandler._control_char_table))


class _RequestReader(socket.SocketIO):
    """A connection's reads, bounded in time: IDLE_TIMEOUT for the first byte of a request, then
    REQUEST_TIMEOUT for all the rest of it, so a client trickling bytes cannot hold a thread."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "rb")
        sock._io_refs += 1  # type: ignore[attr-defined]  # as socket.makefile() counts its files
        self.deadline: Optional[float] = None  # None until a request's first byte arrives

    def next_request(self) -> None:
        self.deadline = None

    def readinto(self, buffer: Any) -> Optional[int]:
        sock = self._sock  # type: ignore[attr-defined]
        if sock.gettimeout() == 0:  # a look ahead that must not block
            count = super().readinto(buffer)
        else:
            remaining = IDLE_TIMEOUT if self.deadline is None else self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request was not received in time")
            sock.settimeout(remaining)
            try:
                count = super().readinto(buffer)
            finally:
                sock.settimeout(IDLE_TIMEOUT)
        if count and self.deadline is None:
            self.deadline = time.monotonic() + REQUEST_TIMEOUT
        return count


class _Server(ThreadingHTTPServer):
    """Threading server that can be stopped with every connection closed and every thread joined."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = False

    def __init__(
        self,
        address: Tuple[str, int],
        handler: type,
        max_connections: int = MAX_CONNECTIONS,
        bind: bool = True,
    ) -> None:
        self.bound = bind  # False: it serves only connections handed to it, and has no port
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections = max_connections
        self._connections: Set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        # Connections accepted and not waiting for their next request; and those that are waiting.
        self._busy = 0
        self._waiting: Set[socket.socket] = set()
        self._activity = threading.Condition()
        super().__init__(address, handler, bind_and_activate=bind)

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
        if not self._admit():
            log.debug("connection from %s closed: %d connections are busy", client_address, self._busy)
            self.shutdown_request(request)
            return
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

    def _admit(self) -> bool:
        """Room for one more connection, made if need be by closing one that waits for its next request.
        Only the accepting thread adds connections, so the count cannot grow between check and add."""
        with self._activity:
            if self._busy + len(self._waiting) < self.max_connections:
                return True
            if not self._waiting:
                return False
            idle = self._waiting.pop()  # no longer counted; its thread ends on the shutdown
        with contextlib.suppress(OSError):
            socket.socket.shutdown(idle, socket.SHUT_RDWR)  # the socket's own, below any TLS layer
        return True

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
            listening = [self.socket] if self.bound else []
            readable, _, _ = select.select([*listening, *waiting], [], [], 0)
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
        self,
        address: Tuple[str, int],
        context: ssl.SSLContext,
        store: KeyStore,
        issuer: TokenIssuer,
        max_connections: int = MAX_CONNECTIONS,
        bind: bool = True,
    ) -> None:
        self.context, self.store, self.issuer = context, store, issuer
        super().__init__(address, VaultHandler, max_connections, bind)
        self.base_url = ""  # the vault's URL, which names it in ids and links; set by LocalVault once bound

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request.settimeout(REQUEST_TIMEOUT)  # for the whole handshake: ssl counts it from its start
        # Wrap first and shake hands after, so stop() can shut down a connection stuck in the handshake.
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            if not self.track(tls, True):
                return
            tls.do_handshake()
            tls.settimeout(IDLE_TIMEOUT)
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

    def setup(self) -> None:
        self._linger = False  # whether the client may still be sending when the connection ends
        self.connection = self.request
        self._reader = _RequestReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = self.connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._drain_before_close()

    def _drain_before_close(self) -> None:
        """Closing with unread bytes resets the connection, and the client may lose the answer: so stop
        sending, then read and drop what the client still sends, bounded in time and size."""
        sock = self.connection
        deadline = time.monotonic() + LINGER_TIMEOUT
        drained = 0
        with contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(sock, socket.SHUT_WR)  # below any TLS layer: the answer is sent
            while drained < MAX_DRAIN and time.monotonic() < deadline:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = socket.socket.recv(sock, 65536)
                if not chunk:
                    break
                drained += len(chunk)

    def handle_one_request(self) -> None:
        # As the stdlib's, but the server knows when this connection waits for its next request, reads
        # are bounded in time, the body's framing is checked, and every method gets an answer.
        self.command = self.requestline = ""
        self.request_version = self.default_request_version
        self._reader.next_request()
        waiting = not self._request_started()
        if waiting:
            self.server.wait_for_request(self.connection)
        try:
            if waiting:
                try:
                    self.rfile.peek(1)  # the idle wait, until a request's first byte or the end
                finally:
                    self.server.request_arrived(self.connection)
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414, "The request line is too long.")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self._content_length() is None:
                self.send_error(400, BAD_FRAMING)
                return
            getattr(self, "do_" + self.command, self.do_other)()
            self.wfile.flush()
        except socket.timeout:
            self._timed_out()
        except _CLIENT_GONE:  # the client went away mid-request
            self.close_connection = True

    def do_other(self) -> None:
        """A method no route serves."""
        raise NotImplementedError

    def _timed_out(self) -> None:
        self.close_connection = True
        if self._reader.deadline is not None:  # a request had begun: say why it ends
            with contextlib.suppress(OSError):
                self.send_error(408, "The request was not received in time.")
                self.wfile.flush()

    def handle_expect_100(self) -> bool:
        """Refuse a body before the client sends it, or ask for it now rather than with the answer."""
        length = self._content_length()
        if length is None or length > MAX_BODY:
            self.send_error(400 if length is None else 413, BAD_FRAMING if length is None else TOO_LARGE)
            return False
        self.send_response_only(100)
        self.end_headers()
        self.wfile.flush()
        return True

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
        log.debug("%s %s", self.address_string(), _printable(format % args))

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

    def error_body(self, error: VaultError) -> Dict[str, Any]:
        """An error in this endpoint's JSON format."""
        return error.body()

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Malformed HTTP, answered in the endpoint's error format instead of the stdlib's HTML page."""
        self.close_connection = self._linger = True
        error = ProtocolError(code, message or "Bad request")
        self.send_json(code, self.error_body(error), {"Connection": "close"})

    def _content_length(self) -> Optional[int]:
        """The declared body length; None when the body's end cannot be trusted: a Transfer-Encoding,
        several or unreadable Content-Lengths. The connection must then end."""
        if "Transfer-Encoding" in self.headers:
            return None
        values = {value.strip() for value in self.headers.get_all("Content-Length", ["0"])}
        raw = values.pop() or "0"
        if values or not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
            return None
        return int(raw)

    def skip_body(self) -> None:
        """Read and drop the body, so the client sees the answer rather than a reset connection;
        a body too large or of unknown length ends the connection instead."""
        length = self._content_length()
        if length is None or length > MAX_DRAIN:
            self.close_connection = self._linger = True
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
            raise BadParameter(BAD_FRAMING)
        if length > MAX_BODY:
            self.skip_body()
            raise PayloadTooLarge(TOO_LARGE)
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
        except _CLIENT_GONE:
            raise
        except Exception:  # a bug in localvault; the server keeps serving
            log.exception("internal error handling %s %s", self.command, _printable(self.path))
            status, payload = (
                500,
                {"error": {"code": "InternalError", "message": "localvault internal error"}},
            )
        self.send_json(status, payload, headers)
        # logged before the answer is flushed, so a client that has its answer finds it in the log
        self.server.controls.log.record(self.command, self.path, status, fault)

    def _handle(self, body: bytes) -> Tuple[int, Optional[Dict[str, Any]]]:
        if not hasattr(self, "do_" + self.command):  # a method no route serves, whatever the path
            raise MethodNotAllowed(f"The requested resource does not support http method '{self.command}'.")
        split = split_target(self.path)
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

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_other = _dispatch


class IdentityServer(_Server):
    """The App Service managed-identity protocol (api-version 2019-08-01), over plain HTTP on loopback."""

    def __init__(
        self,
        address: Tuple[str, int],
        issuer: TokenIssuer,
        secret: str,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.issuer, self.secret = issuer, secret
        super().__init__(address, IdentityHandler, max_connections)


class IdentityHandler(_Handler):
    server: IdentityServer
    path_prefix = "/msi/token"

    def error_body(self, error: VaultError) -> Dict[str, Any]:
        return self._message(error.status, error.message)

    def _serve(self) -> None:
        try:
            self.read_body()  # unused, but read, so that it is never taken for the next request
            status, body = self._token() if self.command == "GET" else (405, self._message(405, "Use GET."))
        except VaultError as error:
            status, body = error.status, self.error_body(error)
        self.send_json(status, body, {"Cache-Control": "no-store"})

    @staticmethod
    def _message(status: int, message: str) -> Dict[str, Any]:
        return {"statusCode": status, "message": message}

    def _token(self) -> Tuple[int, Dict[str, Any]]:
        split = split_target(self.path)
        query = dict(parse_qsl(split.query))
        if split.path.rstrip("/") != self.path_prefix:
            return 404, self._message(404, "Not found")
        presented = self.headers.get("X-IDENTITY-HEADER", "").encode("utf-8", "replace")
        if not hmac.compare_digest(presented, self.server.secret.encode()):
            return 401, self._message(401, "The X-IDENTITY-HEADER is missing or wrong.")
        if query.get("api-version") != "2019-08-01":
            return 400, self._message(400, "api-version must be 2019-08-01.")
        resource = query.get("resource", "")
        if not resource:
            return 400, self._message(400, "The 'resource' parameter is required.")
        token, expires_on = self.server.issuer.issue(resource)
        return 200, {
            "access_token": token,
            "expires_on": str(expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": self.server.issuer.principal_id,
        }

    do_GET = do_other = _serve
