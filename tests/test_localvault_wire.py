"""What localvault puts on the wire: paging, headers, status codes and error bodies, below the SDK."""

from __future__ import annotations

import json
import socket
import ssl

import pytest
from helpers import API_VERSION, error_of

SERVICE_HEADERS = (
    "Cache-Control",
    "Pragma",
    "Expires",
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "x-ms-keyvault-service-version",
    "x-ms-keyvault-region",
)


def _create(raw, name, **body):
    response = raw.request("POST", f"/keys/{name}/create", json={"kty": "EC", **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_key_bundle_shape_and_headers(raw, unique_key_name):
    response = raw.request("POST", f"/keys/{unique_key_name}/create", json={"kty": "RSA", "key_size": 2048})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    for header in SERVICE_HEADERS:
        assert header in response.headers
    body = response.json()
    assert set(body) == {"key", "attributes"}
    assert set(body["key"]) == {"kid", "kty", "key_ops", "n", "e"}
    attributes = body["attributes"]
    assert attributes["enabled"] is True
    assert isinstance(attributes["created"], int) and attributes["created"] == attributes["updated"]
    assert attributes["recoveryLevel"] == "Recoverable+Purgeable"
    assert attributes["recoverableDays"] == 90
    assert attributes["exportable"] is False
    assert attributes["hsmPlatform"] == "0"
    assert attributes["key_size"] == 2048


def test_both_latest_forms(raw, unique_key_name):
    kid = _create(raw, unique_key_name)["key"]["kid"]
    assert raw.request("GET", f"/keys/{unique_key_name}/").json()["key"]["kid"] == kid
    assert raw.request("GET", f"/keys/{unique_key_name}").json()["key"]["kid"] == kid


@pytest.mark.parametrize("path", ["/keys", "/keys/{name}/versions", "/deletedkeys"])
def test_paging_across_pages(raw, localvault, unique_key_name, path):
    names = [f"{unique_key_name}-{i:02d}" for i in range(7)]
    if path == "/keys/{name}/versions":
        for _ in range(7):
            _create(raw, unique_key_name)
    else:
        for name in names:
            _create(raw, name)
            if path == "/deletedkeys":
                assert raw.request("DELETE", f"/keys/{name}").status_code == 200
    url = localvault.url + path.format(name=unique_key_name)
    seen, pages = [], 0
    response = raw.request("GET", path.format(name=unique_key_name), params={"maxresults": "3"})
    while True:
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        assert set(page) == {"value", "nextLink"}
        assert len(page["value"]) <= 3
        for item in page["value"]:
            assert "key" not in item and "n" not in item  # no key material in lists
            assert set(item["attributes"]) >= {"enabled", "created", "updated", "recoveryLevel"}
            seen.append(item["kid"])
        if page["nextLink"] is None:
            break
        assert page["nextLink"].startswith(url + "?")
        assert f"api-version={API_VERSION}" in page["nextLink"]
        assert "maxresults=3" in page["nextLink"]
        response = raw.session.get(page["nextLink"], timeout=30, verify=localvault.ca_file)
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7
    if path == "/deletedkeys":
        assert all("recoveryId" in item for item in page["value"])


def test_versions_listed_by_version_id(raw, unique_key_name):
    for _ in range(5):
        _create(raw, unique_key_name)
    items = raw.request("GET", f"/keys/{unique_key_name}/versions").json()["value"]
    versions = [item["kid"].rsplit("/", 1)[1] for item in items]
    assert versions == sorted(versions) and len(versions) == 5


def test_list_items_carry_tags(raw, unique_key_name):
    _create(raw, unique_key_name, tags={"k": "v"})
    items = raw.request("GET", "/keys").json()["value"]
    item = next(i for i in items if i["kid"].endswith(f"/keys/{unique_key_name}"))
    assert item["tags"] == {"k": "v"}


@pytest.mark.parametrize("maxresults", ["0", "26", "-1", "abc", "", "\u00b2", "\u0663"])
def test_maxresults_out_of_range(raw, maxresults):
    response = raw.request("GET", "/keys", params={"maxresults": maxresults})
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


@pytest.mark.parametrize("token", ["!!not-a-token", "W1tbW1tb", "eyJOZXh0TWFya2VyIjogNX0", "WwAAAA" * 600])
def test_bad_skiptoken(raw, token):
    import base64

    if token.startswith("WwAAAA"):  # deeply nested JSON
        token = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")
    response = raw.request("GET", "/keys", params={"$skiptoken": token})
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


# Every published version a current SDK or the Azure CLI sends (az pins 7.6-preview.2).
PUBLISHED_API_VERSIONS = (
    "2016-10-01", "7.0", "7.1-preview", "7.1", "7.2-preview", "7.2", "7.3-preview", "7.3", "7.4-preview.1",
    "7.4", "7.5-preview.1", "7.5", "7.6-preview.1", "7.6-preview.2", "7.6", "2025-06-01-preview", "2025-07-01",
)  # fmt: skip


def test_api_versions(raw, unique_key_name):
    for version in PUBLISHED_API_VERSIONS:
        assert raw.request("GET", "/keys", api_version=version).status_code == 200, version
    for version in ("7.7", "7.6-preview.3", "7.4-preview", "2025-07-02", "7.6 ", "v7.6"):
        refused = raw.request("GET", "/keys", api_version=version)
        assert refused.status_code == 400 and error_of(refused)["code"] == "BadParameter", version
    missing = raw.request("GET", "/keys", api_version=None)
    assert missing.status_code == 400
    assert error_of(missing)["code"] == "BadParameter"
    unknown = raw.request("GET", "/keys", api_version="2099-01-01")
    assert unknown.status_code == 400
    assert error_of(unknown)["message"] == (
        "The specified version (2099-01-01) is not recognized. "
        "Consider using the latest supported version (2025-07-01)."
    )


def test_unknown_path_and_wrong_method(raw, unique_key_name):
    response = raw.request("GET", "/secrets/x")
    assert response.status_code == 404
    assert error_of(response)["code"] == "NotFound"
    response = raw.request("POST", f"/keys/{unique_key_name}")
    assert response.status_code == 405
    assert error_of(response)["code"] == "MethodNotAllowed"
    response = raw.request("DELETE", "/keys")
    assert response.status_code == 405


def test_purge_is_204_without_body(raw, unique_key_name):
    _create(raw, unique_key_name)
    raw.request("DELETE", f"/keys/{unique_key_name}")
    response = raw.request("DELETE", f"/deletedkeys/{unique_key_name}")
    assert response.status_code == 204
    assert response.content == b""
    assert "Content-Type" not in response.headers
    assert "Content-Length" not in response.headers  # RFC 9110: none on a 204
    assert raw.request("GET", "/keys").status_code == 200  # and the connection stays usable


def test_ids_name_the_vault_whatever_the_host_header(raw, unique_key_name):
    body = raw.request(
        "POST", f"/keys/{unique_key_name}/create", json={"kty": "EC"}, headers={"Host": "evil.example:1"}
    ).json()
    assert body["key"]["kid"].startswith(f"{raw.vault.url}/keys/{unique_key_name}/")


def test_unauthenticated_request_gets_the_challenge_before_body_checks(localvault):
    import requests

    for body in (b"x" * 300_000, b"{not json"):
        response = requests.post(
            f"{localvault.url}/keys/k/create",
            params={"api-version": "7.5"},
            data=body,
            verify=localvault.ca_file,
            timeout=30,
        )
        assert response.status_code == 401
        assert "WWW-Authenticate" in response.headers


def test_deleted_key_bundle(raw, unique_key_name):
    created = _create(raw, unique_key_name)
    body = raw.request("DELETE", f"/keys/{unique_key_name}").json()
    assert body["recoveryId"] == f"{raw.vault.url}/deletedkeys/{unique_key_name}"
    assert body["scheduledPurgeDate"] - body["deletedDate"] == 90 * 86400
    assert body["key"] == created["key"]


MALFORMED = [
    ("POST", "/keys/{name}/create", b"{not json"),
    ("POST", "/keys/{name}/create", b"[1, 2, 3]"),
    ("POST", "/keys/{name}/create", b"\xff\xfe\x00garbage"),
    ("POST", "/keys/{name}/create", b""),
    ("POST", "/keys/{name}/create", b"{}"),
    ("POST", "/keys/{name}/create", b'{"kty": 5}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "key_size": "big"}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "key_size": true}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "key_size": 1e400}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "key_ops": "sign"}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "key_ops": [1]}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "attributes": []}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "attributes": {"enabled": "yes"}}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "attributes": {"exp": 1.5}}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "tags": {"a": 1}}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "tags": "a"}'),
    ("POST", "/keys/{name}/create", b'{"kty": "EC", "crv": ["P-256"]}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "release_policy": {"data": "x"}}'),
    ("POST", "/keys/{name}/create", b'{"kty": "RSA", "attributes": {"exportable": true}}'),
    ("PUT", "/keys/{name}", b'{"key": "x"}'),
    (
        "PUT",
        "/keys/{name}",
        b'{"key": {"kty": "RSA", "n": "%%%", "e": "AQAB", "d": "AQ", "p": "AQ", "q": "AQ"}}',
    ),
    ("PUT", "/keys/{name}", b'{"key": {"kty": "RSA", "n": 5, "e": "AQAB", "d": "AQ", "p": "AQ", "q": "AQ"}}'),
    ("PUT", "/keys/{name}", b'{"key": {"kty": "EC", "crv": "P-256", "d": ""}}'),
    ("PUT", "/keys/{name}", b'{"key": {"kty": "EC", "crv": "P-256", "d": "AQ", "x": "AQ", "y": "AQ"}}'),
    ("PUT", "/keys/{name}", b'{"key": {"kty": "RSA-HSM", "key_hsm": "AQ"}}'),
    ("PUT", "/keys/{name}", b'{"key": {"kty": "RSA"}, "Hsm": "yes"}'),
    ("PUT", "/keys/{name}", b'{"key": {"kty": {"Hsm": 1}}}'),
    ("PUT", "/keys/{name}", b'{"key": {"kty": "EC", "crv": ["P-256"], "d": "AQ"}}'),
    ("PUT", "/keys/{name}", b'{"key": {"kty": "RSA", "y": [""], "d": "AQ"}}'),
    ("PATCH", "/keys/{name}/", b'{"attributes": {"nbf": "soon"}}'),
    ("POST", "/keys/restore", b'{"value": 12}'),
    ("POST", "/keys/restore", b'{"value": "***"}'),
    ("POST", "/keys/restore", b"{}"),
    ("POST", "/keys/{name}/create", b"[" * 5000),
    ("GET", "/keys/{name}/%00", b""),
    ("GET", "/keys/%2e%2e/%2e%2e/etc", b""),
    ("GET", "/keys/" + "a" * 5000, b""),
]


@pytest.mark.parametrize(("method", "path", "body"), MALFORMED)
def test_malformed_requests_get_4xx_in_service_format(raw, unique_key_name, method, path, body):
    if method == "PATCH":
        _create(raw, unique_key_name)
    response = raw.request(
        method, path.format(name=unique_key_name), data=body, headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert error_of(response)["code"]
    # and the server keeps serving
    assert raw.request("GET", "/keys").status_code == 200


def test_oversized_body_is_413(raw, unique_key_name):
    body = json.dumps({"kty": "RSA", "tags": {"a": "x" * 300_000}})
    response = raw.request("POST", f"/keys/{unique_key_name}/create", data=body)
    assert response.status_code == 413
    assert raw.request("GET", "/keys").status_code == 200


def _raw_tls(localvault) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=localvault.ca_file)
    sock = socket.create_connection(("127.0.0.1", localvault.port), timeout=30)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /keys HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /keys HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a.b.c\r\n\r\n",
        b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n",
    ],
)
def test_garbage_on_the_socket(localvault, raw, request_bytes):
    with _raw_tls(localvault) as sock:
        sock.sendall(request_bytes)
        reply = sock.recv(65536)
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500
    assert raw.request("GET", "/keys").status_code == 200


def test_plain_http_is_not_served(localvault, raw):
    with socket.create_connection(("127.0.0.1", localvault.port), timeout=30) as sock:
        sock.sendall(b"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            reply = sock.recv(1024)
        except ConnectionResetError:
            reply = b""
    assert b"HTTP/1.1 200" not in reply and b"keys" not in reply
    assert raw.request("GET", "/keys").status_code == 200


def _random_value(rng, depth=0):
    choices = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.random() * 1e6,
        lambda: rng.choice(["RSA", "EC", "oct", "RSA-HSM", "P-256", "sign", "", "AQAB", "\u0000", "x" * 300]),
    ]
    if depth < 3:
        choices.append(lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))])
        choices.append(lambda: _random_object(rng, depth + 1))
    return rng.choice(choices)()


FIELDS = [
    "kty",
    "key_size",
    "public_exponent",
    "crv",
    "key_ops",
    "attributes",
    "tags",
    "key",
    "Hsm",
    "value",
    "enabled",
    "nbf",
    "exp",
    "n",
    "e",
    "d",
    "p",
    "q",
    "x",
    "y",
    "release_policy",
    "exportable",
]


def _random_object(rng, depth=0):
    return {rng.choice(FIELDS): _random_value(rng, depth) for _ in range(rng.randint(0, 5))}


def test_random_bodies_never_crash_the_server(raw, unique_key_name):
    import random

    rng = random.Random(20261128)  # fixed seed: the same requests every run
    _create(raw, unique_key_name)
    targets = [
        ("POST", f"/keys/{unique_key_name}-new/create"),
        ("PUT", f"/keys/{unique_key_name}-imp"),
        ("PATCH", f"/keys/{unique_key_name}/"),
        ("POST", "/keys/restore"),
    ]
    statuses = set()
    for _ in range(300):
        method, path = rng.choice(targets)
        body = _random_object(rng)
        response = raw.request(method, path, data=json.dumps(body))
        assert response.status_code < 500, (method, path, body, response.text)
        if response.status_code >= 400:
            error_of(response)
        statuses.add(response.status_code)
    assert 400 in statuses
    assert raw.request("GET", "/keys").status_code == 200
