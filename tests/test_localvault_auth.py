"""The challenge, the managed-identity endpoint and token checks, as the SDK and a raw client see them."""

from __future__ import annotations

import time

import jwt
import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import RequestsTransport
from helpers import error_of, list_keys_with

from localvault.tokens import ISSUER, TokenIssuer

CHALLENGE_PREFIX = 'Bearer authorization="https://login.microsoftonline.com/'


class StaticCredential:
    """Hands the SDK a fixed token, to see how the vault judges it."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.calls = 0

    def get_token(self, *scopes, **kwargs):
        self.calls += 1
        return AccessToken(self.token, int(time.time()) + 3600)


class RecordingTransport(RequestsTransport):
    """Records each request as it goes on the wire."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen = []

    def send(self, request, **kwargs):
        self.seen.append((request.method, "Authorization" in request.headers, len(request.body or b"")))
        return super().send(request, **kwargs)


def _identity_token(localvault, resource="https://vault.azure.net"):
    env = localvault.environ()
    response = requests.get(
        env["IDENTITY_ENDPOINT"],
        params={"api-version": "2019-08-01", "resource": resource},
        headers={"X-IDENTITY-HEADER": env["IDENTITY_HEADER"]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_request_without_token_gets_the_challenge(localvault):
    response = requests.get(
        f"{localvault.url}/keys", params={"api-version": "7.5"}, verify=localvault.ca_file, timeout=30
    )
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith(CHALLENGE_PREFIX)
    assert challenge.endswith('", resource="https://vault.azure.net"')
    assert error_of(response) == {
        "code": "Unauthorized",
        "message": "AKV10000: Request is missing a Bearer, PoP, or MTLS_POP token.",
    }


def test_sdk_first_request_is_bodiless_and_replayed(unique_key_name):
    from localvault import LocalVault

    # a vault of its own: the SDK caches challenges per vault address for the whole process
    with LocalVault() as vault:
        recorder = RecordingTransport(connection_verify=vault.ca_file)
        client = vault.key_client(transport=recorder)
        client.create_rsa_key(unique_key_name)
        client.close()
    # the challenge round: no token, no body; then the replay with both
    assert recorder.seen[0] == ("POST", False, 0)
    assert recorder.seen[1][0:2] == ("POST", True) and recorder.seen[1][2] > 0


def test_default_azure_credential_gets_tokens_from_the_vault(localvault, unique_key_name, monkeypatch):
    from azure.identity import DefaultAzureCredential

    for name, value in localvault.environ().items():
        monkeypatch.setenv(name, value)
    credential = DefaultAzureCredential()
    token = credential.get_token("https://vault.azure.net/.default")
    claims = jwt.decode(token.token, options={"verify_signature": False})
    assert claims["aud"] == "https://vault.azure.net" and claims["iss"] == ISSUER
    assert token.expires_on > time.time() + 3000
    client = localvault.key_client(credential=credential)
    assert client.create_ec_key(unique_key_name).name == unique_key_name
    client.close()
    credential.close()


def test_identity_endpoint_response(localvault):
    payload = _identity_token(localvault)
    assert set(payload) >= {"access_token", "expires_on", "resource", "token_type"}
    assert payload["resource"] == "https://vault.azure.net"
    assert payload["token_type"] == "Bearer"
    assert int(payload["expires_on"]) > time.time()


@pytest.mark.parametrize(
    ("headers", "params", "status"),
    [
        ({}, {"api-version": "2019-08-01", "resource": "https://vault.azure.net"}, 401),
        (
            {"X-IDENTITY-HEADER": "wrong"},
            {"api-version": "2019-08-01", "resource": "https://vault.azure.net"},
            401,
        ),
        (None, {"api-version": "2017-09-01", "resource": "https://vault.azure.net"}, 400),
        (None, {"api-version": "2019-08-01"}, 400),
    ],
)
def test_identity_endpoint_rejects_bad_requests(localvault, headers, params, status):
    env = localvault.environ()
    if headers is None:
        headers = {"X-IDENTITY-HEADER": env["IDENTITY_HEADER"]}
    response = requests.get(env["IDENTITY_ENDPOINT"], params=params, headers=headers, timeout=30)
    assert response.status_code == status
    assert "access_token" not in response.json()


def _bad_tokens(localvault):
    good = localvault.issuer
    expired, _ = good.issue("https://vault.azure.net", now=time.time() - 7200, lifetime=3600)
    forged, _ = TokenIssuer().issue("https://vault.azure.net")
    wrong_audience = _identity_token(localvault, "https://storage.azure.com")["access_token"]
    unsigned = jwt.encode(
        {"aud": "https://vault.azure.net", "iss": ISSUER, "exp": 2**40}, None, algorithm="none"
    )
    return {
        "expired": expired,
        "forged": forged,
        "wrong-audience": wrong_audience,
        "unsigned": unsigned,
        "malformed": "not-a-jwt",
    }


@pytest.mark.parametrize("kind", ["expired", "forged", "wrong-audience", "unsigned", "malformed"])
def test_bad_tokens_get_401_and_the_challenge(localvault, kind):
    token = _bad_tokens(localvault)[kind]
    response = list_keys_with(localvault, token)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith(CHALLENGE_PREFIX)
    assert error_of(response)["code"] == "Unauthorized"


@pytest.mark.parametrize("kind", ["expired", "forged", "wrong-audience"])
def test_sdk_surfaces_bad_tokens_as_authentication_errors(localvault, unique_key_name, kind):
    credential = StaticCredential(_bad_tokens(localvault)[kind])
    client = localvault.key_client(credential=credential)
    with pytest.raises(ClientAuthenticationError) as info:
        client.get_key(unique_key_name)
    assert info.value.status_code == 401
    assert credential.calls >= 1
    client.close()


def test_tokens_are_not_accepted_by_another_vault(localvault, unique_key_name):
    from localvault import LocalVault

    token = _identity_token(localvault)["access_token"]
    with LocalVault() as other:
        client = other.key_client(credential=StaticCredential(token))
        with pytest.raises(ClientAuthenticationError):
            client.create_ec_key(unique_key_name)
        client.close()


def test_challenge_resource_verification_is_why_the_flag_is_needed(unique_key_name):
    # With the default verification the SDK refuses a vault whose host is not *.vault.azure.net.
    # A vault of its own, so no challenge for its address is cached yet.
    from azure.keyvault.keys import KeyClient

    from localvault import LocalVault

    with LocalVault() as vault:
        client = KeyClient(vault.url, vault.credential(), connection_verify=vault.ca_file)
        with pytest.raises(ValueError, match="challenge resource"):
            client.get_key(unique_key_name)
        client.close()
