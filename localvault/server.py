"""The Key Vault keys API over TLS, the plain-HTTP managed-identity endpoint, and the one place that turns
exceptions into the service's error JSON. The HTTP/1.1 machinery under both is in ``http11``."""

from __future__ import annotations

import hmac
import logging
import ssl
import time
import uuid
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qsl

from . import control, urls
from .exceptions import BadParameter, MethodNotAllowed, Unauthorized, VaultError
from .faults import DROP, DropConnection, fault_of
from .http11 import CLIENT_GONE, MAX_CONNECTIONS, Handler, Server, TLSServer, printable, split_target
from .models import MAX_RESTORE_BODY, KeyStore
from .responses import Request
from .tokens import ISSUER, MANAGED_HSM_RESOURCE, TENANT_ID, VAULT_RESOURCE, TokenIssuer

__all__ = ["MAX_CONNECTIONS", "IdentityServer", "VaultServer"]

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


def challenge(resource: str) -> str:
    return f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", resource="{resource}"'


CHALLENGE = challenge(VAULT_RESOURCE)
MANAGED_HSM_CHALLENGE = challenge(MANAGED_HSM_RESOURCE)
MISSING_TOKEN = "AKV10000: Request is missing a Bearer, PoP, or MTLS_POP token."
INVALID_TOKEN = "The access token is invalid: its signature could not be verified."
EXPIRED_TOKEN = "[TokenExpired] Error validating token: 'S2S12086'."
NOT_YET_VALID_TOKEN = "Token not yet valid"
# The service refuses https://vault.azure.net/ (a trailing slash) as an audience.
VAULT_AUDIENCES = (VAULT_RESOURCE,)
MANAGED_HSM_AUDIENCES = (MANAGED_HSM_RESOURCE,)
JSON_TYPE = "application/json; charset=utf-8"
SERVICE_HEADERS = {
    "Cache-Control": "no-cache",
    "Pragma": "no-cache",
    "Expires": "-1",
    "Strict-Transport-Security": "max-age=31536000;includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "x-ms-keyvault-service-version": "1.9.0.0",
    "x-ms-keyvault-region": "localvault",
}
MANAGED_HSM_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
    "x-ms-keyvault-region": "localvault",
}


def network_info(client_address: Any) -> str:
    """``x-ms-keyvault-network-info``: how the client reached the vault."""
    host = str(client_address[0]) if client_address else ""
    if ":" in host and not host.startswith("::ffff:"):
        return f"conn_type=Ipv6;addr={host};act_addr_fam=InterNetworkV6;"
    return f"conn_type=Ipv4;addr={host.removeprefix('::ffff:')};act_addr_fam=InterNetwork;"


def token_refusal(problem: Tuple[str, str], audiences: Tuple[str, ...]) -> str:
    """The service's 401 message for a token it cannot accept."""
    kind, found = problem
    if kind == "audience":
        return f"AKV10022: Invalid audience. Expected {audiences[0]}, found: {found}."
    if kind == "issuer":
        return f"AKV10032: Invalid issuer. Expected {ISSUER}, found: {found}."
    if kind == "expired":
        return EXPIRED_TOKEN
    if kind == "not yet valid":
        return NOT_YET_VALID_TOKEN
    return INVALID_TOKEN


class Challenge(Unauthorized):
    """No token: the answer that starts the SDK's challenge (a Managed HSM's has an empty body)."""


class VaultServer(TLSServer):
    """HTTPS server for the keys API. With ``bind=False`` it listens nowhere and serves only the
    connections given to ``finish_request()``."""

    controls: control.Controls  # faults, permissions, the request log; set by LocalVault

    def __init__(
        self,
        address: Tuple[str, int],
        context: ssl.SSLContext,
        store: KeyStore,
        issuer: TokenIssuer,
        max_connections: int = MAX_CONNECTIONS,
        *,
        bind: bool = True,
    ) -> None:
        self.store, self.issuer = store, issuer
        super().__init__(address, VaultHandler, context, max_connections, bind)
        self.base_url = ""  # the vault's URL, which names it in ids and links; set by LocalVault once bound


class VaultHandler(Handler):
    server: VaultServer

    def _dispatch(self) -> None:
        if control.is_control(self.path):
            return control.handle(self)
        started = time.monotonic()
        managed_hsm = self.server.store.managed_hsm
        request_id = str(uuid.uuid4())
        headers = dict(MANAGED_HSM_HEADERS if managed_hsm else SERVICE_HEADERS)
        headers["x-ms-request-id"] = request_id
        client_request_id = self.headers.get("x-ms-client-request-id")
        if client_request_id:
            headers["x-ms-client-request-id"] = client_request_id
        headers["x-ms-keyvault-network-info"] = network_info(self.client_address)
        fault: Optional[str] = None
        payload: Optional[Dict[str, Any]]
        try:
            self._authenticate(headers)
            status, payload = self._handle(self.read_body())
        except DropConnection:  # an injected fault: no answer at all
            self.close_connection = True
            self.server.controls.log.record(self.command, self.path, None, DROP)
            return
        except VaultError as error:
            fault = fault_of(error)
            headers.update(error.headers)
            if managed_hsm:
                error = error.for_managed_hsm(self.server.base_url, split_target(self.path).path)
            status, payload = error.status, error.body()
            if managed_hsm and isinstance(error, Challenge):
                payload = None
        except CLIENT_GONE:
            raise
        except Exception:  # a bug in localvault; the server keeps serving
            log.exception(
                "internal error handling %s %s", self.command, printable(self.path, self.server.hidden)
            )
            status, payload = (
                500,
                {"error": {"code": "InternalError", "message": "localvault internal error"}},
            )
        if managed_hsm:
            if payload is None:  # a Managed HSM types even its empty answers
                headers["Content-Type"] = JSON_TYPE
            elif isinstance(payload.get("error"), dict):
                payload["error"]["message"] = f"{payload['error'].get('message')} (Activity ID: {request_id})"
            headers["x-ms-server-latency"] = str(int((time.monotonic() - started) * 1000))
        # logged before the answer is written: one past the write buffer leaves at once, and a client
        # that has its answer must find it in the log
        self.server.controls.log.record(self.command, self.path, status, fault)
        self.send_json(status, payload, headers)

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        """The status line and Date: the service sends no ``Server`` header."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def body_limit(self) -> int:
        """A restore takes the largest backup this vault makes; every other request MAX_BODY."""
        if control.operation_of(self.command, self.path) == "RestoreKey":  # as the route table spells it
            return MAX_RESTORE_BODY
        return super().body_limit()

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
        self.server.controls.inject_fault(route)
        self.server.controls.authorize(route)
        request = Request(
            self.server.store, self.server.base_url, split.path.rstrip("/"), api_version, query, body
        )
        with self.server.controls.holds.around(route.operation):
            return route.handler(request, **params)

    def _authenticate(self, headers: Dict[str, str]) -> None:
        managed_hsm = self.server.store.managed_hsm
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        error: Unauthorized
        if scheme.lower() == "bearer" and token.strip():
            audiences = MANAGED_HSM_AUDIENCES if managed_hsm else VAULT_AUDIENCES
            problem = self.server.issuer.problem(token.strip(), audiences)
            if problem is None:
                return
            error = Unauthorized(token_refusal(problem, audiences))
        else:
            error = Challenge(MISSING_TOKEN)
        headers["WWW-Authenticate"] = MANAGED_HSM_CHALLENGE if managed_hsm else CHALLENGE
        self.skip_body()
        raise error

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_other = _dispatch


class IdentityServer(Server):
    """The App Service managed-identity protocol (api-version 2019-08-01), over plain HTTP on loopback."""

    def __init__(
        self,
        address: Tuple[str, int],
        issuer: TokenIssuer,
        secret: str,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.issuer, self.secret = issuer, secret
        self.hidden = (secret,)
        super().__init__(address, IdentityHandler, max_connections)


class IdentityHandler(Handler):
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
