"""Hostile input: sizes and shapes bounded before any expensive work, malformed HTTP answered with a
4xx in each endpoint's format, slow clients cut off, connections capped, secrets kept out of the log."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
from typing import Iterator, List, Tuple
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import EXPORTED_NAMES, RawVault, error_of

from localvault import LocalVault, cli, http11
from localvault.cli import READY, read_exports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAULT_SCOPE = "https://vault.azure.net/.default"


# -- helpers ----------------------------------------------------------------------------------------


def _b64(value, length: int = 0) -> str:
    if isinstance(value, int):
        value = value.to_bytes(length or (value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def _big(size: int) -> bytes:
    """``size`` random bytes with the top bit set: a number of exactly 8 * size bits."""
    data = bytearray(os.urandom(size))
    data[0] |= 0x80
    return bytes(data)


def _rsa_jwk_of(size: int) -> dict:
    """A fresh RSA key as a JWK with every private member."""
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=size).private_numbers()
    values = {
        "n": numbers.public_numbers.n,
        "e": numbers.public_numbers.e,
        "d": numbers.d,
        "p": numbers.p,
        "q": numbers.q,
        "dp": numbers.dmp1,
        "dq": numbers.dmq1,
        "qi": numbers.iqmp,
    }
    return {"kty": "RSA", **{name: _b64(value) for name, value in values.items()}}


def _token(vault: LocalVault) -> str:
    return vault.credential().get_token(VAULT_SCOPE).token


def _tls(vault: LocalVault) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=vault.ca_file)
    sock = socket.create_connection(("127.0.0.1", vault.port), timeout=30)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def _identity(vault: LocalVault) -> socket.socket:
    return socket.create_connection(("127.0.0.1", urlsplit(vault.identity_endpoint).port), timeout=30)


def _request(
    method: str, target: str, headers: Tuple[Tuple[str, str], ...] = (), body: bytes = b"", token: str = ""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _response(sock: socket.socket, method: str = "GET") -> Tuple[int, dict, bytes]:
    """One response read from the socket: status, headers, body."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return response.status, dict(response.getheaders()), response.read()


def _exchange(sock: socket.socket, data: bytes, method: str = "GET") -> Tuple[int, dict, bytes]:
    sock.sendall(data)
    return _response(sock, method)


def _until_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _head(sock: socket.socket) -> bytes:
    """Bytes up to the end of one response head (for a 100 Continue)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def _identity_error(status: int, body: bytes) -> dict:
    """The identity endpoint's error format: ``{"statusCode", "message"}``."""
    payload = json.loads(body)
    assert set(payload) == {"statusCode", "message"}, payload
    assert payload["statusCode"] == status and isinstance(payload["message"], str)
    return payload


def _vault_error(body: bytes) -> dict:
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    assert isinstance(payload["error"]["code"], str) and isinstance(payload["error"]["message"], str)
    return payload["error"]


def _still_serving(vault: LocalVault) -> None:
    client = RawVault(vault)
    try:
        assert client.request("GET", "/keys").status_code == 200
    finally:
        client.close()


@pytest.fixture
def cryptography_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[str]]:
    """Fail any use of cryptography's key construction; the names of the functions reached."""
    calls: List[str] = []

    def spy(name: str):
        def reached(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} reached with hostile input")

        return reached

    for module, name in [
        (rsa, "RSAPrivateNumbers"),
        (rsa, "rsa_crt_dmp1"),
        (rsa, "rsa_crt_dmq1"),
        (rsa, "rsa_crt_iqmp"),
        (rsa, "generate_private_key"),
        (ec, "derive_private_key"),
        (ec, "generate_private_key"),
    ]:
        monkeypatch.setattr(module, name, spy(name))
    yield calls


# -- sizes and shapes, before any expensive work -------------------------------------------------


def _rsa_jwk(**members: bytes) -> dict:
    parts = {"n": _big(256), "e": b"\x01\x00\x01", "d": _big(255), "p": _big(128), "q": _big(128)}
    parts.update(members)
    return {"kty": "RSA", **{name: _b64(value) for name, value in parts.items()}}


HOSTILE_JWKS = [
    # the probe's: 32,768-bit p and q (a 15 s freeze before)
    (_rsa_jwk(p=_big(4096), q=_big(4096)), "'p' is too long for this key: 4096 bytes, at most 129"),
    (_rsa_jwk(n=_big(8192), p=_big(4096), q=_big(4096)), "Invalid key size: 65536."),
    (_rsa_jwk(n=_big(8192 * 2)), "Invalid key size: 131072."),
    (_rsa_jwk(d=_big(65536)), "'d' is too long for this key: 65536 bytes, at most 256"),
    (_rsa_jwk(e=_big(4096)), "'e' is too long for this key: 4096 bytes, at most 8"),
    (_rsa_jwk(dp=_big(4096)), "'dp' is too long"),
    (_rsa_jwk(dq=_big(4096)), "'dq' is too long"),
    (_rsa_jwk(qi=_big(4096)), "'qi' is too long"),
    (
        {"kty": "EC", "crv": "P-256", "d": _b64(_big(4096))},
        "'d' is too long for this key: 4096 bytes, at most 32",
    ),
    (
        {"kty": "EC-HSM", "crv": "P-521", "d": _b64(_big(66)), "x": _b64(_big(8192)), "y": "AQ"},
        "'x' is too long for this key: 8192 bytes, at most 66",
    ),
    ({"kty": "EC", "crv": "P-384", "d": "AQ", "x": "AQ", "y": _b64(_big(49))}, "'y' is too long"),
    ({"kty": "oct", "k": _b64(_big(65536))}, "Invalid kty value: oct"),
]


@pytest.mark.parametrize(("jwk", "message"), HOSTILE_JWKS)
def test_oversized_jwk_is_refused_before_cryptography(raw, unique_key_name, cryptography_calls, jwk, message):
    response = raw.request("PUT", f"/keys/{unique_key_name}", json={"key": jwk})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "BadParameter"
    assert message in error["message"]
    assert cryptography_calls == []
    assert raw.request("GET", f"/keys/{unique_key_name}").status_code == 404


def test_other_clients_are_served_while_a_hostile_import_is_in_flight(
    localvault, raw, unique_key_name, cryptography_calls
):
    body = json.dumps({"key": HOSTILE_JWKS[0][0]}).encode()
    headers = (("Content-Type", "application/json"), ("Content-Length", str(len(body))))
    with _tls(localvault) as hostile:
        hostile.sendall(
            _request(
                "PUT",
                f"/keys/{unique_key_name}?api-version=7.5",
                (*headers, ("Expect", "100-continue")),
                token=_token(localvault),
            )
        )
        assert _head(hostile).startswith(b"HTTP/1.1 100 ")  # the server is inside the hostile request
        assert raw.request("GET", "/keys").status_code == 200  # and serves another client meanwhile
        status, _, reply = _exchange(hostile, body)
    assert status == 400
    assert "'p' is too long" in _vault_error(reply)["message"]
    assert cryptography_calls == []


@pytest.mark.parametrize(("kty", "size"), [("RSA", 3072), ("RSA", 4096), ("EC", "P-384"), ("EC", "P-521")])
def test_well_sized_imports_still_work(raw, unique_key_name, kty, size):
    if kty == "RSA":
        jwk = _rsa_jwk_of(size)
        jwk["n"] = "AAAA" + jwk["n"]  # with leading zero bytes, as some tools send it
    else:
        curve = {"P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[size]
        private = ec.generate_private_key(curve)
        point = private.public_key().public_numbers()
        length = (curve.key_size + 7) // 8
        jwk = {
            "kty": "EC",
            "crv": size,
            "d": _b64(private.private_numbers().private_value, length),
            "x": _b64(point.x, length),
            "y": _b64(point.y, length),
        }
    response = raw.request("PUT", f"/keys/{unique_key_name}", json={"key": jwk})
    assert response.status_code == 200, response.text
    if kty == "RSA":
        assert response.json()["attributes"]["key_size"] == size


@pytest.mark.parametrize(
    "body",
    [
        b'{"kty": "RSA", "key_size": 1' + b"0" * 4000 + b"}",
        b'{"kty": "RSA", "key_size": 1' + b"0" * 5000 + b"}",
        b'{"kty": "RSA", "public_exponent": 1' + b"0" * 4000 + b"}",
        b'{"kty": "RSA", "public_exponent": -1' + b"0" * 4000 + b"}",
        b'{"kty": "RSA", "key_size": 65536}',
        b'{"kty": "RSA", "key_size": 4096, "public_exponent": 4294967297}',
        b'{"kty": "EC", "crv": "' + b"P" * 200_000 + b'"}',
        b"[" * 100_000,
        b'{"a":' * 40_000 + b"1" + b"}" * 40_000,
    ],
)
def test_create_bounds_before_generating(raw, unique_key_name, cryptography_calls, body):
    response = raw.request("POST", f"/keys/{unique_key_name}/create", data=body)
    assert response.status_code == 400, response.text[:300]
    assert error_of(response)["code"] == "BadParameter"
    assert cryptography_calls == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"kty": "RSA", "key_ops": [' + b'"sign",' * 30_000 + b'"x"]}',
        b'{"kty": "RSA", "tags": {' + b", ".join(b'"t%d": "v"' % i for i in range(10_000)) + b"}}",
    ],
)
def test_create_refuses_huge_lists_and_tag_sets(raw, unique_key_name, body):
    # checked by the store after generating, which costs what a valid create costs, no more
    response = raw.request("POST", f"/keys/{unique_key_name}/create", data=body)
    assert response.status_code == 400, response.text[:300]
    assert error_of(response)["code"] == "BadParameter"


@pytest.mark.parametrize("blob", [b"LVKB1" + os.urandom(190_000), os.urandom(190_000)])
def test_restore_of_a_large_forged_blob(raw, blob):
    response = raw.request("POST", "/keys/restore", json={"value": _b64(blob)})
    assert response.status_code == 400
    assert error_of(response)["message"] == "Backup blob contains invalid or corrupt version."


@pytest.mark.parametrize("path", ["/keys", "/deletedkeys", "/keys/some-key/versions"])
@pytest.mark.parametrize("digits", [4301, 60_000])
def test_maxresults_with_thousands_of_digits(raw, path, digits):
    response = raw.request("GET", path, params={"maxresults": "1" * digits})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "BadParameter" and error["message"].startswith("Invalid maxresults: 111")


# -- malformed HTTP on the vault -------------------------------------------------------------------


def test_absolute_form_target_with_a_broken_host(localvault):
    token = _token(localvault)
    with _tls(localvault) as sock:
        status, _, body = _exchange(sock, _request("GET", "http://[/keys?api-version=7.5", token=token))
        assert status == 400
        error = _vault_error(body)
        assert error == {"code": "BadParameter", "message": "The request target is not a valid URL."}
        # the same connection goes on: a valid absolute-form target is served
        status, _, _ = _exchange(sock, _request("GET", "https://127.0.0.1/keys?api-version=7.5", token=token))
        assert status == 200


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("TRACE", "/keys?api-version=7.5"),
        ("CONNECT", "127.0.0.1:443"),
        ("get", "/keys?api-version=7.5"),
        ("FOO", "/keys/k?api-version=7.5"),
        ("FOO", "/nowhere"),
        ("PROPFIND", "*"),
    ],
)
def test_unknown_methods_are_405_in_the_service_format(localvault, method, target):
    with _tls(localvault) as sock:
        status, _, body = _exchange(
            sock, _request(method, target, (("Content-Length", "3"),), b"abc", token=_token(localvault))
        )
        assert status == 405
        assert _vault_error(body) == {
            "code": "MethodNotAllowed",
            "message": f"The requested resource does not support http method '{method}'.",
        }
        # the body was read, not taken for the next request
        status, _, _ = _exchange(sock, _request("GET", "/keys?api-version=7.5", token=_token(localvault)))
        assert status == 200
        # and without a token, the challenge, as for any other method
        status, headers, body = _exchange(sock, _request(method, target))
        assert status == 401 and "WWW-Authenticate" in headers


@pytest.mark.parametrize(
    "request_line",
    [b"GET /keys?api-version=7.5 HTTP/2.0", b"GET /keys?api-version=7.5 HTTP/9.9", b"PRI * HTTP/2.0"],
)
def test_other_http_versions_are_400_never_5xx(localvault, request_line):
    with _tls(localvault) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        status, headers, body = _response(sock)
    assert status == 400 and headers["Connection"] == "close"
    error = _vault_error(body)
    assert error["code"] == "BadParameter" and "HTTP/1.1" in error["message"]
    with _identity(localvault) as sock:
        status, _, body = _exchange(sock, request_line.replace(b"/keys", b"/msi/token") + b"\r\n\r\n")
    assert status == 400 and "HTTP/1.1" in _identity_error(status, body)["message"]


MALFORMED_HEADERS = [
    b"Transfer-Encoding : chunked",
    b"no colon here",
    b": no name",
    b" X-Folded: a",
    b"X-Obs-Fold: a\r\n  b",
]


@pytest.mark.parametrize("line", MALFORMED_HEADERS)
def test_a_malformed_header_line_is_400_and_the_connection_ends(localvault, line):
    """The bytes after a bad line are never taken for headers dropped silently, or for a next request."""
    token = _token(localvault)
    smuggled = _request("DELETE", "/keys/smuggled?api-version=7.5", token=token)
    head = (
        b"POST /keys/k/create?api-version=7.5 HTTP/1.1\r\nHost: x\r\n"
        + line
        + b"\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n".encode()
    )
    for sock, target in ((_tls(localvault), b"/keys/k/create"), (_identity(localvault), b"/msi/token")):
        with sock:
            sock.sendall(head.replace(b"/keys/k/create", target))
            sock.sendall(b"5\r\n" + smuggled)
            reply = _until_eof(sock)
        assert reply.count(b"HTTP/1.1 ") == 1, reply
        assert reply.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in reply
        assert b"malformed" in reply


FRAMING = [
    (("Transfer-Encoding", "gzip"), ("Content-Length", "{length}")),
    (("Transfer-Encoding", "gzip"),),
    (("Transfer-Encoding", "chunked"),),
    (("Transfer-Encoding", "gzip, chunked"),),
    (("Transfer-Encoding", "identity"), ("Content-Length", "{length}")),
    (("Content-Length", "{length}"), ("Content-Length", "0")),
    (("Content-Length", "-5"),),
    (("Content-Length", "1" * 5000),),
    (("Content-Length", "99999999999999999999"),),
    (("Content-Length", "{length}, {length}"),),
]


@pytest.mark.parametrize("framing", FRAMING)
def test_untrusted_framing_is_400_and_the_connection_ends(localvault, framing):
    """A body whose end cannot be trusted is never parsed as a second request."""
    token = _token(localvault)
    smuggled = _request("DELETE", "/keys/smuggled?api-version=7.5", token=token)
    headers = tuple((name, value.format(length=len(smuggled))) for name, value in framing)
    with _tls(localvault) as sock:
        sock.sendall(_request("POST", "/keys/k/create?api-version=7.5", headers, smuggled, token=token))
        reply = _until_eof(sock)  # the server closes the connection after one answer
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in rest
    error = _vault_error(rest.split(b"\r\n\r\n", 1)[1])
    assert error["code"] == "BadParameter" and "Transfer-Encoding" in error["message"]


def test_expect_continue_refuses_an_oversized_body_before_it_is_sent(localvault, raw):
    with _tls(localvault) as sock:
        sock.sendall(
            _request(
                "POST",
                "/keys/k/create?api-version=7.5",
                (("Content-Length", str(300 * 1024)), ("Expect", "100-continue")),
                token=_token(localvault),
            )
        )
        status, headers, body = _response(sock)
    assert status == 413 and headers["Connection"] == "close"
    assert _vault_error(body)["code"] == "RequestEntityTooLarge"
    assert raw.request("GET", "/keys").status_code == 200


MALFORMED = [
    b"GET /keys?api-version=7.5 HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /keys?api-version=7.5 HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n",
    b"GET /keys?api-version=7.5 HTTP/1.1\r\nX-Long: " + b"v" * 70_000 + b"\r\n\r\n",
    b"GET /" + b"k" * 70_000 + b" HTTP/1.1\r\n\r\n",
    b"GET /keys?api-version=7.5 HTTP/1.1 extra\r\n\r\n",
    b"GET /keys?api-version=7.5 HTTP/x.y\r\n\r\n",
    b"GET /keys?api-version=7.5 HTTP/1.1.1\r\n\r\n",
    b"GET /keys?api-version=7.5 FTP/1.0\r\n\r\n",
    b"POST /keys\r\n\r\n",
    b"GET http://127.0.0.1:99999999999/keys HTTP/1.1\r\n\r\n",
    b"GET http://[::1/keys HTTP/1.1\r\n\r\n",
    b"GET http://\xef\xbc\x8f@x/keys HTTP/1.1\r\n\r\n",
    b"GET /keys?api-version=7.5&maxresults=\x00 HTTP/1.1\r\n\r\n",
    b"GET /keys/\x00\x01\x7f?api-version=7.5 HTTP/1.1\r\n\r\n",
    b"GET /keys?api-version=7.5 HTTP/1.1\r\nAuthorization: Bearer \xff\xfe.\xc3\xa9.x\r\n\r\n",
    b"GET /keys?api-version=7.5 HTTP/1.1\r\nAuthorization: \r\n\r\n",
    b"GET /keys?api-version=7.5 HTTP/1.1\nHost: lf-only\n\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED)
def test_malformed_http_gets_4xx_on_both_endpoints(localvault, request_bytes):
    with _tls(localvault) as sock:
        status, _, body = _exchange(sock, request_bytes)
    assert 400 <= status < 500, body
    _vault_error(body)
    with _identity(localvault) as sock:
        status, _, body = _exchange(sock, request_bytes.replace(b"/keys", b"/msi/token"))
    assert 400 <= status < 500, body
    _identity_error(status, body)
    _still_serving(localvault)
    assert localvault.credential().get_token(VAULT_SCOPE).token


# -- the identity endpoint -------------------------------------------------------------------------


TOKEN_TARGET = "/msi/token?api-version=2019-08-01&resource=https://vault.azure.net"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_request("GET", TOKEN_TARGET) + b"", 401),
        (b"GET " + TOKEN_TARGET.encode() + b" HTTP/1.1\r\nX-IDENTITY-HEADER: \xc3\xa9t\xe9\xff\r\n\r\n", 401),
        (_request("GET", "http://[/msi/token"), 400),
        (_request("GET", "http://[" + TOKEN_TARGET), 400),
        (
            _request("POST", TOKEN_TARGET, (("Transfer-Encoding", "chunked"),), b"5\r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        (
            _request("POST", TOKEN_TARGET, (("Transfer-Encoding", "gzip"), ("Content-Length", "4")), b"abcd"),
            400,
        ),
        (_request("POST", TOKEN_TARGET, (("Content-Length", "-1"),)), 400),
        (_request("POST", TOKEN_TARGET, (("Content-Length", "x"),)), 400),
        (_request("POST", TOKEN_TARGET, (("Content-Length", str(300_000)),), b"a" * 300_000), 413),
        (_request("POST", TOKEN_TARGET, (("Content-Length", "3"),), b"abc"), 405),
        (_request("TRACE", TOKEN_TARGET), 405),
        (_request("get", TOKEN_TARGET), 405),
        (b"GET " + TOKEN_TARGET.encode() + b" HTTP/2.0\r\n\r\n", 400),
    ],
)
def test_identity_endpoint_answers_hostile_requests_in_its_format(localvault, request_bytes, status):
    with _identity(localvault) as sock:
        answered, headers, body = _exchange(sock, request_bytes)
    assert answered == status
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    _identity_error(status, body)
    assert localvault.credential().get_token(VAULT_SCOPE).token  # and it keeps serving


def test_identity_get_body_is_not_taken_for_a_second_request(localvault):
    secret = localvault.environ()["IDENTITY_HEADER"]
    smuggled = _request("GET", TOKEN_TARGET, (("X-IDENTITY-HEADER", secret),))
    with _identity(localvault) as sock:
        first = _request(
            "GET", "/nowhere", (("Content-Length", str(len(smuggled))), ("Connection", "close")), smuggled
        )
        sock.sendall(first)
        reply = _until_eof(sock)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 404 ")


# -- slow, idle and too many connections -------------------------------------------------------------


def _trickle(sock: ssl.SSLSocket, byte: bytes) -> bytes:
    """Send one byte every 0.1 s until the server answers or closes; at most a minute of it."""
    sock.settimeout(0.1)
    for _ in range(600):
        try:
            return sock.recv(65536)
        except socket.timeout:
            sock.sendall(byte)
    raise AssertionError("the server let a trickling client hold its connection for a minute")


@pytest.mark.parametrize("part", ["request line", "headers", "body"])
def test_a_trickling_client_is_cut_off_with_408(localvault, monkeypatch, part):
    start = {
        "request line": b"GET /keys?api-version=7.5&x=",
        "headers": b"GET /keys?api-version=7.5 HTTP/1.1\r\nX-Slow: ",
        "body": _request("PUT", "/keys/k?api-version=7.5", (("Content-Length", "100000"),)),
    }[part]
    with _tls(localvault) as sock:
        # after the handshake, which the short deadline would otherwise bound on a loaded machine
        monkeypatch.setattr(http11, "REQUEST_TIMEOUT", 0.5)
        sock.sendall(start)
        reply = _trickle(sock, b"a")
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert _vault_error(reply.split(b"\r\n\r\n", 1)[1])["code"] == "RequestTimeout"
    monkeypatch.undo()
    _still_serving(localvault)


def test_a_trickling_client_of_the_identity_endpoint_is_cut_off(localvault, monkeypatch):
    monkeypatch.setattr(http11, "REQUEST_TIMEOUT", 0.5)
    with _identity(localvault) as sock:
        sock.sendall(b"GET /msi/token HTTP/1.1\r\nX-Slow: ")
        sock.settimeout(0.1)
        for _ in range(600):
            try:
                reply = sock.recv(65536)
                break
            except socket.timeout:
                sock.sendall(b"a")
        else:
            raise AssertionError("the identity endpoint let a trickling client hold it for a minute")
    assert reply.startswith(b"HTTP/1.1 408 ")
    _identity_error(408, reply.split(b"\r\n\r\n", 1)[1])


def test_an_idle_connection_is_closed_without_an_answer(localvault, monkeypatch):
    monkeypatch.setattr(http11, "IDLE_TIMEOUT", 0.3)
    with _tls(localvault) as sock:
        assert _until_eof(sock) == b""
    monkeypatch.undo()
    _still_serving(localvault)


def test_a_stalled_tls_handshake_is_closed(localvault, monkeypatch):
    monkeypatch.setattr(http11, "REQUEST_TIMEOUT", 0.3)
    with socket.create_connection(("127.0.0.1", localvault.port), timeout=30) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
        try:
            reply = _until_eof(sock)
        except ConnectionResetError:
            reply = b""
    assert reply == b""


def _continue(vault: LocalVault, name: str, body: bytes) -> ssl.SSLSocket:
    """A connection inside a create request: headers sent and 100 Continue received, body held back."""
    sock = _tls(vault)
    sock.sendall(
        _request(
            "POST",
            f"/keys/{name}/create?api-version=7.5",
            (("Content-Length", str(len(body))), ("Expect", "100-continue")),
            token=_token(vault),
        )
    )
    assert _head(sock).startswith(b"HTTP/1.1 100 ")
    return sock


def test_connections_beyond_the_cap_are_closed_and_busy_ones_finish():
    body = b'{"kty": "EC"}'
    with LocalVault(max_connections=2) as vault:
        busy = [_continue(vault, f"busy-{i}", body) for i in range(2)]
        try:
            with pytest.raises(OSError):  # closed before the TLS handshake: no thread, no answer
                _tls(vault).close()
            for sock in busy:
                status, _, _ = _exchange(sock, body)
                assert status == 200
        finally:
            for sock in busy:
                sock.close()
        assert vault.wait_idle()
        _still_serving(vault)


def test_idle_connections_make_room_for_new_ones():
    with LocalVault(max_connections=2) as vault:
        token = _token(vault)
        get = _request("GET", "/keys?api-version=7.5", token=token)
        idle = [_tls(vault) for _ in range(2)]
        try:
            for sock in idle:
                assert _exchange(sock, get)[0] == 200
            assert vault.wait_idle()  # both wait for their next request
            with _tls(vault) as newcomer:
                assert _exchange(newcomer, get)[0] == 200
            outcomes = []
            for sock in idle:
                try:
                    outcomes.append("served" if _exchange(sock, get)[0] == 200 else "other")
                except (OSError, http.client.HTTPException):
                    outcomes.append("closed")
            assert sorted(outcomes) == ["closed", "served"]
        finally:
            for sock in idle:
                sock.close()


def test_max_connections_must_be_positive():
    with pytest.raises(ValueError):
        LocalVault(max_connections=0)


# -- nothing secret in the log -----------------------------------------------------------------------


def test_debug_log_holds_no_token_secret_or_key_material(localvault, raw, caplog, unique_key_name):
    caplog.set_level(logging.DEBUG, logger="localvault")
    token = raw.session.headers["Authorization"].split()[1]
    secret = localvault.environ()["IDENTITY_HEADER"]
    jwk = _rsa_jwk_of(2048)
    assert raw.request("PUT", f"/keys/{unique_key_name}", json={"key": jwk}).status_code == 200
    refused = dict(jwk, q=_b64(_big(4096)))  # its d and p are the key's own
    assert raw.request("PUT", f"/keys/{unique_key_name}-x", json={"key": refused}).status_code == 400
    backup = raw.request("POST", f"/keys/{unique_key_name}/backup").json()["value"]
    assert raw.request("POST", "/keys/restore", json={"value": backup}).status_code == 409
    assert raw.request("GET", "/keys", params={"access_token": token}).status_code == 200
    assert localvault.credential().get_token(VAULT_SCOPE).token
    with _identity(localvault) as sock:
        _exchange(sock, _request("GET", f"{TOKEN_TARGET}&secret={secret}", (("X-IDENTITY-HEADER", secret),)))
    with _tls(localvault) as sock:
        _exchange(sock, b"GET /keys/\x1b[2J\x1b[31m?api-version=7.5 HTTP/1.1\r\n\r\n")

    records = [r for r in caplog.records if r.name.startswith("localvault")]
    text = "\n".join(logging.Formatter().format(r) for r in records)
    assert f"/keys/{unique_key_name}" in text  # requests are logged
    assert "\x1b" not in text and "\\x1b[2J" in text  # control characters escaped
    assert token not in text and token.split(".")[2] not in text
    for name in ("d", "p", "q", "dp", "dq", "qi"):
        assert jwk[name] not in text, name
    assert backup[:40] not in text
    # the identity secret is the client's own query here; its header never appears
    assert text.count(secret) <= 1 and "X-IDENTITY-HEADER" not in text


def test_log_text_is_cut_before_masking_and_no_token_survives():
    line = http11.printable("GET /keys/" + "eyJ" * 22_000 + " HTTP/1.1")
    assert len(line) < http11.MAX_LOGGED + 32 and "eyJ" not in line
    assert "more)" in line  # says it was cut


def test_debug_log_hides_percent_encoded_tokens_and_secrets_in_urls(localvault, raw, caplog):
    caplog.set_level(logging.DEBUG, logger="localvault")
    token = raw.session.headers["Authorization"].split()[1]
    encoded = token.replace(".", "%2E")
    identity = localvault.environ()["IDENTITY_HEADER"]
    for target in (
        f"/keys?api-version=7.5&access_token={encoded}",
        f"/keys?api-version=7.5&secret=hunter2-{identity[:6]}&next=1",
        f"/keys/{identity}?api-version=7.5",
    ):
        with _tls(localvault) as sock:
            _exchange(sock, _request("GET", target, token=token))
    with _identity(localvault) as sock:
        _exchange(sock, _request("GET", f"{TOKEN_TARGET}&x={identity}"))

    text = "\n".join(logging.Formatter().format(r) for r in caplog.records if r.name.startswith("localvault"))
    assert "/keys?api-version=7.5&access_token=<token>" in text  # logged, hidden
    assert "secret=<secret>&next=1" in text and "hunter2" not in text
    assert identity not in text and "/keys/<secret>?" in text
    for part in token.split("."):
        assert part not in text


# -- --env-file --------------------------------------------------------------------------------------


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("KEY_VAULT_URL", "LOCALVAULT_CA_FILE")}
    env = {k: v for k, v in env.items() if not k.startswith(("IDENTITY_", "AZURE_", "MSI_"))}
    env["PYTHONPATH"] = ROOT
    return env


def test_env_file_is_written_0600_and_the_secret_stays_off_stdout(tmp_path):
    path = tmp_path / "localvault.env"
    path.write_text("old, world-readable\n")
    path.chmod(0o644)
    # under the most permissive umask, which must change nothing
    command = ["sh", "-c", 'umask 000 && exec "$@"', "sh", sys.executable, "-m", "localvault"]
    process = subprocess.Popen(
        [*command, "--port", "0", "--env-file", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        printed = []
        for line in process.stdout:
            printed.append(line)
            if line.strip() == READY:
                break
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        exports = read_exports(path.read_text().splitlines())
        assert set(exports) == set(EXPORTED_NAMES)
        assert exports["IDENTITY_HEADER"] not in "".join(printed)
        assert not any(line.startswith("export ") for line in printed)
        assert any(str(path) in line and "0600" in line for line in printed)
        assert [p.name for p in tmp_path.iterdir()] == ["localvault.env"]  # no temporary file left
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err


def test_env_file_content_is_never_in_a_readable_file(tmp_path, monkeypatch):
    """The lines exist only in a file created 0600, which then takes the path's place."""
    seen = []
    real_replace = os.replace

    def replace(source, target):
        with open(source) as file:
            seen.append((stat.S_IMODE(os.stat(source).st_mode), file.read()))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    old = os.umask(0)
    try:
        cli.write_private(str(tmp_path / "env"), ["export IDENTITY_HEADER=secret"])
    finally:
        os.umask(old)
    assert seen == [(0o600, "export IDENTITY_HEADER=secret\n")]
    assert stat.S_IMODE((tmp_path / "env").stat().st_mode) == 0o600


def test_env_file_symlink_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    link = tmp_path / "env"
    link.symlink_to(target)
    cli.write_private(str(link), ["export A=1"])
    assert target.read_text() == "untouched\n"
    assert not link.is_symlink() and link.read_text() == "export A=1\n"


def test_unwritable_env_file_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "localvault", "--port", "0", "--env-file", str(tmp_path / "no" / "env")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--env-file" in lines[0] and "directory you can write" in lines[0]
    assert "IDENTITY_HEADER" not in result.stdout


def test_help_says_why_env_file_exists(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--env-file PATH" in text and "0600" in text and "IDENTITY_HEADER" in text
    assert "readable by every local user" in text
