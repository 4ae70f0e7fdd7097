"""Property: whatever method, path, headers and body reach any route, localvault answers without a 5xx
in the service's error format, and keeps serving."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import re
import socket
import ssl
from typing import Any, List, Tuple
from urllib.parse import quote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_localvault_wire import FIELDS as WIRE_FIELDS

from localvault import urls
from localvault.server import API_VERSIONS

EXAMPLES = 200
PER_ROUTE = settings(
    max_examples=math.ceil(EXAMPLES / len(urls.ROUTES)),
    deadline=None,
    derandomize=True,  # the same requests on every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Framing is tested case by case in test_localvault_hostile.py; here it is always right.
FRAMING_HEADERS = {"content-length", "transfer-encoding", "connection", "expect"}
FIELDS = [*WIRE_FIELDS, "dp", "dq", "qi", "k", "lifetimeActions"]
WORDS = ["RSA", "EC", "RSA-HSM", "EC-HSM", "oct", "P-256", "P-521", "sign", "AQAB", "AQ", "", "\u0000"]


def _template(pattern: str) -> str:
    """A route's pattern as a format string with {name}, {version}, {optional_version} and {slash}."""
    template = (
        pattern.replace(urls.NAME, "{name}")
        .replace(urls.OPTIONAL_VERSION, "{optional_version}")
        .replace(urls.ANY_VERSION, "{version}")
        .replace(urls.VERSION, "{version}")
        .replace("/?", "{slash}")
    )
    assert not re.search(r"[()\[\]?*+^$\\]", template), template
    return template


def _segment() -> st.SearchStrategy[str]:
    return st.one_of(
        st.from_regex(r"[0-9a-zA-Z-]{1,24}", fullmatch=True),  # a valid name or version
        st.sampled_from(["", ".", "..", "%00", "%2F", "a" * 200, "-", "deadbeef" * 4]),
        st.text(max_size=30).map(lambda text: quote(text, safe="")),
    )


def _json_value() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([2048, 256, 3, 65537, -1, 0, 2**64]),
        st.floats(allow_nan=False),
        st.sampled_from(WORDS),
        st.text(max_size=40),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), children, max_size=6),
        ),
        max_leaves=24,
    )


_METHODS = sorted({route.method for route in urls.ROUTES} | {"HEAD", "OPTIONS", "TRACE", "CONNECT", "get"})
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}"  # what HTTP allows in a method or header name
_HEADER_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=60
)


@st.composite
def requests_for(draw: Any, route: urls.Route, token: str) -> Tuple[str, bytes]:
    """One request for ``route``, usually well aimed, often otherwise wrong: its method and the raw bytes."""
    method = draw(
        st.one_of(st.just(route.method), st.sampled_from(_METHODS), st.from_regex(_TOKEN, fullmatch=True))
    )
    path = _template(route.pattern).format(
        name=draw(_segment()),
        version=draw(_segment()),
        optional_version=draw(st.one_of(st.just(""), _segment().map(lambda version: "/" + version))),
        slash=draw(st.sampled_from(["", "/"])),
    )
    query = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["api-version", "maxresults", "$skiptoken", "x"]) | st.text(max_size=8),
                st.sampled_from(API_VERSIONS)
                | st.sampled_from(["1", "25", "99", "-1", ""])
                | st.text(max_size=20),
            ),
            max_size=4,
        )
    )
    query = [("api-version", draw(st.sampled_from(API_VERSIONS)))] * draw(st.booleans()) + query
    target = path + ("?" + urlencode(query) if query else "")
    header_and_payload, signature = token.rsplit(".", 1)
    # a signature's first character carries six whole bits: another one always changes it
    forged = f"{header_and_payload}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"
    authorization = draw(st.sampled_from([f"Bearer {token}", f"Bearer {forged}", "", "Basic x"]))
    headers = draw(
        st.lists(
            st.tuples(st.from_regex(_TOKEN, fullmatch=True), _HEADER_VALUE).filter(
                lambda header: header[0].lower() not in FRAMING_HEADERS
            ),
            max_size=5,
        )
    )
    body = draw(
        st.one_of(
            st.just(b""),
            _json_value().map(lambda value: json.dumps(value).encode()),
            st.binary(max_size=300),
        )
    )
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return method, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _send(vault: Any, method: str, data: bytes) -> Tuple[int, bytes]:
    context = ssl.create_default_context(cafile=vault.ca_file)
    raw_sock = socket.create_connection(("127.0.0.1", vault.port), timeout=30)
    with context.wrap_socket(raw_sock, server_hostname="127.0.0.1") as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, response.read()


@pytest.mark.parametrize("route", urls.ROUTES, ids=lambda route: f"{route.method} {route.pattern}")
def test_no_request_to_any_route_gets_a_5xx(localvault, key_client, unique_key_name, route):
    token = localvault.credential().get_token("https://vault.azure.net/.default").token

    @PER_ROUTE
    @given(request=requests_for(route, token))
    def answers_without_5xx(request: Tuple[str, bytes]) -> None:
        method, data = request
        status, body = _send(localvault, method, data)
        if status >= 400 and body:
            payload = json.loads(body)
            assert set(payload) == {"error"}, payload
            code = payload["error"]["code"]
            assert isinstance(code, str) and isinstance(payload["error"]["message"], str)
        assert status < 500, (data[:300], status, body[:300])

    answers_without_5xx()
    # and a normal request still works afterwards
    key = key_client.create_ec_key(unique_key_name)
    assert key_client.get_key(unique_key_name).id == key.id


# -- raw framing ------------------------------------------------------------------------------------

FRAMING = settings(PER_ROUTE, max_examples=60)
_CRLF = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1", b""])
_HEADER_LINES = st.one_of(
    st.sampled_from(
        [
            b"Content-Length: 0",
            b"Content-Length: 5",
            b"Content-Length: -1",
            b"Content-Length: 5, 5",
            b"Content-Length : 5",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding : chunked",
            b"Transfer-Encoding: identity",
            b"Expect: 100-continue",
            b"Connection: keep-alive",
            b"no colon",
            b": no name",
            b" folded: line",
            b"X-A: b\r\n  continued",
            b"X-Nul: \x00",
        ]
    ),
    st.tuples(st.from_regex(_TOKEN, fullmatch=True), _HEADER_VALUE).map(
        lambda header: f"{header[0]}: {header[1]}".encode("latin-1")
    ),
)


@st.composite
def raw_requests(draw: Any, target: bytes, authorization: bytes) -> Tuple[int, bytes]:
    """One to three requests in one write, with whatever framing: how many, and their bytes. A body
    the head does not frame is, rightly, read as a request of its own, but it never has credentials."""
    count = draw(st.integers(1, 3))
    data = b""
    for _ in range(count):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"PRI", b"get", b""]))
        version = draw(_VERSIONS)
        line = b" ".join(part for part in (method, draw(st.sampled_from([target, b"*", b"/"])), version) if part)
        end = draw(_CRLF)
        headers = [b"Host: 127.0.0.1", authorization, *draw(st.lists(_HEADER_LINES, max_size=5))]
        body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"{}"]))
        data += line + end + b"".join(header + end for header in headers) + end + body
    return count, data


class _Kept(io.BufferedReader):
    def close(self) -> None:  # http.client closes its file after each body; the next answer follows
        pass


class _Recorded:
    """Bytes received, read back as responses by http.client."""

    def __init__(self, data: bytes) -> None:
        self.file = _Kept(io.BytesIO(data))  # type: ignore[arg-type]

    def makefile(self, *_: Any) -> Any:
        return self.file


def _responses(data: bytes) -> List[Tuple[int, bytes]]:
    recorded, answers = _Recorded(data), []
    while recorded.file.peek(1):
        response = http.client.HTTPResponse(recorded, method="GET")  # type: ignore[arg-type]
        response.begin()
        answers.append((response.status, response.read()))
    return answers


def _until_eof(sock: socket.socket) -> bytes:
    received = b""
    # TLS may end with an alert after a half-close: what came before it is what the server answered
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("port", ["vault", "identity"])
def test_raw_framing_never_gets_a_5xx_or_more_answers_than_requests(localvault, port):
    token = localvault.credential().get_token("https://vault.azure.net/.default").token
    if port == "vault":
        target, authorization = b"/keys?api-version=7.5", f"Authorization: Bearer {token}".encode()
    else:
        secret = localvault.environ()["IDENTITY_HEADER"]
        target = b"/msi/token?api-version=2019-08-01&resource=https://vault.azure.net"
        authorization = f"X-IDENTITY-HEADER: {secret}".encode()

    @FRAMING
    @given(request=raw_requests(target, authorization))
    def answers_in_frame(request: Tuple[int, bytes]) -> None:
        count, data = request
        if port == "vault":
            context = ssl.create_default_context(cafile=localvault.ca_file)
            raw_sock = socket.create_connection(("127.0.0.1", localvault.port), timeout=30)
            sock: socket.socket = context.wrap_socket(raw_sock, server_hostname="127.0.0.1")
        else:
            sock = socket.create_connection(("127.0.0.1", urlsplit(localvault.identity_endpoint).port), timeout=30)
        with sock:
            sock.sendall(data)
            socket.socket.shutdown(sock, socket.SHUT_WR)  # no more requests: the server ends the connection
            received = _until_eof(sock)
        answers = _responses(received)
        assert len(answers) <= 2 * count, (data, received[:500])  # each head, and its body at most
        assert sum(status < 300 for status, _ in answers) <= count, (data, received[:500])
        for status, body in answers:
            assert status < 500, (data, status, body[:300])
            if status >= 400 and body:
                payload = json.loads(body)
                assert isinstance(payload["error"]["message"] if port == "vault" else payload["message"], str)

    answers_in_frame()
    assert localvault.credential().get_token("https://vault.azure.net/.default").token
