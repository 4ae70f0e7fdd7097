"""The connection layer: a server that serves connections handed to it, admission under pressure,
deadlines on every part of a request and of its answer."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
from typing import List, Tuple
from urllib.parse import urlsplit

from localvault import LocalVault, http11
from localvault.server import IdentityServer, VaultServer

VAULT_SCOPE = "https://vault.azure.net/.default"


def _response(sock: socket.socket, method: str = "GET") -> Tuple[int, dict, bytes]:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return response.status, dict(response.getheaders()), response.read()


def _response_of(sock: socket.socket, data: bytes) -> Tuple[int, dict, bytes]:
    sock.sendall(data)
    return _response(sock)


def test_an_unbound_vault_server_serves_a_connection_handed_to_it(localvault: LocalVault, unique_key_name):
    bound = localvault._vault_server
    assert bound is not None
    unbound = VaultServer(("127.0.0.1", 0), bound.context, localvault.store, localvault.issuer, bind=False)
    unbound.controls, unbound.base_url = localvault.controls, bound.base_url
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the proxy accepts; the server serves
        ours = socket.create_connection(listener.getsockname(), timeout=30)
        theirs, _ = listener.accept()
    serving = threading.Thread(target=unbound.finish_request, args=(theirs, ("127.0.0.1", 0)))
    serving.start()
    try:
        client = ssl.create_default_context(cafile=localvault.ca_file).wrap_socket(
            ours, server_hostname="127.0.0.1"
        )
        token = localvault.credential().get_token(VAULT_SCOPE).token
        for _ in range(2):  # one connection, kept alive across requests
            client.sendall(
                (
                    f"GET /keys/{unique_key_name}?api-version=7.5 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {token}\r\n\r\n"
                ).encode()
            )
            status, _, body = _response(client)
            assert status == 404
            assert json.loads(body)["error"]["code"] == "KeyNotFound"
        client.close()
        serving.join(30)
        assert not serving.is_alive()
        assert unbound.is_idle()  # it listens nowhere: only its connections count
    finally:
        unbound.server_close()


# -- helpers ----------------------------------------------------------------------------------------


def _tls(vault: LocalVault, rcvbuf: int = 0) -> ssl.SSLSocket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", vault.port))
    return ssl.create_default_context(cafile=vault.ca_file).wrap_socket(sock, server_hostname="127.0.0.1")


def _identity(vault: LocalVault) -> socket.socket:
    return socket.create_connection(("127.0.0.1", urlsplit(vault.identity_endpoint).port), timeout=30)


def _get(token: str, target: str = "/keys?api-version=7.5") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def _identity_get(vault: LocalVault) -> bytes:
    secret = vault.environ()["IDENTITY_HEADER"]
    return (
        "GET /msi/token?api-version=2019-08-01&resource=https://vault.azure.net HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nX-IDENTITY-HEADER: {secret}\r\n\r\n"
    ).encode()


# -- admission ----------------------------------------------------------------------------------------


def test_unfinished_heads_never_lock_out_a_client_with_a_whole_request():
    with LocalVault(max_connections=4) as vault:
        token = vault.credential().get_token(VAULT_SCOPE).token
        ports = [
            (
                lambda: _tls(vault),
                b"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
                _get(token),
            ),
            (lambda: _identity(vault), b"GET /msi/token HTTP/1.1\r\nX-Slow: ", _identity_get(vault)),
        ]
        loris = []
        try:
            for connect, unfinished, whole in ports:
                for _ in range(8):  # twice the cap, each sending a head that never ends
                    sock = connect()
                    sock.sendall(unfinished)
                    loris.append(sock)
                for _ in range(3):
                    with connect() as fresh:
                        assert _response_of(fresh, whole)[0] == 200
        finally:
            for sock in loris:
                sock.close()


def test_a_stalled_handshake_is_idle_and_makes_room():
    with LocalVault(max_connections=2) as vault:
        token = vault.credential().get_token(VAULT_SCOPE).token
        stalled = [socket.create_connection(("127.0.0.1", vault.port), timeout=30) for _ in range(4)]
        try:
            with _tls(vault) as fresh:
                assert _response_of(fresh, _get(token))[0] == 200
        finally:
            for sock in stalled:
                sock.close()


def test_both_ports_queue_128_connections_before_accepting_any(localvault: LocalVault):
    bound = localvault._vault_server
    assert bound is not None
    servers = [
        VaultServer(("127.0.0.1", 0), bound.context, localvault.store, localvault.issuer),
        IdentityServer(("127.0.0.1", 0), localvault.issuer, "secret"),
    ]
    queued: List[socket.socket] = []
    try:
        for server in servers:  # listening, never accepting: only the kernel's queue holds them
            for _ in range(128):
                sock = socket.socket()
                queued.append(sock)
                sock.settimeout(10)  # past a full queue, a connect is dropped and times out
                sock.connect(server.server_address)
    finally:
        for sock in queued:
            sock.close()
        for server in servers:
            server.server_close()


# -- deadlines ----------------------------------------------------------------------------------------


def test_a_partial_request_sent_behind_a_whole_one_is_cut_off_with_408(monkeypatch):
    with LocalVault() as vault:
        token = vault.credential().get_token(VAULT_SCOPE).token
        with _tls(vault) as sock:
            # after the handshake, which the short deadline would otherwise bound on a loaded machine
            monkeypatch.setattr(http11, "REQUEST_TIMEOUT", 0.3)
            sock.sendall(_get(token) + b"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert _response(sock)[0] == 200
            status, headers, body = _response(sock)  # the rest never comes
        assert status == 408 and headers["Connection"] == "close"
        assert json.loads(body)["error"]["code"] == "RequestTimeout"
        with _identity(vault) as sock:
            sock.sendall(_identity_get(vault) + b"GET /msi/token HTTP/1.1\r\n")
            assert _response(sock)[0] == 200
            assert _response(sock)[0] == 408


def test_a_client_that_reads_too_slowly_is_cut_off(monkeypatch):
    monkeypatch.setattr(http11, "SEND_TIMEOUT", 0.5)
    with LocalVault() as vault:
        client = vault.key_client()
        tags = {f"{i:02d}" + "n" * 510: "v" * 256 for i in range(15)}
        for i in range(25):  # a page of keys is about 290 KB of tags
            client.create_ec_key(f"slow-read-{i}", tags=tags)
        token = vault.credential().get_token(VAULT_SCOPE).token
        pages = 60  # 17 MB of answers, far beyond both sockets' buffers; the requests fit in them
        with _tls(vault, rcvbuf=4096) as sock:
            sock.sendall(_get(token, "/keys?api-version=7.5&maxresults=25") * pages)
            # every request is in the server's buffers: the connection is idle only once it has ended
            assert vault.wait_idle(timeout=60)
            received = 0
            with contextlib.suppress(OSError):
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
        assert 0 < received < pages * 25 * 15 * (512 + 256)
