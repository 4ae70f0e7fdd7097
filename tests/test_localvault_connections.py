"""The connection layer: a server that serves connections handed to it, admission under pressure,
deadlines on every part of a request and of its answer."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from typing import Tuple

from localvault import LocalVault
from localvault.server import VaultServer

VAULT_SCOPE = "https://vault.azure.net/.default"


def _response(sock: socket.socket, method: str = "GET") -> Tuple[int, dict, bytes]:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return response.status, dict(response.getheaders()), response.read()


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
    finally:
        unbound.server_close()
