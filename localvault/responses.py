"""Thin handlers: validate and parse the request, call the store, serialise the service's JSON."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

from .exceptions import BadParameter, VaultError
from .jwk import b64url_decode, b64url_encode
from .models import DeletedKey, KeyStore, KeyVersion, generate_key, key_from_jwk

NAME_PATTERN = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
MAX_RESULTS = 25
Response = Tuple[int, Optional[Dict[str, Any]]]


class NotEmulated(VaultError):
    status = 501
    code = "NotImplemented"


@dataclass
class Request:
    store: KeyStore
    base_url: str
    path: str
    api_version: str
    query: Dict[str, str]
    body: bytes = b""
    _json: Any = field(default=None, repr=False)

    def json(self) -> Dict[str, Any]:
        """The body as a JSON object; BadParameter if it is missing or is not one."""
        if self._json is None:
            try:
                self._json = json.loads(self.body.decode("utf-8")) if self.body.strip() else None
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise BadParameter("The request body is not valid JSON.") from None
            if not isinstance(self._json, dict):
                raise BadParameter("The request body must be a JSON object.")
        return self._json


# -- parsing helpers -------------------------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "an object"}


def _field(body: Dict[str, Any], name: str, kind: type, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise BadParameter(f"The parameter '{name}' is required.")
        return None
    # bool is an int in Python; the service does not accept one for the other
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadParameter(f"The parameter '{name}' must be {_TYPE_NAMES[kind]}.")
    return value


def _name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise BadParameter(f"The request URI contains an invalid name: {name}")
    return name


def _key_ops(body: Dict[str, Any]) -> Optional[List[str]]:
    ops = _field(body, "key_ops", list)
    if ops is not None and not all(isinstance(op, str) for op in ops):
        raise BadParameter("The parameter 'key_ops' must be an array of strings.")
    return ops


def _tags(body: Dict[str, Any]) -> Optional[Dict[str, str]]:
    tags = _field(body, "tags", dict)
    if tags is not None and not all(isinstance(v, str) for v in tags.values()):
        raise BadParameter("Tag values must be strings.")
    return tags


def _attributes(body: Dict[str, Any]) -> Dict[str, Any]:
    attributes = _field(body, "attributes", dict) or {}
    if _field(attributes, "exportable", bool):
        raise BadParameter("Exportable keys need a release policy, which localvault does not emulate.")
    return {
        "enabled": _field(attributes, "enabled", bool),
        "nbf": _field(attributes, "nbf", int),
        "exp": _field(attributes, "exp", int),
    }


def _no_release_policy(body: Dict[str, Any]) -> None:
    if body.get("release_policy") is not None:
        raise BadParameter("Key release policies are not emulated by localvault.")


# -- serialising ---------------------------------------------------------------------------------


def _attributes_json(req: Request, key: KeyVersion) -> Dict[str, Any]:
    attributes: Dict[str, Any] = {"enabled": key.enabled}
    if key.nbf is not None:
        attributes["nbf"] = key.nbf
    if key.exp is not None:
        attributes["exp"] = key.exp
    attributes.update(
        created=key.created,
        updated=key.updated,
        recoveryLevel=req.store.recovery_level,
        recoverableDays=req.store.retention_days,
        exportable=False,
        hsmPlatform="2" if key.hsm else "0",
    )
    if key.family == "RSA":
        attributes["key_size"] = key.private_key.key_size
    return attributes


def _with_tags(data: Dict[str, Any], key: KeyVersion) -> Dict[str, Any]:
    if key.tags is not None:
        data["tags"] = dict(key.tags)
    return data


def key_bundle(req: Request, key: KeyVersion) -> Dict[str, Any]:
    jwk = {"kid": f"{req.base_url}/keys/{key.name}/{key.version}", "kty": key.kty, "key_ops": key.key_ops}
    jwk.update(key.jwk)
    return _with_tags({"key": jwk, "attributes": _attributes_json(req, key)}, key)


def _deletion_info(req: Request, deleted: DeletedKey) -> Dict[str, Any]:
    return {
        "recoveryId": f"{req.base_url}/deletedkeys/{deleted.record.name}",
        "deletedDate": deleted.deleted_date,
        "scheduledPurgeDate": deleted.scheduled_purge_date,
    }


def deleted_key_bundle(req: Request, deleted: DeletedKey) -> Dict[str, Any]:
    return {**_deletion_info(req, deleted), **key_bundle(req, deleted.record.current())}


def key_item(req: Request, key: KeyVersion, with_version: bool = False) -> Dict[str, Any]:
    kid = f"{req.base_url}/keys/{key.name}" + (f"/{key.version}" if with_version else "")
    return _with_tags({"kid": kid, "attributes": _attributes_json(req, key)}, key)


# -- paging --------------------------------------------------------------------------------------


def _page_args(req: Request) -> Tuple[str, int]:
    raw_max = req.query.get("maxresults")
    limit = MAX_RESULTS
    if raw_max is not None:
        # the length first: int() refuses (and is slow on) thousands of digits
        if not (raw_max.isascii() and raw_max.isdigit() and len(raw_max) <= 9) or not (
            1 <= int(raw_max) <= MAX_RESULTS
        ):
            raise BadParameter(
                f"Invalid maxresults: {raw_max}. The value must be between 1 and {MAX_RESULTS}."
            )
        limit = int(raw_max)
    token = req.query.get("$skiptoken")
    if token is None:
        return "", limit
    try:
        marker = json.loads(b64url_decode(token))["NextMarker"]
    except (VaultError, ValueError, KeyError, TypeError, RecursionError):
        raise BadParameter("The $skiptoken is invalid.") from None
    if not isinstance(marker, str):
        raise BadParameter("The $skiptoken is invalid.")
    return marker, limit


def _page(req: Request, items: List[Dict[str, Any]], marker: Optional[str], limit: int) -> Response:
    next_link = None
    if marker is not None:
        token = b64url_encode(json.dumps({"NextMarker": marker, "TargetLocation": 0}).encode())
        next_link = (
            f"{req.base_url}{req.path}?api-version={quote(req.api_version)}"
            f"&$skiptoken={token}&maxresults={limit}"
        )
    return 200, {"value": items, "nextLink": next_link}


# -- handlers ------------------------------------------------------------------------------------


def create_key(req: Request, name: str) -> Response:
    _name(name)
    body = req.json()
    _no_release_policy(body)
    kty = _field(body, "kty", str, required=True)
    key_ops, tags, attributes = _key_ops(body), _tags(body), _attributes(body)
    # Generating is slow, so it happens before the store is locked; the store re-checks the name.
    req.store.check_name_free(name)
    private_key = generate_key(
        kty, _field(body, "key_size", int), _field(body, "public_exponent", int), _field(body, "crv", str)
    )
    key = req.store.add_version(name, kty, private_key, key_ops=key_ops, tags=tags, **attributes)
    return 200, key_bundle(req, key)


def import_key(req: Request, name: str) -> Response:
    _name(name)
    body = req.json()
    _no_release_policy(body)
    jwk = _field(body, "key", dict, required=True)
    _field(jwk, "kty", str, required=True)
    for member in ("crv", "n", "e", "d", "p", "q", "dp", "dq", "qi", "x", "y", "k", "key_hsm"):
        _field(jwk, member, str)
    hsm = bool(_field(body, "Hsm", bool))
    key_ops, tags, attributes = _key_ops(jwk), _tags(body), _attributes(body)
    kty, private_key = key_from_jwk(jwk, hsm)
    key = req.store.add_version(name, kty, private_key, key_ops=key_ops, tags=tags, **attributes)
    return 200, key_bundle(req, key)


def get_key(req: Request, name: str, version: str = "") -> Response:
    return 200, key_bundle(req, req.store.get(_name(name), version))


def update_key(req: Request, name: str, version: str = "") -> Response:
    _name(name)
    body = req.json()
    _no_release_policy(body)
    key = req.store.update(name, version, key_ops=_key_ops(body), tags=_tags(body), **_attributes(body))
    return 200, key_bundle(req, key)


def delete_key(req: Request, name: str) -> Response:
    return 200, deleted_key_bundle(req, req.store.delete(_name(name)))


def list_keys(req: Request) -> Response:
    after, limit = _page_args(req)
    keys, marker = req.store.list_keys(after, limit)
    return _page(req, [key_item(req, k) for k in keys], marker, limit)


def list_key_versions(req: Request, name: str) -> Response:
    _name(name)
    after, limit = _page_args(req)
    keys, marker = req.store.list_versions(name, after, limit)
    return _page(req, [key_item(req, k, with_version=True) for k in keys], marker, limit)


def list_deleted_keys(req: Request) -> Response:
    after, limit = _page_args(req)
    deleted, marker = req.store.list_deleted(after, limit)
    items = [{**_deletion_info(req, d), **key_item(req, d.record.current())} for d in deleted]
    return _page(req, items, marker, limit)


def get_deleted_key(req: Request, name: str) -> Response:
    return 200, deleted_key_bundle(req, req.store.get_deleted(_name(name)))


def recover_deleted_key(req: Request, name: str) -> Response:
    return 200, key_bundle(req, req.store.recover(_name(name)))


def purge_deleted_key(req: Request, name: str) -> Response:
    req.store.purge(_name(name))
    return 204, None


def backup_key(req: Request, name: str) -> Response:
    return 200, {"value": b64url_encode(req.store.backup(_name(name)))}


def restore_key(req: Request) -> Response:
    blob = b64url_decode(_field(req.json(), "value", str, required=True))
    return 200, key_bundle(req, req.store.restore(blob))


def not_emulated(req: Request, **_: str) -> Response:
    raise NotEmulated(
        "This operation (cryptographic operations, rotation, release, attestation, random bytes) "
        "is not emulated by localvault yet."
    )
