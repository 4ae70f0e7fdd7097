"""A hardened HTTP/1.1 server: every read and write bounded in time, connections admitted under a cap,
request framing checked, and malformed HTTP answered by the endpoint's own error format."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterable, Match, Optional, Set, Tuple
from urllib.parse import SplitResult, urlsplit

from .exceptions import BadParameter, PayloadTooLarge, VaultError

log = logging.getLogger("localvault")

MAX_BODY = 256 * 1024
MAX_DRAIN = 16 * 1024 * 1024
IDLE_TIMEOUT = 120.0  # for a request's first byte
REQUEST_TIMEOUT = 30.0  # for the TLS handshake; and for the rest of a request, headers and body, in all
SEND_TIMEOUT = 30.0  # for all of one answer, however slowly the client reads it
LINGER_TIMEOUT = 2.0  # to read and drop what a client still sends after an answer that ends its connection
MAX_CONNECTIONS = 128  # per server; beyond it the longest idle connection is closed, or else the new one
BACKLOG = 128  # connections the kernel queues before the server accepts them
TOO_LARGE = "The request body is larger than {} bytes."
BAD_FRAMING = (
    "The request body needs one valid Content-Length; Transfer-Encoding (chunked or any other) "
    "is not supported."
)

CLIENT_GONE = (ConnectionError, socket.timeout, ssl.SSLError)
_PROTOCOL_CODES = {
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    413: "RequestEntityTooLarge",
}
HTTP_1_ONLY = "localvault speaks HTTP/1.0 and HTTP/1.1 only."
BAD_HEADER = "A header line is malformed: each must be 'Name: value', with no space before the colon."
# What a connection is doing, as admission sees it. Waiting (for its next request) and unfinished heads
# (the TLS handshake included) are idle: the oldest of them makes room for a newcomer.
WAITING, HEAD, BUSY = "waiting", "head", "busy"
MAX_LOGGED = 1024  # characters of client-controlled text in one log line
# Runs of characters a token or a percent-encoded one is made of: found in one linear pass, and a run
# holding a JWT's start ("eyJ", base64url for '{"') is hidden whole, whatever separates its parts.
_WORDS = re.compile(r"[\w.%~+/-]+")
_SECRET_VALUE = re.compile(r"(?i)(secret=)[^&\s]*")


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


def printable(text: str, hidden: Iterable[str] = ()) -> str:
    """Client-controlled text for the log, in time linear in its length: each of ``hidden``, any
    ``secret=`` value and anything like a token hidden, cut to MAX_LOGGED, control characters escaped."""
    for secret in hidden:
        if secret:
            text = text.replace(secret, "<secret>")
    if len(text) > MAX_LOGGED:
        text = f"{text[:MAX_LOGGED]}...({len(text) - MAX_LOGGED} more)"
    text = _SECRET_VALUE.sub(r"\1<secret>", text)
    text = _WORDS.sub(_hide_token, text)
    return text.translate(BaseHTTPRequestHandler._control_char_table)


def _hide_token(match: Match[str]) -> str:
    return "<token>" if "eyJ" in match[0] else match[0]


# Linux: acknowledge at once rather than up to 40 ms later. A client without TCP_NODELAY (urllib3 through
# a proxy) holds a request's body until its head is acknowledged.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class RequestReader(socket.SocketIO):
    """A connection's reads, bounded in time: IDLE_TIMEOUT for the first byte of a request, then
    REQUEST_TIMEOUT for all the rest of it, so a client trickling bytes cannot hold a thread."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "rb")
        sock._io_refs += 1  # type: ignore[attr-defined]  # as socket.makefile() counts its files
        self.deadline: Optional[float] = None  # None until a request's first byte arrives

    def next_request(self) -> None:
        self.deadline = None

    def begin(self) -> None:
        """A request has begun, its first bytes perhaps read already with an earlier one's."""
        if self.deadline is None:
            self.deadline = time.monotonic() + REQUEST_TIMEOUT

    def readinto(self, buffer: Any) -> Optional[int]:
        sock = self._sock  # type: ignore[attr-defined]
        if sock.gettimeout() == 0:  # a look ahead that must not block
            count = super().readinto(buffer)
        else:
            remaining = IDLE_TIMEOUT if self.deadline is None else self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request was not received in time")
            sock.settimeout(remaining)
            if _QUICKACK is not None:
                with contextlib.suppress(OSError):  # not TCP, when a socket pair is handed over
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            try:
                count = super().readinto(buffer)
            finally:
                sock.settimeout(IDLE_TIMEOUT)
        if count:
            self.begin()
        return count


class AnswerWriter(socket.SocketIO):
    """A connection's writes, bounded in time: SEND_TIMEOUT for all of one answer, so a client that
    reads slowly cannot hold a thread."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "wb")
        sock._io_refs += 1  # type: ignore[attr-defined]
        self.deadline: Optional[float] = None  # None until an answer's first write
        self.timed_out = False

    def next_answer(self) -> None:
        self.deadline = None

    def write(self, data: Any) -> Optional[int]:
        sock = self._sock  # type: ignore[attr-defined]
        if self.deadline is None:
            self.deadline = time.monotonic() + SEND_TIMEOUT
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            raise socket.timeout("the answer was not taken in time")
        sock.settimeout(remaining)
        try:
            return super().write(data)
        except socket.timeout:
            self.timed_out = True
            raise
        finally:
            sock.settimeout(IDLE_TIMEOUT)


class Server(ThreadingHTTPServer):
    """Threading server that can be stopped with every connection closed and every thread joined."""

    daemon_threads = False
    block_on_close = True
    # POSIX SO_REUSEADDR: bind again at once while a stopped server's closed connections sit in TIME_WAIT,
    # never beside a live listener. Windows' would let a second server share the port, so not there.
    allow_reuse_address = os.name != "nt"
    hidden: Tuple[str, ...] = ()  # secrets that never reach the log, even when a client sends them
    request_queue_size = BACKLOG

    def __init__(
        self,
        address: Tuple[str, int],
        handler: type,
        max_connections: int = MAX_CONNECTIONS,
        bind: bool = True,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.bound = bind
        self.max_connections = max_connections
        self._connections: Set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        # Connections admitted, each with what it is doing and since when; and those closed to make room.
        self._states: Dict[socket.socket, Tuple[str, float]] = {}
        self._evicted: Set[socket.socket] = set()
        self._activity = threading.Condition()
        self._spawning = threading.Lock()
        self._spawning_closed = False
        # Unbound, the server only serves connections handed to finish_request() by their owner.
        super().__init__(address, handler, bind_and_activate=bind)

    def track(self, sock: socket.socket, active: bool) -> bool:
        """Add or drop a connection; False when adding one after close_connections(), which must end."""
        with self._connections_lock:
            if active and self._closing:
                return False
            (self._connections.add if active else self._connections.discard)(sock)
            return True

    def server_close(self) -> None:
        with self._spawning:
            self._spawning_closed = True
        super().server_close()

    def close_connections(self) -> None:
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._admit(request):
            log.debug("connection from %s closed: %d connections are busy", client_address, self.busy())
            self.shutdown_request(request)
            return
        try:
            # socketserver appends a thread before starting it; server_close() must never meet one unstarted
            # (another thread, the proxy, hands connections to this server while it may be closing).
            with self._spawning:
                if self._spawning_closed:
                    self.forget(request)
                    self.shutdown_request(request)
                    return
                super().process_request(request, client_address)
        except BaseException:
            self.forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.serve_connection(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Serve a connection accepted elsewhere to its end, in this thread, admitted as if accepted here."""
        if not self._admit(request):
            log.debug("connection from %s closed: %d connections are busy", client_address, self.busy())
            return
        self.serve_connection(request, client_address)

    def busy(self) -> int:
        with self._activity:
            return sum(state == BUSY for state, _ in self._states.values())

    def _admit(self, sock: socket.socket) -> bool:
        """Count one more connection if there is room, made if need be by closing the one idle longest:
        waiting for its next request, or still sending its head. Check and count share one lock."""
        with self._activity:
            if len(self._states) >= self.max_connections:
                idle = [(since, sock) for sock, (state, since) in self._states.items() if state != BUSY]
                if not idle:
                    return False
                victim = min(idle, key=lambda item: item[0])[1]
                del self._states[victim]  # no longer counted; its thread ends on the shutdown
                self._evicted.add(victim)
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(victim, socket.SHUT_RDWR)  # the socket's own, below any TLS
            self._states[sock] = (HEAD, time.monotonic())  # its head (a TLS handshake first) is to come
            self._activity.notify_all()
            return True

    def rekey(self, sock: socket.socket, wrapper: socket.socket) -> None:
        """The connection now reads and writes through ``wrapper`` (TLS), which takes over its state."""
        with self._activity:
            if sock in self._evicted:
                self._evicted.discard(sock)
                self._evicted.add(wrapper)
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(wrapper, socket.SHUT_RDWR)
            else:
                self._states[wrapper] = self._states.pop(sock)

    def forget(self, sock: socket.socket) -> None:
        """The connection has ended."""
        with self._activity:
            self._states.pop(sock, None)
            self._evicted.discard(sock)
            self._activity.notify_all()

    def set_state(self, sock: socket.socket, state: str) -> None:
        with self._activity:
            if sock not in self._evicted:
                self._states[sock] = (state, time.monotonic())
            self._activity.notify_all()

    def wait_for_request(self, sock: socket.socket) -> None:
        self.set_state(sock, WAITING)

    def request_arrived(self, sock: socket.socket) -> None:
        self.set_state(sock, BUSY)

    def is_idle(self) -> bool:
        """No request being read or handled, none waiting to be accepted, no unread bytes anywhere."""
        with self._activity:
            if any(state != WAITING for state, _ in self._states.values()):
                return False
            waiting = list(self._states)
        with contextlib.suppress(OSError, ValueError):
            if any(isinstance(s, ssl.SSLSocket) and s.pending() for s in waiting):
                return False
            listening = [self.socket] if self.bound else []  # an unbound socket always reads as ready
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

    def serve_connection(self, request: Any, client_address: Any) -> None:
        """Serve one admitted connection until it ends."""
        try:
            request.settimeout(IDLE_TIMEOUT)
            if self.track(request, True):
                self.RequestHandlerClass(request, client_address, self)
        finally:
            self.track(request, False)
            self.forget(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class TLSServer(Server):
    """A server whose connections speak TLS; the handshake happens in the connection's own thread."""

    def __init__(
        self,
        address: Tuple[str, int],
        handler: type,
        context: ssl.SSLContext,
        max_connections: int = MAX_CONNECTIONS,
        bind: bool = True,
    ) -> None:
        self.context = context
        super().__init__(address, handler, max_connections, bind)

    def serve_connection(self, request: Any, client_address: Any) -> None:
        with contextlib.suppress(OSError):  # not TCP, when a socket pair is handed over
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request.settimeout(REQUEST_TIMEOUT)  # for the whole handshake: ssl counts it from its start
        # Wrap first and shake hands after, so stop() can shut down a connection stuck in the handshake.
        try:
            tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            self.forget(request)
            raise
        self.rekey(request, tls)
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
            self.forget(tls)
            tls.close()


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"
    wbufsize = 64 * 1024  # headers and body leave in one write, flushed after each request
    server_version = "localvault"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self._linger = False  # whether the client may still be sending when the connection ends
        self.connection = self.request
        self._reader = RequestReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        self._writer = AnswerWriter(self.connection)
        self.wfile = io.BufferedWriter(self._writer, self.wbufsize)

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
        self._writer.next_answer()
        connection = self.connection
        try:
            if self._request_started():
                self._reader.begin()  # its bytes came with the last request's: its deadline runs now
                self.server.set_state(connection, HEAD)
            else:
                self.server.wait_for_request(connection)
                try:
                    self.rfile.peek(1)  # the idle wait, until a request's first byte or the end
                finally:
                    self.server.set_state(connection, HEAD)
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414, "The request line is too long.")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.server.request_arrived(connection)  # a whole head: no longer idle
            if self._malformed_headers():
                self.send_error(400, BAD_HEADER)
                return
            if self._content_length() is None:
                self.send_error(400, BAD_FRAMING)
                return
            getattr(self, "do_" + self.command, self.do_other)()
            self.wfile.flush()
        except socket.timeout:
            self._timed_out()
        except CLIENT_GONE:  # the client went away mid-request
            self.close_connection = True

    def _malformed_headers(self) -> bool:
        """A line that is no 'Name: value' (which ends the stdlib's headers early, the rest taken for a
        body), a header without a name, or a value folded over lines."""
        headers = self.headers
        return bool(headers.defects or headers.get_payload()) or any(
            "\n" in value or "\r" in value for value in headers.values()
        )

    def do_other(self) -> None:
        """A method no route serves."""
        raise NotImplementedError

    def _timed_out(self) -> None:
        self.close_connection = True
        if self._reader.deadline is not None and not self._writer.timed_out:  # say why it ends
            with contextlib.suppress(OSError):
                self.send_error(408, "The request was not received in time.")
                self.wfile.flush()

    def handle_expect_100(self) -> bool:
        """Refuse a body before the client sends it, or ask for it now rather than with the answer."""
        length, limit = self._content_length(), self.body_limit()
        if length is None or length > limit:
            too_large = TOO_LARGE.format(limit)
            self.send_error(400 if length is None else 413, BAD_FRAMING if length is None else too_large)
            return False
        # Busy before the 100: a client sending its body on it must never have its connection taken for idle.
        self.server.request_arrived(self.connection)
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
        if log.isEnabledFor(logging.DEBUG):  # every answer is logged: no work for a log that drops it
            log.debug("%s %s", self.address_string(), printable(format % args, self.server.hidden))

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
        if code == 505:  # HTTP/2.0, PRI * HTTP/2.0, HTTP/9.9: a malformed request here, not a server fault
            code, message = 400, HTTP_1_ONLY
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

    def body_limit(self) -> int:
        """The largest body this request may have: read before anything is done with it."""
        return MAX_BODY

    def read_body(self) -> bytes:
        length = self._content_length()
        if length is None:
            self.close_connection = True
            raise BadParameter(BAD_FRAMING)
        if length > self.body_limit():
            self.skip_body()
            raise PayloadTooLarge(TOO_LARGE.format(self.body_limit()))
        return self.rfile.read(length)
