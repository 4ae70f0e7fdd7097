"""The key store: plain methods, no HTTP. Thread-safe; everything lives in memory, and in a journal if
one is attached (``localvault.persist``)."""

from __future__ import annotations

import bisect
import contextlib
import functools
import heapq
import json
import os
import re
import threading
import uuid
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple

import isodate
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import crypto
from .clock import MAX_CLOCK, Clock
from .exceptions import BadParameter, Conflict, Forbidden, KeyNotFound, MalformedBackupBlob, VaultError
from .journal import Journal, WriteOrdering
from .jwk import (
    CURVES,
    KEY_TYPES,
    MAX_RSA_EXPONENT_BYTES,
    RSA_SIZES,
    SYMMETRIC_SIZES,
    PrivateKey,
    b64url_decode,
    b64url_encode,
    check_kty,
    private_key_from_jwk,
    public_jwk,
    regenerate_key,
    rsa_modulus_bits,
)
from .workers import CryptoWorkers, check_rsa_numbers

KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export")
DEFAULT_OPS = {
    "RSA": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
    "EC": ["sign", "verify"],
    "OKP": ["sign", "verify"],
    "oct": ["encrypt", "decrypt", "wrapKey", "unwrapKey"],  # as a Managed HSM until 7.3: no sign, no verify
}
# A new oct-HSM key's key_ops from api-version 7.3 on, as recorded in 2022: all six, and deriveKey.
OCT_HSM_OPS_SINCE_7_3 = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "deriveKey"]
STORED_OPS = (*KEY_OPS, "deriveKey")  # what a key may hold: a client cannot ask for deriveKey
MAX_TAGS = 15
SECONDS_PER_DAY = 86400
# A backup: magic, nonce, AES-GCM of its JSON. LVKB2's JSON is zlib-compressed and names the kind of vault
# that made it; LVKB1 (before) holds the key alone.
_BACKUP_MAGIC, _BACKUP_MAGIC_V1 = b"LVKB2", b"LVKB1"
# Key Vault's limit ("Back up individual key, secret, certificate: 500 versions", service limits).
MAX_BACKUP_VERSIONS = 500
# A restore's body: what a backup of 500 RSA-4096 versions with tags takes, and more. A backup that would
# not fit is refused when it is made, so every backup this vault makes restores.
MAX_RESTORE_BODY = 4 * 2**20
_MAX_BACKUP_JSON = 64 * 2**20  # decompressed (only a sealed blob, so one a vault made, gets that far)
_RESTORE_BODY_EXTRA = 1024  # room for '{"value": ""}' around the base64url
# Vaults in one process share a sealing key, as vaults in one Azure geography accept each other's backups.
_PROCESS_BACKUP_SECRET = AESGCM.generate_key(bit_length=256)

ROTATE, NOTIFY = "Rotate", "Notify"
ACTION_TYPES = {"rotate": ROTATE, "notify": NOTIFY}  # keys.json: compared case-insensitively
TIME_AFTER_CREATE, TIME_BEFORE_EXPIRY = "timeAfterCreate", "timeBeforeExpiry"
TRIGGERS = (TIME_AFTER_CREATE, TIME_BEFORE_EXPIRY)
MIN_EXPIRY_DAYS = 28  # keys.json: expiryTime "should be at least 28 days"
MIN_TRIGGER_DAYS = 7  # service docs: rotation at least 7 days after creation and 7 days before expiry
MAX_DURATION_CHARS = 64
# A clock moved far ahead makes at most this many versions of one key at once: the latest due ones.
MAX_CATCH_UP_ROTATIONS = 32
_parse_duration = functools.lru_cache(maxsize=256)(isodate.parse_duration)
SKUS = ("standard", "premium")
NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
VERSION = re.compile(r"^[0-9a-f]{32}$")
_CURVE_TYPES = {type(curve).__name__ for curve in CURVES.values()}
# How the vault names itself in error messages, as "<vault name>;location=<region>".
VAULT_LOCATION = "localvault;location=localvault"


@dataclass(frozen=True)
class ReleasePolicy:
    """A key release policy, kept as data: localvault stores and returns it, and never releases a key."""

    data: str  # base64url of the policy JSON, as the service writes it back
    content_type: str
    immutable: bool


@dataclass
class KeyVersion:
    """One version of a key. Never changed in place once stored: a change stores a new one (``replace``),
    so a snapshot of a key may share them."""

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
    exportable: bool = False
    release_policy: Optional[ReleasePolicy] = None
    jwk: Dict[str, str] = field(default_factory=dict, repr=False)
    # Its JSON as backups and the data directory hold it, made once (see record_json); replace() drops it.
    stored: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.jwk:
            self.jwk = public_jwk(self.private_key)

    @property
    def family(self) -> str:
        return KEY_TYPES[self.kty]

    @property
    def hsm(self) -> bool:
        return self.kty.endswith("-HSM")


@dataclass(frozen=True)
class LifetimeAction:
    action: str  # ROTATE or NOTIFY
    trigger: str  # TIME_AFTER_CREATE or TIME_BEFORE_EXPIRY
    duration: str  # ISO-8601, as the client gave it


@dataclass
class RotationPolicy:
    lifetime_actions: List[LifetimeAction]
    expiry_time: Optional[str] = None
    created: Optional[int] = None  # None: the default policy, never set
    updated: Optional[int] = None

    def rotate_action(self) -> Optional[LifetimeAction]:
        return next((a for a in self.lifetime_actions if a.action == ROTATE), None)


DEFAULT_NOTIFY = LifetimeAction(NOTIFY, TIME_BEFORE_EXPIRY, "P30D")


@dataclass
class KeyRecord:
    name: str
    versions: Dict[str, KeyVersion] = field(default_factory=dict)
    latest: str = ""
    policy: Optional[RotationPolicy] = None  # None: the service's default policy

    def current(self) -> KeyVersion:
        return self.versions[self.latest]


@dataclass
class DeletedKey:
    record: KeyRecord
    deleted_date: int
    scheduled_purge_date: int


@dataclass
class Pending:
    """A deletion or recovery that completes, on the vault's clock, at ``done``."""

    done: float
    deleted: DeletedKey


class SortedIndex(Dict[str, Any]):
    """A dict that also keeps its keys sorted, so a page of them costs the length of the page."""

    def __init__(self, items: Iterable[Tuple[str, Any]] = ()) -> None:
        super().__init__(items)
        self._sorted = sorted(super().keys())

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            bisect.insort(self._sorted, key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        del self._sorted[bisect.bisect_left(self._sorted, key)]

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        return super().pop(key, *default)

    def clear(self) -> None:
        super().clear()
        self._sorted.clear()

    def after(self, after: str, limit: int) -> Tuple[List[str], Optional[str]]:
        """Up to ``limit`` keys sorting after ``after``, in order; and the marker for the next page."""
        start = bisect.bisect_right(self._sorted, after)
        page = self._sorted[start : start + limit]
        return page, (page[-1] if start + limit < len(self._sorted) and page else None)


def check_delay(seconds: float) -> float:
    """A delete delay: a finite number of seconds, 0 to an hour."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
        raise ValueError("the delete delay must be a number of seconds between 0 and 3600")
    return float(seconds)


def _snapshot(record: KeyRecord) -> KeyRecord:
    return replace(record, versions=dict(record.versions))  # versions are replaced, never changed


def validate_key_ops(key_ops: Optional[List[str]]) -> Optional[List[str]]:
    if key_ops is None:
        return None
    for op in key_ops:
        if op not in KEY_OPS:
            raise BadParameter(f"Invalid key operation: {op!r}. Valid operations: {', '.join(KEY_OPS)}.")
    return list(key_ops)


def check_release_policy_change(key: KeyVersion, managed_hsm: bool) -> None:
    """An update may give a key a new release policy unless the key is not exportable or its policy is
    immutable."""
    if not key.exportable:
        raise BadParameter.release_policy_not_exportable(managed_hsm)
    if key.release_policy is not None and key.release_policy.immutable:
        raise BadParameter.immutable_release_policy(managed_hsm)


def validate_tags(tags: Optional[Dict[str, str]]) -> Optional[Dict[str, str]]:
    if tags is None:
        return None
    if len(tags) > MAX_TAGS:
        raise BadParameter(f"Too many tags: {len(tags)}. A key can have at most {MAX_TAGS} tags.")
    for name, value in tags.items():
        if len(name) > 512 or len(value) > 256:
            raise BadParameter("Tag names are limited to 512 characters and tag values to 256 characters.")
    return dict(tags)


def add_duration(stamp: int, duration: str, name: str, sign: int = 1) -> int:
    """``stamp`` (Unix seconds) plus (or, with sign -1, minus) an ISO-8601 duration such as ``P1Y10D``."""
    try:
        if len(duration) > MAX_DURATION_CHARS:
            raise ValueError(duration)
        start = datetime.fromtimestamp(stamp, timezone.utc)
        step = _parse_duration(duration)
        return int((start + step if sign > 0 else start - step).timestamp())
    except (ValueError, OverflowError, TypeError, ArithmeticError):  # isodate's ISO8601Error is a ValueError
        raise BadParameter(
            f"Invalid {name}: {duration[:MAX_DURATION_CHARS]!r} is not an ISO 8601 duration "
            "the vault can use, such as P90D."
        ) from None


def default_rotation_policy(managed_hsm: bool) -> RotationPolicy:
    """A key's policy until one is set: Key Vault notifies 30 days before expiry; Managed HSM has no
    Notify (keys.json: "Key Vault only"). Neither rotates."""
    return RotationPolicy([] if managed_hsm else [DEFAULT_NOTIFY])


def make_rotation_policy(
    actions: List[LifetimeAction], expiry_time: Optional[str], managed_hsm: bool, now: int
) -> RotationPolicy:
    """Check a policy as the service does; Key Vault adds the default Notify when none is given, as
    recorded service answers show.

    From keys.json: at most one Rotate and one Notify; Notify is Key Vault only; timeAfterCreate applies to
    Rotate only; expiryTime at least 28 days. From the service's documentation: Rotate before expiry needs
    expiryTime; rotation at least 7 days after creation and 7 days before expiry. Chosen where both are
    silent: a Notify trigger is at least 7 days too; months and years count from now.
    """

    def days(duration: str, name: str) -> float:
        return (add_duration(now, duration, name) - now) / SECONDS_PER_DAY

    expiry_days = None if expiry_time is None else days(expiry_time, "expiryTime")
    if expiry_days is not None and expiry_days < MIN_EXPIRY_DAYS:
        raise BadParameter(f"Invalid expiryTime: {expiry_time}. It must be at least {MIN_EXPIRY_DAYS} days.")
    kinds = [a.action for a in actions]
    if len(kinds) != len(set(kinds)):
        raise BadParameter("A rotation policy has at most one Rotate and one Notify lifetime action.")
    for action in actions:
        if action.action == NOTIFY and managed_hsm:
            raise BadParameter("Notify lifetime actions are supported by Key Vault only, not by Managed HSM.")
        if action.action == NOTIFY and action.trigger != TIME_BEFORE_EXPIRY:
            raise BadParameter("A Notify lifetime action can only be triggered by timeBeforeExpiry.")
        if action.action == ROTATE and action.trigger == TIME_BEFORE_EXPIRY and expiry_time is None:
            raise BadParameter("A Rotate action triggered by timeBeforeExpiry needs attributes.expiryTime.")
        trigger_days = days(action.duration, action.trigger)
        if trigger_days < MIN_TRIGGER_DAYS:
            raise BadParameter(
                f"Invalid {action.trigger}: {action.duration}. It must be at least {MIN_TRIGGER_DAYS} days."
            )
        if (
            action.action == ROTATE
            and expiry_days is not None
            and trigger_days > expiry_days - MIN_TRIGGER_DAYS
        ):
            raise BadParameter(
                f"Invalid {action.trigger}: {action.duration}. Rotation must come at least "
                f"{MIN_TRIGGER_DAYS} days after creation and {MIN_TRIGGER_DAYS} days before expiry "
                f"(expiryTime {expiry_time})."
            )
    if not managed_hsm and NOTIFY not in kinds:
        actions = [*actions, DEFAULT_NOTIFY]
    return RotationPolicy(list(actions), expiry_time, now, now)


def key_from_jwk(
    jwk: Dict[str, Any], hsm: bool, managed_hsm: bool = False, workers: Optional[CryptoWorkers] = None
) -> Tuple[str, PrivateKey]:
    """The stored key type and private key for an imported JWK."""
    kty = check_kty(jwk.get("kty"), managed_hsm)
    if jwk.get("key_hsm"):
        raise BadParameter("Bring-your-own-key import (key_hsm) is not supported.")
    family = KEY_TYPES[kty]
    if family != "oct" and "d" not in jwk:
        raise BadParameter("The JSON Web Key has no private key material; import needs the private key.")
    # The size first: private_key_from_jwk bounds every other member by it before any arithmetic.
    size = rsa_modulus_bits(jwk) if family == "RSA" else None
    if size is not None and size not in RSA_SIZES:
        raise BadParameter(f"Invalid key size: {size}. RSA keys must be 2048, 3072 or 4096 bits.")
    key = private_key_from_jwk(jwk, family, workers)
    return (f"{family}-HSM" if hsm or kty.endswith("-HSM") else family), key


class KeyStore(WriteOrdering):
    """Keys, their versions and soft-deleted keys. Names compare case-insensitively."""

    def __init__(
        self,
        retention_days: int = 90,
        backup_secret: Optional[bytes] = None,
        clock: Optional[Clock] = None,
        managed_hsm: bool = False,
        delete_delay: float = 0.0,
        purge_protection: bool = False,
        sku: str = "premium",
    ) -> None:
        if not 7 <= retention_days <= 90:
            raise ValueError("retention_days must be between 7 and 90")
        if sku not in SKUS:
            raise ValueError(f"sku must be one of {', '.join(SKUS)}")
        self.retention_days = retention_days
        self.managed_hsm = managed_hsm  # a Managed HSM rather than a Premium key vault
        self.delete_delay = check_delay(delete_delay)
        self.purge_protection = purge_protection
        self.sku = sku
        self.clock = clock or Clock()
        self._aead = AESGCM(backup_secret or _PROCESS_BACKUP_SECRET)
        self._keys: SortedIndex = SortedIndex()
        self._deleted: SortedIndex = SortedIndex()
        # When each key's Rotate action is next due and each deleted key's purge date, in heaps whose
        # entries are checked when they come up; a key's entry is renewed by every change to it.
        self._due: Dict[str, int] = {}
        self._due_heap: List[Tuple[int, str]] = []
        self._purge_heap: List[Tuple[int, str]] = []
        # Keys whose due versions a thread is generating, outside the lock; set when committed.
        self._rotating: Dict[str, threading.Event] = {}
        self._catching = threading.local()
        # Deletions and recoveries not complete yet: in neither collection until then.
        self._deleting: Dict[str, Pending] = {}
        self._recovering: Dict[str, Pending] = {}
        WriteOrdering.__init__(self)
        self.workers = CryptoWorkers()

    def load(self, keys: Iterable[KeyRecord], deleted: Iterable[DeletedKey], journal: Journal) -> None:
        """Replace every key with these, and record each change from now on in ``journal``."""
        with self._locked():
            self._keys = SortedIndex((record.name.lower(), record) for record in keys)
            self._deleted = SortedIndex((d.record.name.lower(), d) for d in deleted)
            self._due.clear()
            self._due_heap.clear()
            self._purge_heap.clear()
            for lower in (*self._keys, *self._deleted):
                self._schedule(lower)
            self.journal = journal

    def _changed(self, name: str) -> None:
        self._schedule(name.lower())
        super()._changed(name)

    def _schedule(self, lower: str) -> None:
        """Renew the key's due rotation and purge date after a change to it (lock held)."""
        record, deleted = self._keys.get(lower), self._deleted.get(lower)
        due = None
        if record is not None and record.policy is not None and lower not in self._rotating:
            latest = record.current()
            with contextlib.suppress(VaultError):  # a date past the calendar's end: never due
                due = self._rotation_due(record.policy, latest.created, latest.exp)
        if due is None:
            self._due.pop(lower, None)
        elif self._due.get(lower) != due:
            self._due[lower] = due
            heapq.heappush(self._due_heap, (due, lower))
        if deleted is not None:
            heapq.heappush(self._purge_heap, (deleted.scheduled_purge_date, lower))

    def _journal_state(self, lower: str) -> Tuple[Optional[KeyRecord], Optional[DeletedKey]]:
        """Snapshots of the key as the journal records it. A deletion or recovery still pending is
        recorded as done: only its visibility waits, so after a restart it is complete."""
        deleting, recovering = self._deleting.get(lower), self._recovering.get(lower)
        record = recovering.deleted.record if recovering else self._keys.get(lower)
        deleted = deleting.deleted if deleting else self._deleted.get(lower)
        if deleted is not None:
            deleted = replace(deleted, record=_snapshot(deleted.record))
        return (None if record is None else _snapshot(record)), deleted

    def close(self) -> None:
        """Stop the worker processes, if any started; a later request starts them again."""
        self.workers.close()

    @property
    def recovery_level(self) -> str:
        level = "Recoverable" if self.retention_days == 90 else "CustomizedRecoverable"
        return level if self.purge_protection else level + "+Purgeable"

    def set_delete_delay(self, seconds: float) -> None:
        """Deletions and recoveries started from now on take ``seconds`` on the vault's clock."""
        self.delete_delay = check_delay(seconds)

    def check_key_type(self, kty: str) -> None:
        """A standard vault refuses hardware-protected keys; a Managed HSM has no SKU."""
        if kty.endswith("-HSM") and self.sku == "standard" and not self.managed_hsm:
            raise Forbidden.hardware_key_on_standard()

    def reset(self) -> None:
        """Forget every key, version and deleted key, and put the clock back to real time."""
        with self._locked():
            names = {*self._keys, *self._deleted, *self._deleting, *self._recovering}
            self._keys.clear()
            self._deleted.clear()
            self._deleting.clear()
            self._recovering.clear()
            self._due.clear()
            self._due_heap.clear()
            self._purge_heap.clear()
            for lower in names if self.journal is not None else ():
                self._changed(lower)
            self.clock.reset()

    # -- the clock ------------------------------------------------------------------------------

    def _catch_up(self) -> int:
        """Bring the store up to the clock and return the time (lock held): pending deletions and
        recoveries are done, and deleted keys past their scheduled purge date are gone. Due Rotate
        actions are made before the lock is taken (``_before_lock``). Its cost does not grow with the
        number of keys: due times come from heaps."""
        exact = self.clock.now()
        now = int(exact)
        for pending, target in ((self._deleting, self._deleted), (self._recovering, None)):
            for lower in [n for n, p in pending.items() if p.done <= exact] if pending else ():
                done = pending.pop(lower).deleted
                if target is None:
                    self._keys[lower] = done.record
                else:
                    target[lower] = done
                self._schedule(lower)
        heap = self._purge_heap
        while heap and heap[0][0] <= now:
            date, lower = heapq.heappop(heap)
            deleted = self._deleted.get(lower)
            if deleted is not None and deleted.scheduled_purge_date == date:
                del self._deleted[lower]
                self._changed(lower)
        return now

    def _claim_due(self, now: int) -> List[Tuple[KeyRecord, KeyVersion, RotationPolicy, List[int]]]:
        """Take the keys whose rotation is due, with the times of their due versions (lock held)."""
        claimed = []
        heap = self._due_heap
        while heap and heap[0][0] <= now:
            due, lower = heapq.heappop(heap)
            record = self._keys.get(lower)
            if self._due.get(lower) != due or record is None or record.policy is None:
                continue
            del self._due[lower]
            template = record.current()
            dues = self._due_times(record.policy, template, now)
            if dues:
                self._rotating[lower] = threading.Event()
                claimed.append((record, template, record.policy, dues))
            else:
                self._schedule(lower)
        return claimed

    def _before_lock(self, name: Optional[str]) -> None:
        """Make the versions of due Rotate actions: claimed under the lock, generated outside it (so a
        slow RSA key stalls no one), committed under it if the key is still as it was. A request about
        a key waits for its versions that another request is generating."""
        if getattr(self._catching, "busy", False):
            return
        self._catching.busy = True
        try:
            with self._lock:
                claimed = self._claim_due(int(self.clock.now()))
                waiting = None if name is None else self._rotating.get(name.lower())
            for record, template, policy, dues in claimed:
                lower = record.name.lower()
                try:
                    keys = [
                        regenerate_key(template.kty, template.private_key, self.workers, self.managed_hsm)
                        for _ in dues
                    ]
                except VaultError:  # a key the vault cannot make again (e.g. an imported odd exponent)
                    keys = []
                with self._lock:
                    done = self._rotating.pop(lower)
                try:
                    with self._locked(record.name):
                        unchanged = self._keys.get(lower) is record and record.policy is policy
                        if keys and unchanged and record.latest == template.version:
                            for due, private_key in zip(dues, keys):
                                self._add_rotated(record, template, private_key, due)
                        self._changed(record.name)  # also renews its due time
                finally:
                    done.set()
            if waiting is not None:
                waiting.wait()
        finally:
            self._catching.busy = False

    def _due_times(self, policy: RotationPolicy, template: KeyVersion, now: int) -> List[int]:
        """When the versions due by ``now`` are created: the latest MAX_CATCH_UP_ROTATIONS of them. A
        long run is skipped in whole steps (exact for durations in days; months vary a little)."""
        dues: Deque[int] = deque(maxlen=MAX_CATCH_UP_ROTATIONS)
        created, exp = template.created, template.exp
        steps = 0
        while True:
            try:
                due = self._rotation_due(policy, created, exp)
                if due is None or due > now:
                    break
                dues.append(due)
                step, created, exp = due - created, due, self._rotated_exp(policy, due)
                steps += 1
                skip = (now - created) // step - 2 * MAX_CATCH_UP_ROTATIONS
                if steps >= 2 * MAX_CATCH_UP_ROTATIONS and skip > 0:
                    steps = 0
                    created += skip * step
                    exp = self._rotated_exp(policy, created)
            except VaultError:  # a date past the calendar's end: never due
                break
        return list(dues)

    @staticmethod
    def _rotation_due(policy: RotationPolicy, created: int, exp: Optional[int]) -> Optional[int]:
        """When the policy's Rotate action falls due for a latest version with these stamps."""
        action = policy.rotate_action()
        if action is None:
            return None
        if action.trigger == TIME_AFTER_CREATE:
            due = add_duration(created, action.duration, action.trigger)
        elif exp is None:
            return None
        else:
            due = add_duration(exp, action.duration, action.trigger, sign=-1)
        # a policy set late acts from when it was set, never on a version before its creation
        return max(due, created + 1, policy.updated or 0)

    @staticmethod
    def _rotated_exp(policy: Optional[RotationPolicy], created: int) -> Optional[int]:
        if policy is None or policy.expiry_time is None:
            return None
        return add_duration(created, policy.expiry_time, "expiryTime")

    def _add_rotated(
        self, record: KeyRecord, template: KeyVersion, private_key: PrivateKey, created: int
    ) -> KeyVersion:
        version = replace(
            template,
            version=uuid.uuid4().hex,
            private_key=private_key,
            jwk={},
            key_ops=list(template.key_ops),
            enabled=True,
            created=created,
            updated=created,
            nbf=None,
            exp=self._rotated_exp(record.policy, created),
            tags=None if template.tags is None else dict(template.tags),
        )
        record.versions[version.version] = version
        record.latest = version.version
        return version

    # -- reading --------------------------------------------------------------------------------

    def _record(self, name: str) -> KeyRecord:
        record = self._keys.get(name.lower())
        if record is None:
            raise KeyNotFound.for_key(name)
        return record

    def get(self, name: str, version: str = "") -> KeyVersion:
        with self._locked(name):
            self._catch_up()
            record = self._record(name)
            if not version:
                return record.current()
            found = record.versions.get(version.lower())
            if found is None:
                raise KeyNotFound.for_version(name, version)
            return found

    def usable(self, name: str, version: str, operation: str) -> KeyVersion:
        """The key version, if ``operation`` may use it now: allowed by its key_ops, enabled (for
        operations on secret material) and inside its nbf..exp window (for encrypt, sign, wrapKey)."""
        key = self.get(name, version)
        if operation not in key.key_ops:
            raise Forbidden(
                f"Operation {operation} is not permitted on this key.", inner_code="KeyOperationForbidden"
            )
        if not key.enabled and crypto.needs_private_part(key.private_key, operation):
            raise Forbidden(
                f"Operation {operation} is not allowed on a disabled key.", inner_code="KeyDisabled"
            )
        if operation in crypto.WINDOWED_OPERATIONS:
            now = self.clock.now()
            if key.nbf is not None and now < key.nbf:
                raise Forbidden(
                    f"Operation {operation} is not allowed on a key that is not yet valid (nbf).",
                    inner_code="KeyNotYetValid",
                )
            if key.exp is not None and now >= key.exp:
                raise Forbidden(
                    f"Operation {operation} is not allowed on an expired key.", inner_code="KeyExpired"
                )
        return key

    def list_keys(self, after: str, limit: int) -> Tuple[List[KeyVersion], Optional[str]]:
        """Latest versions of keys whose lower-case name sorts after ``after``; and the next marker."""
        with self._locked():
            self._catch_up()
            names, marker = self._keys.after(after, limit)
            return [self._keys[n].current() for n in names], marker

    def list_versions(self, name: str, after: str, limit: int) -> Tuple[List[KeyVersion], Optional[str]]:
        with self._locked(name):
            self._catch_up()
            record = self._keys.get(name.lower())
            versions = sorted(v for v in (record.versions if record else ()) if v > after)
            page = [record.versions[v] for v in versions[:limit]] if record else []
        return page, (versions[limit - 1] if len(versions) > limit else None)

    def list_deleted(self, after: str, limit: int) -> Tuple[List[DeletedKey], Optional[str]]:
        with self._locked():
            self._catch_up()
            names, marker = self._deleted.after(after, limit)
            return [self._deleted[n] for n in names], marker

    def get_deleted(self, name: str) -> DeletedKey:
        with self._locked(name):
            self._catch_up()
            deleted = self._deleted.get(name.lower())
            if deleted is None:
                raise KeyNotFound.deleted(name)
            return deleted

    # -- writing --------------------------------------------------------------------------------

    def check_name_free(self, name: str) -> None:
        with self._locked(name):
            self._catch_up()
            lower = name.lower()
            deleted = self._deleted.get(lower)
            deleting, recovering = self._deleting.get(lower), self._recovering.get(lower)
        if deleting is not None:
            raise Conflict.being_deleted(deleting.deleted.record.name)
        if recovering is not None:
            raise Conflict.being_recovered(recovering.deleted.record.name)
        if deleted is not None:
            raise Conflict.deleted_but_recoverable(deleted.record.name)

    def _check_not_deleting(self, name: str) -> None:
        """Recover and purge wait for a deletion to complete: 409 until then (lock held)."""
        if name.lower() in self._deleting:
            raise Conflict.being_deleted(name, recreate=False)

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
        default_ops: Optional[List[str]] = None,
        exportable: bool = False,
        release_policy: Optional[ReleasePolicy] = None,
    ) -> KeyVersion:
        """Store a new version (create or import); the name keeps the case it was first given. Without
        ``key_ops`` it gets ``default_ops``, else its type's default."""
        self.check_key_type(kty)
        key_ops = validate_key_ops(key_ops)
        tags = validate_tags(tags)
        with self._locked(name):
            now = self._catch_up()
            self.check_name_free(name)
            record = self._keys.get(name.lower()) or KeyRecord(name=name)
            version = KeyVersion(
                name=record.name,
                version=uuid.uuid4().hex,
                kty=kty,
                private_key=private_key,
                key_ops=list(default_ops or DEFAULT_OPS[KEY_TYPES[kty]]) if key_ops is None else key_ops,
                enabled=True if enabled is None else enabled,
                created=now,
                updated=now,
                nbf=nbf,
                exp=exp,
                tags=tags,
                exportable=exportable,
                release_policy=release_policy,
            )
            self._keys[name.lower()] = record
            record.versions[version.version] = version
            record.latest = version.version
            self._changed(name)
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
        exportable: Optional[bool] = None,
        release_policy: Optional[ReleasePolicy] = None,
    ) -> KeyVersion:
        key_ops, tags = validate_key_ops(key_ops), validate_tags(tags)
        with self._locked(name):
            current = self.get(name, version)
            if exportable is not None and exportable != current.exportable:
                raise BadParameter("A key is made exportable or not when it is created; an update cannot change that.")
            changes: Dict[str, Any] = {"updated": int(self.clock.now())}
            if release_policy is not None:
                check_release_policy_change(current, self.managed_hsm)
                changes["release_policy"] = release_policy
            for attr, value in (("key_ops", key_ops), ("enabled", enabled), ("nbf", nbf), ("exp", exp)):
                if value is not None:
                    changes[attr] = value
            if tags is not None:
                changes["tags"] = tags
            updated = replace(current, **changes)
            self._keys[name.lower()].versions[current.version] = updated
            self._changed(name)
            return updated

    def delete(self, name: str) -> DeletedKey:
        with self._locked(name):
            now = self._catch_up()
            record = self._record(name)
            deleted = DeletedKey(record, now, now + self.retention_days * SECONDS_PER_DAY)
            del self._keys[name.lower()]
            if self.delete_delay:
                self._deleting[name.lower()] = Pending(self.clock.now() + self.delete_delay, deleted)
            else:
                self._deleted[name.lower()] = deleted
            self._changed(name)
            return deleted

    def recover(self, name: str) -> KeyVersion:
        with self._locked(name):
            self._catch_up()
            self._check_not_deleting(name)
            deleted = self.get_deleted(name)
            del self._deleted[name.lower()]
            if self.delete_delay:
                self._recovering[name.lower()] = Pending(self.clock.now() + self.delete_delay, deleted)
            else:
                self._keys[name.lower()] = deleted.record
            self._changed(name)
            return deleted.record.current()

    def purge(self, name: str) -> None:
        """Purge a deleted key; 403 with purge protection, which leaves purging to the scheduled date."""
        with self._locked(name):
            self._catch_up()
            self._check_not_deleting(name)
            self.get_deleted(name)
            if self.purge_protection:
                raise Forbidden.purge_protected(VAULT_LOCATION)
            del self._deleted[name.lower()]
            self._changed(name)

    # -- rotation -------------------------------------------------------------------------------

    def rotate(self, name: str) -> KeyVersion:
        """A new version now, like the latest in type, size or curve, key_ops and tags; its exp follows
        the policy's expiryTime."""
        with self._locked(name):
            self._catch_up()
            record = self._record(name)
            template = record.current()
        # Generating is slow, so it happens outside the lock, as for create; the key must still be the
        # one it started on: 404 if it is gone, 409 if the name is now another key's.
        private_key = regenerate_key(template.kty, template.private_key, self.workers, self.managed_hsm)
        with self._locked(name):
            now = self._catch_up()
            if self._record(name) is not record:
                raise Conflict(
                    f"Key {record.name} was deleted and created again while it was being rotated; "
                    "rotate it again."
                )
            version = self._add_rotated(record, template, private_key, now)
            self._changed(name)
            return version

    def get_rotation_policy(self, name: str) -> Tuple[str, RotationPolicy]:
        """The key's name as stored, and its policy (the default until one is set)."""
        with self._locked(name):
            self._catch_up()
            record = self._record(name)
            return record.name, record.policy or default_rotation_policy(self.managed_hsm)

    def set_rotation_policy(
        self, name: str, actions: List[LifetimeAction], expiry_time: Optional[str]
    ) -> Tuple[str, RotationPolicy]:
        """Replace the key's policy (actions and expiryTime) after checking it as the service does."""
        with self._locked(name):
            now = self._catch_up()
            record = self._record(name)
            policy = make_rotation_policy(actions, expiry_time, self.managed_hsm, now)
            if record.policy is not None:
                policy.created = record.policy.created
            record.policy = policy
            self._changed(name)
            return record.name, policy

    # -- backup and restore ---------------------------------------------------------------------

    def backup(self, name: str) -> bytes:
        """All versions of a key and its rotation policy, sealed with this vault's secret (AES-256-GCM).
        At most MAX_BACKUP_VERSIONS, as Key Vault; and no larger than a restore accepts."""
        with self._locked(name):
            self._catch_up()
            record = self._record(name)
            if len(record.versions) > MAX_BACKUP_VERSIONS:
                raise BadParameter(
                    f"Key {record.name} has {len(record.versions)} versions; a backup holds at most "
                    f"{MAX_BACKUP_VERSIONS}, as in Key Vault."
                )
            payload = f'{{"vault":"{self._kind}","key":{record_json(record)}}}'
        packed = zlib.compress(payload.encode(), 6)
        nonce = os.urandom(12)
        blob = _BACKUP_MAGIC + nonce + self._aead.encrypt(nonce, packed, _BACKUP_MAGIC)
        encoded = -(-len(blob) * 4 // 3)  # its base64url in a restore's body
        if encoded > MAX_RESTORE_BODY - _RESTORE_BODY_EXTRA:
            raise BadParameter(
                f"The backup of key {record.name} would be {encoded} bytes of base64url, more than a restore "
                f"takes ({MAX_RESTORE_BODY - _RESTORE_BODY_EXTRA}); its tags make it too large."
            )
        return blob

    @property
    def _kind(self) -> str:
        return "managedhsm" if self.managed_hsm else "keyvault"

    def restore(self, blob: bytes) -> KeyVersion:
        record, kind = self._open_backup(blob)
        self.check_key_type(record.current().kty)
        if not self.managed_hsm and record.current().family == "oct":
            raise BadParameter("This backup holds an oct key, which only a Managed HSM can restore.")
        # Key Vault and Managed HSM back up differently and restore only their own kind's backups; an
        # older backup says not which made it, but a Notify (Key Vault only) does.
        has_notify = record.policy is not None and any(
            a.action == NOTIFY for a in record.policy.lifetime_actions
        )
        if kind not in (None, self._kind) or (kind is None and self.managed_hsm and has_notify):
            made_by, here = ("a key vault", "a Managed HSM")
            if not self.managed_hsm:
                made_by, here = here, made_by
            raise BadParameter(
                f"This backup was made by {made_by}; {here} restores only backups made by {here}."
            )
        with self._locked(record.name):
            self._catch_up()
            self.check_name_free(record.name)
            if record.name.lower() in self._keys:
                raise Conflict(
                    f"Key {record.name} already exists in this vault; "
                    "delete and purge it before restoring a backup with the same name."
                )
            self._keys[record.name.lower()] = record
            self._changed(record.name)
            return record.current()

    def _open_backup(self, blob: bytes) -> Tuple[KeyRecord, Optional[str]]:
        """The key a backup holds, and the kind of vault that made it (None: an LVKB1 backup, which
        does not say)."""
        invalid = MalformedBackupBlob()
        magic = blob[: len(_BACKUP_MAGIC)]
        if magic not in (_BACKUP_MAGIC, _BACKUP_MAGIC_V1) or len(blob) < len(magic) + 12 + 16:
            raise invalid
        nonce, sealed = blob[len(magic) : len(magic) + 12], blob[len(magic) + 12 :]
        try:
            opened = self._aead.decrypt(nonce, sealed, magic)
        except InvalidTag:
            raise invalid from None
        try:
            if magic == _BACKUP_MAGIC_V1:
                data, kind = json.loads(opened), None
            else:
                unpacker = zlib.decompressobj()
                text = unpacker.decompress(opened, _MAX_BACKUP_JSON)
                if unpacker.unconsumed_tail or not unpacker.eof:
                    raise invalid
                payload = json.loads(text)
                data, kind = payload["key"], payload["vault"]
                if kind not in ("keyvault", "managedhsm"):
                    raise invalid
            if len(data["versions"]) > MAX_BACKUP_VERSIONS:
                raise invalid
            return record_from_dict(data), kind
        except (CorruptRecord, ValueError, KeyError, TypeError, zlib.error):
            raise invalid from None


def record_to_dict(record: KeyRecord) -> Dict[str, Any]:
    """A key with all its versions, private parts included, and its rotation policy, as JSON data;
    for sealed backups and the data directory."""
    return json.loads(record_json(record))


def record_json(record: KeyRecord, **members: Any) -> str:
    """record_to_dict's data as compact JSON, with ``members`` added. Each version's part is made once and
    kept on it (versions never change), so writing a key with thousands of versions joins strings rather
    than serialising every private key again."""
    policy = None if record.policy is None else asdict(record.policy)
    head = json.dumps({"name": record.name, "latest": record.latest, "policy": policy, **members}, **_COMPACT)
    versions = ",".join(_version_json(v) for v in record.versions.values())
    return f'{head[:-1]},"versions":[{versions}]}}'


_COMPACT: Dict[str, Any] = {"separators": (",", ":")}


def _version_json(v: KeyVersion) -> str:
    if v.stored is None:
        v.stored = json.dumps(
            {
                "version": v.version,
                "kty": v.kty,
                **_sealed_key_material(v.private_key),
                "key_ops": v.key_ops,
                "enabled": v.enabled,
                "created": v.created,
                "updated": v.updated,
                "nbf": v.nbf,
                "exp": v.exp,
                "tags": v.tags,
                **({"exportable": True} if v.exportable else {}),
                **({"release_policy": asdict(v.release_policy)} if v.release_policy else {}),
            },
            **_COMPACT,
        )
    return v.stored


class CorruptRecord(ValueError):
    """A stored key that cannot be used as it is: ``field`` names the first member found wrong, such as
    ``versions[2].kty`` or ``policy.updated``."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field} {why}")
        self.field, self.why = field, why


def _member(data: Dict[str, Any], key: str, path: str, ok: Any, what: str, optional: bool = False) -> Any:
    """``data[key]`` if ``ok(value)``; None if it is absent or null and ``optional``; else CorruptRecord."""
    value = data.get(key)
    if value is None and optional:
        return None
    if key not in data:
        raise CorruptRecord(path + key, "is missing")
    if not ok(value):
        raise CorruptRecord(path + key, f"is not {what}")
    return value


def is_integer(value: Any) -> bool:
    """An int that is not a bool (JSON's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_stamp(value: Any) -> bool:
    return is_integer(value) and 0 <= value <= MAX_CLOCK


def _is_duration(value: Any) -> bool:
    try:
        add_duration(0, value, "duration")
        return True
    except BadParameter:
        return False


def _only(data: Any, keys: Iterable[str], path: str) -> Dict[str, Any]:
    """``data`` if it is an object with no member but ``keys``."""
    if not isinstance(data, dict):
        raise CorruptRecord(path.rstrip(".") or "the key", "is not an object")
    extra = sorted(set(data) - set(keys))
    if extra:
        raise CorruptRecord(path + extra[0], "is not a member this localvault knows")
    return data


_VERSION_MEMBERS = (
    "version",
    "kty",
    "pkcs8",
    "oct",
    "key_ops",
    "enabled",
    "created",
    "updated",
    "nbf",
    "exp",
    "tags",
    "exportable",
    "release_policy",
)


def record_from_dict(data: Dict[str, Any]) -> KeyRecord:
    """Inverse of record_to_dict, every member checked: CorruptRecord names the first one wrong."""
    _only(data, ("name", "latest", "versions", "policy"), "")
    name = _member(data, "name", "", lambda v: isinstance(v, str) and NAME.match(v), "a key name")
    record = KeyRecord(name=name, policy=_policy_from_dict(data.get("policy")))
    versions = _member(data, "versions", "", lambda v: isinstance(v, list) and v, "a list of versions")
    for index, item in enumerate(versions):
        version = _version_from_dict(item, name, f"versions[{index}].")
        if version.version in record.versions:
            raise CorruptRecord(f"versions[{index}].version", "repeats another version's")
        record.versions[version.version] = version
    record.latest = _member(
        data, "latest", "", lambda v: isinstance(v, str) and v in record.versions, "one of the versions"
    )
    return record


def _version_from_dict(data: Any, name: str, path: str) -> KeyVersion:
    _only(data, _VERSION_MEMBERS, path)
    kty = _member(data, "kty", path, lambda v: isinstance(v, str) and v in KEY_TYPES, "a key type")
    family = KEY_TYPES[kty]
    material = "oct" if family == "oct" else "pkcs8"
    if ("oct" if material == "pkcs8" else "pkcs8") in data:
        raise CorruptRecord(path + material, f"is missing: a {kty} key holds its key as {material}")
    encoded = _member(data, material, path, lambda v: isinstance(v, str), "base64url")
    try:
        key = _opened_key_material(family, b64url_decode(encoded))
    except (BadParameter, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CorruptRecord(path + material, f"is not a {kty} key localvault can use ({exc})") from None
    tags = _member(data, "tags", path, _stored_tags, f"at most {MAX_TAGS} tags of strings", optional=True)
    return KeyVersion(
        name=name,
        version=_member(
            data, "version", path, lambda v: isinstance(v, str) and VERSION.match(v), "a version id"
        ),
        kty=kty,
        private_key=key,
        key_ops=_member(
            data,
            "key_ops",
            path,
            lambda v: isinstance(v, list) and all(op in STORED_OPS for op in v),
            "key operations",
        ),
        enabled=_member(data, "enabled", path, lambda v: isinstance(v, bool), "true or false"),
        created=_member(data, "created", path, _is_stamp, "a date"),
        updated=_member(data, "updated", path, _is_stamp, "a date"),
        nbf=_member(data, "nbf", path, is_integer, "a date", optional=True),
        exp=_member(data, "exp", path, is_integer, "a date", optional=True),
        tags=None if tags is None else dict(tags),
        exportable=bool(
            _member(data, "exportable", path, lambda v: isinstance(v, bool), "a boolean", optional=True)
        ),
        release_policy=_release_policy_from_dict(data.get("release_policy"), path + "release_policy."),
    )


def _release_policy_from_dict(data: Any, path: str) -> Optional[ReleasePolicy]:
    if data is None:
        return None
    _only(data, ("data", "content_type", "immutable"), path)
    return ReleasePolicy(
        data=_member(data, "data", path, lambda v: isinstance(v, str), "base64url"),
        content_type=_member(data, "content_type", path, lambda v: isinstance(v, str), "a content type"),
        immutable=_member(data, "immutable", path, lambda v: isinstance(v, bool), "true or false"),
    )


def _stored_tags(tags: Any) -> bool:
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        return False
    try:
        validate_tags(tags)
        return True
    except BadParameter:
        return False


def _policy_from_dict(data: Any) -> Optional[RotationPolicy]:
    if data is None:
        return None
    _only(data, ("lifetime_actions", "expiry_time", "created", "updated"), "policy.")
    actions = []
    listed = _member(data, "lifetime_actions", "policy.", lambda v: isinstance(v, list), "a list of actions")
    for index, item in enumerate(listed):
        path = f"policy.lifetime_actions[{index}]."
        _only(item, ("action", "trigger", "duration"), path)
        actions.append(
            LifetimeAction(
                _member(item, "action", path, lambda v: v in (ROTATE, NOTIFY), f"{ROTATE} or {NOTIFY}"),
                _member(item, "trigger", path, lambda v: v in TRIGGERS, " or ".join(TRIGGERS)),
                _member(item, "duration", path, _is_duration, "an ISO 8601 duration"),
            )
        )
    return RotationPolicy(
        actions,
        _member(data, "expiry_time", "policy.", _is_duration, "an ISO 8601 duration", optional=True),
        _member(data, "created", "policy.", _is_stamp, "a date", optional=True),
        _member(data, "updated", "policy.", _is_stamp, "a date", optional=True),
    )


def deleted_from_dict(record: KeyRecord, data: Any) -> DeletedKey:
    """A deleted key's dates, as the data directory keeps them (``{"date", "purge"}``)."""
    _only(data, ("date", "purge"), "deleted.")
    return DeletedKey(
        record,
        _member(data, "date", "deleted.", _is_stamp, "a date"),
        _member(data, "purge", "deleted.", _is_stamp, "a date"),
    )


def _sealed_key_material(key: PrivateKey) -> Dict[str, str]:
    """The private key, as backups hold it: PKCS#8 for RSA, EC and OKP, the raw bytes for oct."""
    if isinstance(key, bytes):
        return {"oct": b64url_encode(key)}
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"pkcs8": b64url_encode(der)}


def _opened_key_material(family: str, raw: bytes) -> PrivateKey:
    """Inverse of _sealed_key_material, for a key of ``family``. The size is bounded before any check of
    the numbers, and cryptography's slow check (primality) is left out: the cheap one finds damage."""
    if family == "oct":
        if len(raw) * 8 not in SYMMETRIC_SIZES:
            raise ValueError(f"an AES key of {len(raw)} bytes")
        return raw
    key = serialization.load_der_private_key(raw, None, unsafe_skip_rsa_key_validation=True)
    if family == "EC":
        if not isinstance(key, ec.EllipticCurvePrivateKey) or type(key.curve).__name__ not in _CURVE_TYPES:
            raise ValueError("not a key on a supported curve")
        return key
    if family == "OKP":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("not an Ed25519 key")
        return key
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size not in RSA_SIZES:
        raise ValueError(f"not an RSA key of {', '.join(map(str, RSA_SIZES))} bits")
    numbers = key.private_numbers()
    public = numbers.public_numbers
    if public.e.bit_length() > 8 * MAX_RSA_EXPONENT_BYTES:
        raise ValueError("its public exponent is too long")
    check_rsa_numbers(
        (numbers.p, numbers.q, numbers.d, numbers.dmp1, numbers.dmq1, numbers.iqmp, public.e, public.n)
    )
    return key
