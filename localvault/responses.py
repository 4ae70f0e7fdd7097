"""Thin handlers: validate and parse the request, call the store, serialise the service's JSON."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

from . import attestation, crypto
from .exceptions import BadParameter, KeyNotFound, VaultError
from .jwk import b64url_decode, b64url_encode, generate_key
from .models import (
    ACTION_TYPES,
    OCT_HSM_OPS_SINCE_7_3,
    TRIGGERS,
    DeletedKey,
    KeyStore,
    KeyVersion,
    LifetimeAction,
    ReleasePolicy,
    RotationPolicy,
    key_from_jwk,
    validate_key_ops,
    validate_tags,
)

NAME_PATTERN = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
MAX_RESULTS = 25
Response = Tuple[int, Optional[Dict[str, Any]]]


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
            self._json = json_object(self.body)
            if self._json is None:
                raise BadParameter("The request body must be a JSON object.")
        return self._json


def json_object(raw: bytes) -> Optional[Dict[str, Any]]:
    """A request body as a JSON object, None if it is empty; BadParameter if it is not JSON or not an object."""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadParameter("The request body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise BadParameter("The request body must be a JSON object.")
    return value


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
    return {
        "enabled": _field(attributes, "enabled", bool),
        "nbf": _field(attributes, "nbf", int),
        "exp": _field(attributes, "exp", int),
    }


POLICY_CONTENT_TYPE = "application/json; charset=utf-8"
# The order a key vault writes a release policy's members back in, as recorded at 7.3 (the grammar's)
_POLICY_ORDER = {member: rank for rank, member in enumerate(("version", "authority", "claim", "anyOf"))}


MAX_POLICY_DEPTH = 32  # objects and arrays within each other: the grammar needs a few


def _nesting(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_POLICY_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _grammar_order(value: Any) -> Any:
    if isinstance(value, list):
        return [_grammar_order(item) for item in value]
    if not isinstance(value, dict):
        return value
    ordered = sorted(value, key=lambda member: _POLICY_ORDER.get(member, len(_POLICY_ORDER)))
    return {member: _grammar_order(value[member]) for member in ordered}


def _release_policy(req: Request, body: Dict[str, Any]) -> Optional[ReleasePolicy]:
    """A request's release policy, kept as the service writes it back: version "1.0" as "1.0.0" (a Managed
    HSM, recorded at 7.3) and, by a key vault, each object's members in the grammar's order (recorded at 7.3)."""
    raw = _field(body, "release_policy", dict)
    if raw is None:
        return None
    data = _bytes(raw, "data", required=True)
    try:
        policy = json.loads(data.decode("utf-8"))  # type: ignore[union-attr]
    except (UnicodeDecodeError, ValueError, RecursionError):
        policy = None
    if not isinstance(policy, dict):
        raise BadParameter("Key Release Policy: the policy data must be a JSON object.")
    if _nesting(policy) > MAX_POLICY_DEPTH:
        raise BadParameter(f"Key Release Policy: the policy nests deeper than {MAX_POLICY_DEPTH} levels.")
    if policy.get("version") == "1.0":
        policy["version"] = "1.0.0"
    if not req.store.managed_hsm:
        policy = _grammar_order(policy)
    written = json.dumps(policy, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    content_type = _field(raw, "contentType", str) or POLICY_CONTENT_TYPE
    return ReleasePolicy(b64url_encode(written), content_type, bool(_field(raw, "immutable", bool)))


def _release(req: Request, body: Dict[str, Any]) -> Tuple[bool, Optional[ReleasePolicy]]:
    """A new key's exportable attribute and release policy: the service refuses one without the other."""
    policy = _release_policy(req, body)
    exportable = bool(_field(_field(body, "attributes", dict) or {}, "exportable", bool))
    if exportable and policy is None:
        raise BadParameter.exportable_without_release_policy(req.store.managed_hsm)
    if policy is not None and not exportable:
        raise BadParameter.release_policy_not_exportable(req.store.managed_hsm)
    return exportable, policy


def _version_key(api_version: str) -> Tuple[int, int, int]:
    """Api-versions in the order they were published: 2016-10-01, 7.0, 7.1-preview, 7.1, ..., 2025-07-01."""
    match = re.match(r"^(\d+)\.(\d+)(-preview)?", api_version)
    if match:
        return int(match.group(1)), int(match.group(2)), -1 if match.group(3) else 0
    year = int(api_version[:4]) if api_version[:4].isdigit() else 0
    return (8, year, 0) if year >= 2025 else (0, year, 0)


def _since(req: Request, api_version: str) -> bool:
    return _version_key(req.api_version) >= _version_key(api_version)


# -- serialising ---------------------------------------------------------------------------------


def _attributes_json(req: Request, key: KeyVersion) -> Dict[str, Any]:
    attributes: Dict[str, Any] = {"enabled": key.enabled}
    if key.nbf is not None:
        attributes["nbf"] = key.nbf
    if key.exp is not None:
        attributes["exp"] = key.exp
    attributes.update(created=key.created, updated=key.updated, recoveryLevel=req.store.recovery_level)
    # What each api-version's answers carry, as recorded: recoverableDays since 7.1, exportable since
    # 7.4 (a Managed HSM's since 7.2), hsmPlatform and key_size since 7.5.
    if _since(req, "7.1-preview"):
        attributes["recoverableDays"] = req.store.retention_days
    if key.exportable or _since(req, "7.2-preview" if req.store.managed_hsm else "7.4-preview.1"):
        attributes["exportable"] = key.exportable
    if _since(req, "7.5-preview.1"):
        attributes["hsmPlatform"] = "2" if key.hsm else "0"
        if key.family == "RSA":
            attributes["key_size"] = key.private_key.key_size
        elif key.family == "oct":
            attributes["key_size"] = len(key.private_key) * 8
    return attributes


def _with_tags(data: Dict[str, Any], key: KeyVersion) -> Dict[str, Any]:
    if key.tags is not None:
        data["tags"] = dict(key.tags)
    return data


def key_id(req: Request, key: KeyVersion) -> str:
    return f"{req.base_url}/keys/{key.name}/{key.version}"


def key_bundle(req: Request, key: KeyVersion) -> Dict[str, Any]:
    jwk = {"kid": key_id(req, key), "kty": key.kty, "key_ops": key.key_ops}
    jwk.update(key.jwk)
    if key.kty == "RSA-HSM" and not req.store.managed_hsm:  # a vault's HSM gives e in four bytes
        e = key.private_key.public_key().public_numbers().e
        if e < 2**32:
            jwk["e"] = b64url_encode(e.to_bytes(4, "big"))
    bundle = _with_tags({"key": jwk, "attributes": _attributes_json(req, key)}, key)
    if key.release_policy is not None:
        policy = key.release_policy
        bundle["release_policy"] = {
            "contentType": policy.content_type,
            "data": policy.data,
            "immutable": policy.immutable,
        }
    return bundle


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


def _with_port(url: str) -> str:
    """The service's nextLink names its port, ``https://NAME.vault.azure.net:443``; ids do not."""
    return url if urlsplit(url).port else f"{url}:443"


def _page(req: Request, items: List[Dict[str, Any]], marker: Optional[str], limit: int) -> Response:
    next_link = None
    if marker is not None:
        token = b64url_encode(json.dumps({"NextMarker": marker, "TargetLocation": 0}).encode())
        next_link = (
            f"{_with_port(req.base_url)}{req.path}?api-version={quote(req.api_version)}"
            f"&$skiptoken={token}&maxresults={limit}"
        )
    if next_link is None and req.store.managed_hsm:  # a Managed HSM's last page has no nextLink
        return 200, {"value": items}
    return 200, {"value": items, "nextLink": next_link}


# -- handlers ------------------------------------------------------------------------------------


def _hsm_type(req: Request, kty: str) -> str:
    """A Managed HSM keeps every key in its HSM: it answers kty RSA, EC, OKP or oct (or AES) as RSA-HSM,
    EC-HSM, OKP-HSM, oct-HSM."""
    if req.store.managed_hsm and kty in ("RSA", "EC", "OKP", "oct", "AES"):
        return "oct-HSM" if kty == "AES" else f"{kty}-HSM"
    return kty


def create_key(req: Request, name: str) -> Response:
    _name(name)
    body = req.json()
    exportable, release_policy = _release(req, body)
    kty = _hsm_type(req, _field(body, "kty", str, required=True))
    key_ops, tags, attributes = (
        validate_key_ops(_key_ops(body)),
        validate_tags(_tags(body)),
        _attributes(body),
    )
    # Generating is slow, so it happens after every check and before the store is locked; the store
    # re-checks name and type.
    req.store.check_name_free(name)
    req.store.check_key_type(kty)
    private_key = generate_key(
        kty,
        _field(body, "key_size", int),
        _field(body, "public_exponent", int),
        _field(body, "crv", str),
        managed_hsm=req.store.managed_hsm,
        workers=req.store.workers,
    )
    default_ops = OCT_HSM_OPS_SINCE_7_3 if kty == "oct-HSM" and _since(req, "7.3") else None
    key = req.store.add_version(
        name,
        kty,
        private_key,
        key_ops=key_ops,
        tags=tags,
        default_ops=default_ops,
        exportable=exportable,
        release_policy=release_policy,
        **attributes,
    )
    return 200, key_bundle(req, key)


def import_key(req: Request, name: str) -> Response:
    _name(name)
    body = req.json()
    exportable, release_policy = _release(req, body)
    jwk = _field(body, "key", dict, required=True)
    _field(jwk, "kty", str, required=True)
    for member in ("crv", "n", "e", "d", "p", "q", "dp", "dq", "qi", "x", "y", "k", "key_hsm"):
        _field(jwk, member, str)
    hsm = bool(_field(body, "Hsm", bool))
    key_ops, tags, attributes = _key_ops(jwk), _tags(body), _attributes(body)
    kty, private_key = key_from_jwk(jwk, hsm, managed_hsm=req.store.managed_hsm, workers=req.store.workers)
    key = req.store.add_version(
        name,
        _hsm_type(req, kty),
        private_key,
        key_ops=key_ops,
        tags=tags,
        exportable=exportable,
        release_policy=release_policy,
        **attributes,
    )
    return 200, key_bundle(req, key)


def get_key(req: Request, name: str, version: str = "") -> Response:
    return 200, key_bundle(req, req.store.get(_name(name), version))


def update_key(req: Request, name: str, version: str = "") -> Response:
    _name(name)
    body = req.json()
    key = req.store.update(
        name,
        version,
        key_ops=_key_ops(body),
        tags=_tags(body),
        exportable=_field(_field(body, "attributes", dict) or {}, "exportable", bool),
        release_policy=_release_policy(req, body),
        **_attributes(body),
    )
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
    try:
        return 200, key_bundle(req, req.store.recover(_name(name)))
    except KeyNotFound as missing:  # the service names the key, not the deleted key, it did not find
        if missing.resource.startswith("deletedkeys/"):
            raise KeyNotFound.for_key(name) from None
        raise


def purge_deleted_key(req: Request, name: str) -> Response:
    req.store.purge(_name(name))
    return 204, None


def backup_key(req: Request, name: str) -> Response:
    return 200, {"value": b64url_encode(req.store.backup(_name(name)))}


def restore_key(req: Request) -> Response:
    blob = b64url_decode(_field(req.json(), "value", str, required=True))
    return 200, key_bundle(req, req.store.restore(blob))


def rotate_key(req: Request, name: str) -> Response:
    return 200, key_bundle(req, req.store.rotate(_name(name)))


def _rotation_policy_json(req: Request, name: str, policy: RotationPolicy) -> Dict[str, Any]:
    attributes: Dict[str, Any] = {}
    for member, value in (
        ("expiryTime", policy.expiry_time),
        ("created", policy.created),
        ("updated", policy.updated),
    ):
        if value is not None:
            attributes[member] = value
    return {
        "id": f"{req.base_url}/keys/{name}/rotationpolicy",
        "lifetimeActions": [
            {"trigger": {a.trigger: a.duration}, "action": {"type": a.action}}
            for a in policy.lifetime_actions
        ],
        "attributes": attributes,
    }


def get_key_rotation_policy(req: Request, name: str) -> Response:
    stored_name, policy = req.store.get_rotation_policy(_name(name))
    if policy.created is None and not req.store.managed_hsm and not _since(req, "7.3"):
        # a key that never had a policy, as a vault answered in the 7.3-preview days (recorded in 2021)
        return 200, {"lifetimeActions": None, "attributes": None}
    return 200, _rotation_policy_json(req, stored_name, policy)


def _lifetime_action(item: Any) -> LifetimeAction:
    if not isinstance(item, dict):
        raise BadParameter("Each of 'lifetimeActions' must be an object with a trigger and an action.")
    trigger = _field(item, "trigger", dict, required=True)
    kind = _field(_field(item, "action", dict, required=True), "type", str, required=True)
    given = [(t, d) for t, d in ((t, _field(trigger, t, str)) for t in TRIGGERS) if d is not None]
    # Both triggers in one action: the service's model has one condition per action, so 400.
    if len(given) != 1:
        raise BadParameter(
            "A lifetime action's trigger needs exactly one of timeAfterCreate and timeBeforeExpiry."
        )
    if kind.lower() not in ACTION_TYPES:
        raise BadParameter(f"Invalid lifetime action type: {kind[:32]!r}. Valid types: Rotate, Notify.")
    return LifetimeAction(ACTION_TYPES[kind.lower()], *given[0])


def update_key_rotation_policy(req: Request, name: str) -> Response:
    """PUT replaces the policy: lifetimeActions and attributes.expiryTime (id, created, updated are read-only)."""
    _name(name)
    body = req.json()
    actions = [_lifetime_action(item) for item in _field(body, "lifetimeActions", list) or []]
    expiry_time = _field(_field(body, "attributes", dict) or {}, "expiryTime", str)
    return 200, _rotation_policy_json(req, *req.store.set_rotation_policy(name, actions, expiry_time))


# -- cryptographic operations ----------------------------------------------------------------------


def _bytes(body: Dict[str, Any], name: str, required: bool = False) -> Optional[bytes]:
    """A base64url member, decoded; a required one must not be empty."""
    raw = _field(body, name, str, required=required)
    if raw is None:
        return None
    data = b64url_decode(raw)
    if required and not data:
        raise BadParameter(f"The parameter '{name}' must not be empty.")
    return data


def _operation(req: Request, name: str, version: str, operation: str) -> Tuple[KeyVersion, str, bytes]:
    """The key (if it may do ``operation`` now), the algorithm and the decoded value."""
    _name(name)
    body = req.json()
    alg = _field(body, "alg", str, required=True)
    value = _bytes(body, "value", required=True)
    return req.store.usable(name, version, operation), alg, value  # type: ignore[return-value]


def _result(req: Request, key: KeyVersion, value: bytes, alg: str) -> Dict[str, Any]:
    result = {"kid": key_id(req, key), "value": b64url_encode(value)}
    if req.store.managed_hsm:  # a Managed HSM's results name their algorithm
        result["alg"] = alg
    return result


def encrypt(req: Request, name: str, version: str = "") -> Response:
    key, alg, plaintext = _operation(req, name, version, "encrypt")
    body = req.json()
    aad = _bytes(body, "aad")
    encrypted = crypto.encrypt(key.private_key, alg, plaintext, iv=_bytes(body, "iv"), aad=aad)
    result = _result(req, key, encrypted.value, alg)
    # GCM echoes aad with its iv and tag; CBC takes aad and does not echo it
    echoed = aad if encrypted.tag is not None else None
    for member, value in (("iv", encrypted.iv), ("tag", encrypted.tag), ("aad", echoed)):
        if value is not None:
            result[member] = b64url_encode(value)
    return 200, result


def decrypt(req: Request, name: str, version: str = "") -> Response:
    key, alg, ciphertext = _operation(req, name, version, "decrypt")
    body = req.json()
    plaintext = crypto.decrypt(
        key.private_key,
        alg,
        ciphertext,
        iv=_bytes(body, "iv"),
        tag=_bytes(body, "tag"),
        aad=_bytes(body, "aad"),
    )
    return 200, _result(req, key, plaintext, alg)


def wrap_key(req: Request, name: str, version: str = "") -> Response:
    key, alg, value = _operation(req, name, version, "wrapKey")
    return 200, _result(req, key, crypto.wrap_key(key.private_key, alg, value), alg)


def unwrap_key(req: Request, name: str, version: str = "") -> Response:
    key, alg, value = _operation(req, name, version, "unwrapKey")
    return 200, _result(req, key, crypto.unwrap_key(key.private_key, alg, value), alg)


def sign(req: Request, name: str, version: str = "") -> Response:
    key, alg, digest = _operation(req, name, version, "sign")
    try:
        signature = crypto.sign(key.private_key, alg, digest)
    except crypto.IncompatibleCurve as error:
        raise BadParameter(error.message_for(key_id(req, key))) from None
    return 200, _result(req, key, signature, alg)


def verify(req: Request, name: str, version: str = "") -> Response:
    key, alg, signature = _operation(req, name, version, "verify")
    digest = _bytes(req.json(), "digest", required=True)
    try:
        valid = crypto.verify(key.private_key, alg, digest, signature)  # type: ignore[arg-type]
    except crypto.IncompatibleCurve as error:
        raise BadParameter(error.message_for(key_id(req, key))) from None
    return 200, {"value": valid}


def release_key(req: Request, name: str, version: str = "") -> Response:
    _name(name)
    body = req.json()
    if not _field(body, "target", str, required=True):
        raise BadParameter("The parameter 'target' must not be empty.")
    key = req.store.get(name, version)
    if key.exportable:  # its release policy is kept as data: nothing here can check an attestation
        raise BadParameter(
            f"Key {key.name} cannot be released: a release needs an attestation that the key's release "
            "policy accepts, and localvault has no attestation service to check one."
        )
    raise BadParameter(
        f"Key {key.name} is not exportable: only a key created exportable, with a release policy, "
        "can be released."
    )


def get_key_attestation(req: Request, name: str, version: str = "") -> Response:
    key = req.store.get(_name(name), version)
    if not req.store.managed_hsm:
        raise BadParameter(
            f"Key {key.name} has no attestation: key attestation is served by a Managed HSM only."
        )
    bundle = key_bundle(req, key)
    bundle["attributes"]["attestation"] = attestation.attestation(key)  # emulated: proves nothing
    return 200, bundle


def get_random_bytes(req: Request) -> Response:
    if not req.store.managed_hsm:
        raise BadParameter("Random bytes (POST /rng) are served by a Managed HSM only, not by a key vault.")
    count = _field(req.json(), "count", int, required=True)
    if not 1 <= count <= crypto.MAX_RANDOM_BYTES:
        raise BadParameter(
            f"GetRandomBytesRequest: count cannot be greater than {crypto.MAX_RANDOM_BYTES} or less than 1"
        )
    return 200, {"value": b64url_encode(crypto.random_bytes(count))}
