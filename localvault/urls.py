"""The route table: (method, path pattern, keys.json operationId, key permission, handler).

Names and versions are matched loosely here and validated by the handlers, so a bad name gets the
service's 400 rather than a 404. An empty version means the latest: the SDK sends ``/keys/n//sign``.
The permission is the access-policy key permission the operation needs (None: any valid token).
"""

from __future__ import annotations

import re
from typing import Callable, List, NamedTuple, Optional, Tuple

from . import responses
from .exceptions import BadParameter, MethodNotAllowed, NotFound

NAME = r"(?P<name>[^/]+)"
VERSION = r"(?P<version>[^/]+)"
ANY_VERSION = r"(?P<version>[^/]*)"  # empty: the latest version
OPTIONAL_VERSION = rf"(?:/{ANY_VERSION})?"  # /keys/n/sign, /keys/n//sign and /keys/n/v/sign


class Route(NamedTuple):
    method: str
    pattern: str
    operation: str
    permission: Optional[str]
    handler: Callable


ROUTES: List[Route] = [
    Route("GET", r"/keys/?", "GetKeys", "list", responses.list_keys),
    Route("POST", r"/keys//?restore", "RestoreKey", "restore", responses.restore_key),
    Route("GET", rf"/keys/{NAME}/versions", "GetKeyVersions", "list", responses.list_key_versions),
    Route("POST", rf"/keys/{NAME}/create", "CreateKey", "create", responses.create_key),
    Route("POST", rf"/keys/{NAME}/backup", "BackupKey", "backup", responses.backup_key),
    Route("POST", rf"/keys/{NAME}/rotate", "RotateKey", "rotate", responses.rotate_key),
    Route(
        "GET",
        rf"/keys/{NAME}/rotationpolicy",
        "GetKeyRotationPolicy",
        "getrotationpolicy",
        responses.get_key_rotation_policy,
    ),
    Route(
        "PUT",
        rf"/keys/{NAME}/rotationpolicy",
        "UpdateKeyRotationPolicy",
        "setrotationpolicy",
        responses.update_key_rotation_policy,
    ),
    Route("PUT", rf"/keys/{NAME}", "ImportKey", "import", responses.import_key),
    Route("DELETE", rf"/keys/{NAME}", "DeleteKey", "delete", responses.delete_key),
    Route("GET", rf"/keys/{NAME}/?", "GetKey", "get", responses.get_key),
    Route("GET", rf"/keys/{NAME}/{VERSION}", "GetKey", "get", responses.get_key),
    Route("PATCH", rf"/keys/{NAME}/?", "UpdateKey", "update", responses.update_key),
    Route("PATCH", rf"/keys/{NAME}/{VERSION}", "UpdateKey", "update", responses.update_key),
    Route("POST", rf"/keys/{NAME}{OPTIONAL_VERSION}/encrypt", "encrypt", "encrypt", responses.encrypt),
    Route("POST", rf"/keys/{NAME}{OPTIONAL_VERSION}/decrypt", "decrypt", "decrypt", responses.decrypt),
    Route("POST", rf"/keys/{NAME}{OPTIONAL_VERSION}/sign", "sign", "sign", responses.sign),
    Route("POST", rf"/keys/{NAME}{OPTIONAL_VERSION}/verify", "verify", "verify", responses.verify),
    Route("POST", rf"/keys/{NAME}{OPTIONAL_VERSION}/wrapkey", "wrapKey", "wrapKey", responses.wrap_key),
    Route("POST", rf"/keys/{NAME}{OPTIONAL_VERSION}/unwrapkey", "unwrapKey", "unwrapKey", responses.unwrap_key),
    Route("POST", rf"/keys/{NAME}{OPTIONAL_VERSION}/release", "release", "release", responses.release_key),
    Route(
        "GET",
        rf"/keys/{NAME}/{ANY_VERSION}/attestation",
        "GetKeyAttestation",
        "get",
        responses.get_key_attestation,
    ),
    Route("GET", r"/deletedkeys/?", "GetDeletedKeys", "list", responses.list_deleted_keys),
    Route("GET", rf"/deletedkeys/{NAME}", "GetDeletedKey", "get", responses.get_deleted_key),
    Route("DELETE", rf"/deletedkeys/{NAME}", "PurgeDeletedKey", "purge", responses.purge_deleted_key),
    Route(
        "POST",
        rf"/deletedkeys/{NAME}/recover",
        "RecoverDeletedKey",
        "recover",
        responses.recover_deleted_key,
    ),
    Route("POST", r"/rng", "GetRandomBytes", None, responses.get_random_bytes),
]

# The service matches paths case-insensitively (the .NET SDK sends /wrapKey).
_COMPILED = [(re.compile(f"^{route.pattern}$", re.IGNORECASE), route) for route in ROUTES]


def resolve(method: str, path: str) -> Tuple[Route, dict]:
    """The route and path parameters for a request; NotFound or MethodNotAllowed otherwise."""
    allowed: List[str] = []
    for pattern, route in _COMPILED:
        match: Optional[re.Match] = pattern.match(path)
        if match is None:
            continue
        if route.method == method:
            return route, {k: v for k, v in match.groupdict().items() if v is not None}
        allowed.append(route.method)
    if path.startswith("/keys//"):  # no key name: the service's answer to POST /keys//create
        raise BadParameter("Operation not specified")
    if allowed:
        raise MethodNotAllowed(f"The requested resource does not support http method '{method}'.")
    raise NotFound(f"The requested resource '{path}' was not found.")
