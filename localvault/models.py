"""The key store: plain methods, no HTTP. Thread-safe; everything lives in memory."""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .clock import Clock
from .exceptions import BadParameter, Conflict, KeyNotFound
from .jwk import (
    CURVES,
    PrivateKey,
    b64url_decode,
    b64url_encode,
    private_key_from_jwk,
    public_jwk,
    rsa_modulus_bits,
)

KEY_TYPES = {"RSA": "RSA", "RSA-HSM": "RSA", "EC": "EC", "EC-HSM": "EC"}
MANAGED_HSM_TYPES = {"oct", "oct-HSM"}
RSA_SIZES = (2048, 3072, 4096)
RSA_EXPONENTS = (3, 65537)
KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export")
DEFAULT_OPS = {
    "RSA": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
    "EC": ["sign", "verify"],
}
MAX_TAGS = 15
SECONDS_PER_DAY = 86400
_BACKUP_MAGIC = b"LVKB1"
# Vaults in one process share a sealing key, as vaults in one Azure geography accept each other's backups.
_PROCESS_BACKUP_SECRET = AESGCM.generate_key(bit_length=256)


@dataclass
class KeyVersion:
    name: str
    version: str
    kty: str
    private_key: PrivateKey = field(repr=False)
    key_ops: List[str]
    enabled: bool
    created: int
    updated: int
    nbf: Optional[int] = None
    exp: Optional[int] = None
    tags: Optional[Dict[str, str]] = None
    jwk: Dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.jwk:
            self.jwk = public_jwk(self.private_key)

    @property
    def family(self) -> str:
        return KEY_TYPES[self.kty]

    @property
    def hsm(self) -> bool:
        return self.kty.endswith("-HSM")


@dataclass
class KeyRecord:
    name: str
    versions: Dict[str, KeyVersion] = field(default_factory=dict)
    latest: str = ""

    def current(self) -> KeyVersion:
        return self.versions[self.latest]


@dataclass
class DeletedKey:
    record: KeyRecord
    deleted_date: int
    scheduled_purge_date: int


def validate_key_ops(key_ops: Optional[List[str]]) -> Optional[List[str]]:
    if key_ops is None:
        return None
    for op in key_ops:
        if op not in KEY_OPS:
            raise BadParameter(f"Invalid key operation: {op!r}. Valid operations: {', '.join(KEY_OPS)}.")
    return list(key_ops)


def validate_tags(tags: Optional[Dict[str, str]]) -> Optional[Dict[str, str]]:
    if tags is None:
        return None
    if len(tags) > MAX_TAGS:
        raise BadParameter(f"Too many tags: {len(tags)}. A key can have at most {MAX_TAGS} tags.")
    for name, value in tags.items():
        if len(name) > 512 or len(value) > 256:
            raise BadParameter("Tag names are limited to 512 characters and tag values to 256 characters.")
    return dict(tags)


def _check_kty(kty: Any) -> str:
    if not isinstance(kty, str):
        raise BadParameter("The key type (kty) must be a string.")
    if kty in MANAGED_HSM_TYPES:
        raise BadParameter(f"Key type '{kty}' is only supported by Managed HSM, not by a key vault.")
    if kty not in KEY_TYPES:
        raise BadParameter(f"Invalid key type: {kty!r}. Supported key types: {', '.join(KEY_TYPES)}.")
    return kty


def generate_key(
    kty: str, key_size: Optional[int], public_exponent: Optional[int], crv: Optional[str]
) -> PrivateKey:
    """Generate a private key as a Premium vault would; raises BadParameter for what it rejects."""
    if KEY_TYPES[_check_kty(kty)] == "RSA":
        size = 2048 if key_size is None else key_size
        if size not in RSA_SIZES:
            raise BadParameter(f"Invalid key size: {size}. RSA keys must be 2048, 3072 or 4096 bits.")
        exponent = 65537 if public_exponent is None else public_exponent
        if exponent not in RSA_EXPONENTS:
            raise BadParameter(f"Invalid public exponent: {exponent}. Supported values: 3, 65537.")
        return rsa.generate_private_key(public_exponent=exponent, key_size=size)
    curve = "P-256" if crv is None else crv
    if curve not in CURVES:
        raise BadParameter(f"Invalid curve name: {curve!r}. Supported curves: {', '.join(CURVES)}.")
    return ec.generate_private_key(CURVES[curve])


def key_from_jwk(jwk: Dict[str, Any], hsm: bool) -> Tuple[str, PrivateKey]:
    """The stored key type and private key for an imported JWK."""
    kty = _check_kty(jwk.get("kty"))
    if jwk.get("key_hsm"):
        raise BadParameter("Bring-your-own-key import (key_hsm) is not supported.")
    family = KEY_TYPES[kty]
    if "d" not in jwk:
        raise BadParameter("The JSON Web Key has no private key material; import needs the private key.")
    # The size first: private_key_from_jwk bounds every other member by it before any arithmetic.
    size = rsa_modulus_bits(jwk) if family == "RSA" else None
    if size is not None and size not in RSA_SIZES:
        raise BadParameter(f"Invalid key size: {size}. RSA keys must be 2048, 3072 or 4096 bits.")
    key = private_key_from_jwk(jwk, family)
    return (f"{family}-HSM" if hsm or kty.endswith("-HSM") else family), key


class KeyStore:
    """Keys, their versions and soft-deleted keys. Names compare case-insensitively."""

    def __init__(
        self,
        retention_days: int = 90,
        backup_secret: Optional[bytes] = None,
        clock: Optional[Clock] = None,
        managed_hsm: bool = False,
    ) -> None:
        if not 7 <= retention_days <= 90:
            raise ValueError("retention_days must be between 7 and 90")
        self.retention_days = retention_days
        self.managed_hsm = managed_hsm  # a Managed HSM rather than a Premium key vault
        self.clock = clock or Clock()
        self._aead = AESGCM(backup_secret or _PROCESS_BACKUP_SECRET)
        self._lock = threading.RLock()
        self._keys: Dict[str, KeyRecord] = {}
        self._deleted: Dict[str, DeletedKey] = {}

    @property
    def recovery_level(self) -> str:
        return "Recoverable+Purgeable" if self.retention_days == 90 else "CustomizedRecoverable+Purgeable"

    def reset(self) -> None:
        """Forget every key, version and deleted key, and put the clock back to real time."""
        with self._lock:
            self._keys.clear()
            self._deleted.clear()
            self.clock.reset()

    # -- reading --------------------------------------------------------------------------------

    def _record(self, name: str) -> KeyRecord:
        record = self._keys.get(name.lower())
        if record is None:
            raise KeyNotFound.for_key(name)
        return record

    def get(self, name: str, version: str = "") -> KeyVersion:
        with self._lock:
            record = self._record(name)
            if not version:
                return record.current()
            found = record.versions.get(version.lower())
            if found is None:
                raise KeyNotFound.for_version(name, version)
            return found

    def list_keys(self, after: str, limit: int) -> Tuple[List[KeyVersion], Optional[str]]:
        """Latest versions of keys whose lower-case name sorts after ``after``; and the next marker."""
        with self._lock:
            names = sorted(n for n in self._keys if n > after)
            page = [self._keys[n].current() for n in names[:limit]]
        return page, (names[limit - 1] if len(names) > limit else None)

    def list_versions(self, name: str, after: str, limit: int) -> Tuple[List[KeyVersion], Optional[str]]:
        with self._lock:
            record = self._keys.get(name.lower())
            versions = sorted(v for v in (record.versions if record else ()) if v > after)
            page = [record.versions[v] for v in versions[:limit]] if record else []
        return page, (versions[limit - 1] if len(versions) > limit else None)

    def list_deleted(self, after: str, limit: int) -> Tuple[List[DeletedKey], Optional[str]]:
        with self._lock:
            names = sorted(n for n in self._deleted if n > after)
            page = [self._deleted[n] for n in names[:limit]]
        return page, (names[limit - 1] if len(names) > limit else None)

    def get_deleted(self, name: str) -> DeletedKey:
        with self._lock:
            deleted = self._deleted.get(name.lower())
            if deleted is None:
                raise KeyNotFound.deleted(name)
            return deleted

    # -- writing --------------------------------------------------------------------------------

    def check_name_free(self, name: str) -> None:
        deleted = self._deleted.get(name.lower())
        if deleted is not None:
            raise Conflict.deleted_but_recoverable(deleted.record.name)

    def add_version(
        self,
        name: str,
        kty: str,
        private_key: PrivateKey,
        *,
        key_ops: Optional[List[str]] = None,
        enabled: Optional[bool] = None,
        nbf: Optional[int] = None,
        exp: Optional[int] = None,
        tags: Optional[Dict[str, str]] = None,
    ) -> KeyVersion:
        """Store a new version (create or import); the name keeps the case it was first given."""
        key_ops = validate_key_ops(key_ops)
        tags = validate_tags(tags)
        now = int(self.clock.now())
        with self._lock:
            self.check_name_free(name)
            record = self._keys.get(name.lower()) or KeyRecord(name=name)
            version = KeyVersion(
                name=record.name,
                version=uuid.uuid4().hex,
                kty=kty,
                private_key=private_key,
                key_ops=list(DEFAULT_OPS[KEY_TYPES[kty]]) if key_ops is None else key_ops,
                enabled=True if enabled is None else enabled,
                created=now,
                updated=now,
                nbf=nbf,
                exp=exp,
                tags=tags,
            )
            self._keys[name.lower()] = record
            record.versions[version.version] = version
            record.latest = version.version
            return version

    def update(
        self,
        name: str,
        version: str,
        *,
        key_ops: Optional[List[str]] = None,
        enabled: Optional[bool] = None,
        nbf: Optional[int] = None,
        exp: Optional[int] = None,
        tags: Optional[Dict[str, str]] = None,
    ) -> KeyVersion:
        key_ops, tags = validate_key_ops(key_ops), validate_tags(tags)
        with self._lock:
            current = self.get(name, version)
            changes: Dict[str, Any] = {"updated": int(self.clock.now())}
            for attr, value in (("key_ops", key_ops), ("enabled", enabled), ("nbf", nbf), ("exp", exp)):
                if value is not None:
                    changes[attr] = value
            if tags is not None:
                changes["tags"] = tags
            updated = replace(current, **changes)
            self._keys[name.lower()].versions[current.version] = updated
            return updated

    def delete(self, name: str) -> DeletedKey:
        now = int(self.clock.now())
        with self._lock:
            record = self._record(name)
            deleted = DeletedKey(record, now, now + self.retention_days * SECONDS_PER_DAY)
            del self._keys[name.lower()]
            self._deleted[name.lower()] = deleted
            return deleted

    def recover(self, name: str) -> KeyVersion:
        with self._lock:
            deleted = self.get_deleted(name)
            del self._deleted[name.lower()]
            self._keys[name.lower()] = deleted.record
            return deleted.record.current()

    def purge(self, name: str) -> None:
        with self._lock:
            self.get_deleted(name)
            del self._deleted[name.lower()]

    # -- backup and restore ---------------------------------------------------------------------

    def backup(self, name: str) -> bytes:
        """All versions of a key, sealed with this vault's secret (AES-256-GCM)."""
        with self._lock:
            record = self._record(name)
            versions = [
                {
                    "version": v.version,
                    "kty": v.kty,
                    "pkcs8": b64url_encode(
                        v.private_key.private_bytes(
                            serialization.Encoding.DER,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption(),
                        )
                    ),
                    "key_ops": v.key_ops,
                    "enabled": v.enabled,
                    "created": v.created,
                    "updated": v.updated,
                    "nbf": v.nbf,
                    "exp": v.exp,
                    "tags": v.tags,
                }
                for v in record.versions.values()
            ]
            payload = json.dumps({"name": record.name, "latest": record.latest, "versions": versions})
        nonce = os.urandom(12)
        return _BACKUP_MAGIC + nonce + self._aead.encrypt(nonce, payload.encode(), _BACKUP_MAGIC)

    def restore(self, blob: bytes) -> KeyVersion:
        record = self._open_backup(blob)
        with self._lock:
            self.check_name_free(record.name)
            if record.name.lower() in self._keys:
                raise Conflict(
                    f"Key {record.name} already exists in this vault; "
                    "delete and purge it before restoring a backup with the same name."
                )
            self._keys[record.name.lower()] = record
            return record.current()

    def _open_backup(self, blob: bytes) -> KeyRecord:
        invalid = BadParameter("Backup blob contains invalid or corrupt version.")
        if not blob.startswith(_BACKUP_MAGIC) or len(blob) < len(_BACKUP_MAGIC) + 12 + 16:
            raise invalid
        nonce, sealed = blob[len(_BACKUP_MAGIC) : len(_BACKUP_MAGIC) + 12], blob[len(_BACKUP_MAGIC) + 12 :]
        try:
            data = json.loads(self._aead.decrypt(nonce, sealed, _BACKUP_MAGIC))
        except InvalidTag:
            raise invalid from None
        record = KeyRecord(name=data["name"], latest=data["latest"])
        for v in data["versions"]:
            key = serialization.load_der_private_key(b64url_decode(v.pop("pkcs8")), password=None)
            record.versions[v["version"]] = KeyVersion(name=record.name, private_key=key, **v)
        return record
