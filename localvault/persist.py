"""A vault's state in a directory (``--data DIR``), kept across restarts and ``kill -9``.

Layout of DIR (created 0700; every file 0600)::

    localvault.json   format and, when encrypted, the KDF's parameters and salt, and a passphrase check
    secrets.json      identity secret, token-signing key, backup-sealing key, CA private key (sealed)
    ca.pem            the CA certificate (public): LOCALVAULT_CA_FILE points here
    clock.json        the clock's offset
    keys/<name>.json  one key: all its versions with their private parts, its rotation policy, and
                      whether it is deleted (sealed)
    lock              held (flock) while a vault uses DIR: from LocalVault.start() to stop()

With ``LOCALVAULT_DATA_KEY`` set when DIR is created, "sealed" files are AES-256-GCM encrypted with a
key derived from it by scrypt (salt in localvault.json), each bound to its own file name. Without it
they are plain JSON. Key names are not secret (they are in every key id and URL): file names show them.

At each start every member of every file is checked before anything is served, the KDF's parameters
before it runs; a bad one is a DataDirError naming the file and the member. DIR holds no symbolic links.

Each change rewrites only the file it concerns: a temporary file is written and fsynced, renamed over
the old one, and the directory fsynced, before the store's method returns, so before any answer. The
store makes these writes outside its lock, one key's in order, so a slow write stalls only the requests
that wait for that key (see KeyStore._locked).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import uuid
import warnings
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import tls
from .clock import Clock, valid_offset
from .models import (
    CorruptRecord,
    DeletedKey,
    KeyRecord,
    KeyStore,
    deleted_from_dict,
    is_integer,
    record_from_dict,
    record_json,
)
from .tokens import TokenIssuer

try:
    import fcntl
except ImportError:  # Windows: no lock against a second vault on the same DIR
    fcntl = None  # type: ignore[assignment]

DATA_KEY_VARIABLE = "LOCALVAULT_DATA_KEY"
FORMAT = 1
META, SECRETS, CA, CLOCK, LOCK, KEYS = (
    "localvault.json",
    "secrets.json",
    "ca.pem",
    "clock.json",
    "lock",
    "keys",
)
SCRYPT = {"n": 2**15, "r": 8, "p": 1}  # about 32 MiB and a tenth of a second, once per start
# What an existing DIR's localvault.json may ask scrypt for: checked before it runs.
MAX_SCRYPT = {"n": 2**20, "r": 32, "p": 16}
MAX_SCRYPT_MEMORY = 256 * 2**20  # 128 * n * r bytes
_SEALED = b"LVSEALED1"
_CHECK = b"localvault data key"
_TMP = ".tmp-"
_PLAIN_NAME = re.compile(r"^[0-9a-z-]{1,127}$")


class DataDirError(ValueError):
    """A data directory that cannot be used as it is; the message says which and why."""


class UnencryptedDataWarning(UserWarning):
    """A new data directory was made without LOCALVAULT_DATA_KEY: secrets are kept unencrypted."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _bounded(most: int) -> Callable[[Any], bool]:
    return lambda value: is_integer(value) and 1 <= value <= most


def _scrypt_n(value: Any) -> bool:
    return is_integer(value) and 2 <= value <= MAX_SCRYPT["n"] and value & (value - 1) == 0


def _bytes_of(text: Any, least: int, most: int) -> bool:
    """Whether ``text`` is base64 of ``least`` to ``most`` bytes."""
    if not isinstance(text, str) or len(text) > 4 * most:
        return False
    try:
        return least <= len(_unb64(text)) <= most
    except ValueError:
        return False


def _secret_text(value: Any) -> bool:
    return isinstance(value, str) and 16 <= len(value) <= 256 and all("!" <= c <= "~" for c in value)


def _is_uuid(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _derive(passphrase: str, salt: bytes, params: Dict[str, int]) -> bytes:
    return Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(
        passphrase.encode()
    )


class DataDir:
    """An open data directory: its secrets, and the journal a KeyStore writes its changes to."""

    def __init__(self, path: str, passphrase: Optional[str], backup_secret: Optional[bytes] = None) -> None:
        self.path = os.path.abspath(path)
        self._aead: Optional[AESGCM] = None
        self._lock_fd: Optional[int] = None
        self._dir_fds: Dict[str, int] = {}
        self._write_lock = threading.Lock()
        self._closed = False
        passphrase = passphrase or None
        try:
            self._prepare_dir()
            if os.path.exists(self._file(META)):
                self._open_existing(passphrase)
            else:
                self._create(passphrase, backup_secret)
            if backup_secret is not None and backup_secret != self.backup_key:
                raise DataDirError(
                    f"{self.path} seals backups with its own key, not the backup_secret given; "
                    "leave backup_secret out to use it."
                )
            self.keys, self.deleted = self._read_keys()
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _prepare_dir(self) -> None:
        """Create DIR, or check that it is a data directory or empty, before changing anything in it;
        then make it owner-only and lock it."""
        try:
            if not os.path.isdir(self.path):
                if os.path.lexists(self.path):
                    raise DataDirError(f"{self.path} is not a directory; choose a directory for --data.")
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                os.mkdir(self.path, 0o700)
            if not os.path.exists(self._file(META)) and not self._interrupted_creation():
                raise DataDirError(
                    f"{self.path} is not empty and holds no localvault state ({META} is missing); "
                    "choose a new or empty directory for --data."
                )
            self._refuse_links()
            os.chmod(self.path, 0o700)
            nofollow = getattr(os, "O_NOFOLLOW", 0)  # and a link planted since is not followed
            self._lock_fd = os.open(self._file(LOCK), os.O_RDWR | os.O_CREAT | nofollow, 0o600)
            os.fchmod(self._lock_fd, 0o600)
        except OSError as exc:
            raise DataDirError(f"cannot use {self.path} as a data directory: {exc.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise DataDirError(
                    f"{self.path} is in use by another localvault; stop it first, or choose another --data."
                ) from None

    def _refuse_links(self) -> None:
        """DIR holds its own files only: a symbolic link in it (to ``keys/``, ``lock`` or a file) would
        have localvault change modes or write where it points."""
        for relative in ("", KEYS):
            if relative and not os.path.isdir(self._file(relative)):
                continue
            for entry in os.listdir(self._file(relative)):
                path = os.path.join(self._file(relative), entry)
                if os.path.islink(path):
                    raise DataDirError(
                        f"{path} is a symbolic link; localvault uses no links in its data directory: "
                        "put the file itself there, or remove it."
                    )

    def _create(self, passphrase: Optional[str], backup_secret: Optional[bytes]) -> None:
        meta: Dict[str, Any] = {"format": FORMAT, "encrypted": passphrase is not None}
        if passphrase is not None:
            salt = os.urandom(16)
            self._aead = AESGCM(_derive(passphrase, salt, SCRYPT))
            meta["kdf"] = {"name": "scrypt", "salt": _b64(salt), **SCRYPT}
            meta["check"] = _b64(self._seal(_CHECK, META))
        else:
            warnings.warn(
                f"{self.path} is new and not encrypted: key material and secrets are kept in plain form. "
                f"Set {DATA_KEY_VARIABLE} to a passphrase before creating it to encrypt them.",
                UnencryptedDataWarning,
                stacklevel=4,  # the caller of LocalVault()
            )
        authority = tls.new_authority()
        self.identity_secret = secrets.token_urlsafe(24)
        self.token_key = secrets.token_bytes(32)
        self.principal_id = str(uuid.uuid4())
        self.backup_key = backup_secret or AESGCM.generate_key(bit_length=256)
        self.authority = authority
        os.makedirs(self._file(KEYS), mode=0o700, exist_ok=True)
        os.chmod(self._file(KEYS), 0o700)
        self._write(SECRETS, self._seal(json.dumps(self._secrets_dict()).encode(), SECRETS))
        self._write(CA, authority.cert_pem())
        self._write(CLOCK, b'{"offset": 0.0}')
        self.clock_offset = 0.0
        self._write(META, json.dumps(meta).encode())  # last: DIR is complete once it exists

    def _interrupted_creation(self) -> bool:
        """Whether DIR holds nothing, or only what a creation that stopped before its end wrote."""
        for entry in os.listdir(self.path):
            if entry in (LOCK, SECRETS, CA, CLOCK) or entry.startswith(_TMP):
                continue
            if entry == KEYS and os.path.isdir(self._file(KEYS)) and not os.listdir(self._file(KEYS)):
                continue
            return False
        return True

    def _open_existing(self, passphrase: Optional[str]) -> None:
        meta = self._read_json(META, sealed=False)
        if not (is_integer(meta.get("format")) and meta["format"] == FORMAT):
            raise DataDirError(f"{self._file(META)} is of an unknown format; this localvault cannot use it.")
        encrypted = self._field(META, meta, "encrypted", lambda v: isinstance(v, bool), "true or false")
        if encrypted:
            if passphrase is None:
                raise DataDirError(
                    f"{self.path} is encrypted: set {DATA_KEY_VARIABLE} to the passphrase it was created with."
                )
            # every parameter bounded before scrypt runs: a hostile n or r would take minutes and GiB
            kdf = self._field(META, meta, "kdf", lambda v: isinstance(v, dict), "an object")
            self._field(META, kdf, "name", lambda v: v == "scrypt", "scrypt", "kdf.")
            salt = self._field(
                META, kdf, "salt", lambda v: _bytes_of(v, 16, 64), "16 to 64 bytes of base64", "kdf."
            )
            params = {
                "n": self._field(META, kdf, "n", _scrypt_n, f"a power of 2 up to {MAX_SCRYPT['n']}", "kdf."),
                "r": self._field(
                    META, kdf, "r", _bounded(MAX_SCRYPT["r"]), f"1 to {MAX_SCRYPT['r']}", "kdf."
                ),
                "p": self._field(
                    META, kdf, "p", _bounded(MAX_SCRYPT["p"]), f"1 to {MAX_SCRYPT['p']}", "kdf."
                ),
            }
            if 128 * params["n"] * params["r"] > MAX_SCRYPT_MEMORY:
                raise self._corrupt(
                    META, "kdf.n", f"with kdf.r needs more than {MAX_SCRYPT_MEMORY >> 20} MiB"
                )
            size = len(_SEALED) + 12 + len(_CHECK) + 16
            check = self._field(META, meta, "check", lambda v: _bytes_of(v, size, size), "a sealed check")
            self._aead = AESGCM(_derive(passphrase, _unb64(salt), params))
            try:
                self._open(_unb64(check), META)
            except DataDirError:
                raise DataDirError(
                    f"{DATA_KEY_VARIABLE} is not the passphrase {self.path} was created with."
                ) from None
        elif passphrase is not None:
            raise DataDirError(
                f"{self.path} was created without {DATA_KEY_VARIABLE} and is not encrypted; unset "
                f"{DATA_KEY_VARIABLE} to use it, or choose a new directory to keep keys encrypted."
            )
        self._remove_temporaries("")
        data, ca_pem = self._read_json(SECRETS), self._read(CA)
        self.identity_secret = self._field(
            SECRETS, data, "identity_secret", _secret_text, "16 to 256 visible ASCII characters"
        )
        self.token_key = _unb64(
            self._field(SECRETS, data, "token_key", lambda v: _bytes_of(v, 32, 32), "32 bytes")
        )
        self.principal_id = self._field(SECRETS, data, "principal_id", _is_uuid, "a UUID")
        self.backup_key = _unb64(
            self._field(SECRETS, data, "backup_key", lambda v: _bytes_of(v, 32, 32), "32 bytes")
        )
        ca_key = self._field(SECRETS, data, "ca_key", lambda v: isinstance(v, str), "a PEM private key")
        try:
            self.authority = tls.Authority.from_pem(ca_pem, ca_key.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise self._corrupt(CA, "", "does not hold the CA of the key in secrets.json") from None
        clock = self._read_json(CLOCK, sealed=False)
        self.clock_offset = float(
            self._field(CLOCK, clock, "offset", valid_offset, "a finite offset ahead of now")
        )

    def _remove_temporaries(self, relative: str) -> None:
        """Remove what writes that a crash interrupted left: the files they meant to replace hold."""
        for entry in os.listdir(self._file(relative)):
            if entry.startswith(_TMP):
                os.unlink(os.path.join(self._file(relative), entry))

    def _secrets_dict(self) -> Dict[str, str]:
        return {
            "identity_secret": self.identity_secret,
            "token_key": _b64(self.token_key),
            "principal_id": self.principal_id,
            "backup_key": _b64(self.backup_key),
            "ca_key": self.authority.key_pem().decode(),
        }

    def _read_keys(self) -> Tuple[List[KeyRecord], List[DeletedKey]]:
        keys: List[KeyRecord] = []
        deleted: List[DeletedKey] = []
        self._remove_temporaries(KEYS)
        for entry in sorted(os.listdir(self._file(KEYS))):
            relative = os.path.join(KEYS, entry)
            data = self._read_json(relative)
            try:
                gone = data.pop("deleted", None)
                record = record_from_dict(data)
                if gone is None:
                    keys.append(record)
                else:
                    deleted.append(deleted_from_dict(record, gone))
            except CorruptRecord as exc:
                raise self._corrupt(relative, exc.field, exc.why) from None
            if self._file_name(record.name.lower()) != entry:
                raise self._corrupt(
                    relative, "name", f"is {record.name!r}, another key's name than its file's"
                )
        return keys, deleted

    def _corrupt(self, relative: str, field: str = "", why: str = "") -> DataDirError:
        what = f" ({field} {why})" if field else f" ({why})" if why else ""
        return DataDirError(
            f"{self._file(relative)} is corrupt{what}; localvault leaves it as it is. Restore it from a copy, "
            "or remove it (losing what it held)."
        )

    def _field(
        self,
        relative: str,
        data: Dict[str, Any],
        key: str,
        ok: Callable[[Any], bool],
        what: str,
        prefix: str = "",
    ) -> Any:
        """``data[key]``, if ``ok`` says it is usable; otherwise the file is corrupt, and the message names
        the member (``prefix`` + ``key``) and what it should be."""
        if key not in data:
            raise self._corrupt(relative, prefix + key, "is missing")
        if not ok(data[key]):
            raise self._corrupt(relative, prefix + key, f"is not {what}")
        return data[key]

    def _read(self, relative: str) -> bytes:
        try:
            with open(self._file(relative), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise DataDirError(
                f"{self._file(relative)} is missing; the data directory is incomplete."
            ) from None
        except OSError as exc:
            raise DataDirError(f"cannot read {self._file(relative)}: {exc.strerror}") from None

    def _read_json(self, relative: str, sealed: bool = True) -> Dict[str, Any]:
        raw = self._read(relative)
        try:
            data = json.loads(self._open(raw, relative) if sealed else raw)
        except (ValueError, UnicodeDecodeError):
            raise self._corrupt(relative) from None
        if not isinstance(data, dict):
            raise self._corrupt(relative)
        return data

    # -- sealing ----------------------------------------------------------------------------------

    def _seal(self, data: bytes, relative: str) -> bytes:
        if self._aead is None:
            return data
        nonce = os.urandom(12)
        return _SEALED + nonce + self._aead.encrypt(nonce, data, relative.encode())

    def _open(self, data: bytes, relative: str) -> bytes:
        if self._aead is None:
            return data
        head = len(_SEALED) + 12
        if not data.startswith(_SEALED) or len(data) < head + 16:
            raise self._corrupt(relative)
        try:
            return self._aead.decrypt(data[len(_SEALED) : head], data[head:], relative.encode())
        except InvalidTag:
            raise self._corrupt(relative) from None

    # -- writing ----------------------------------------------------------------------------------

    def _write(self, relative: str, data: bytes) -> None:
        """Replace the file atomically and durably: temporary file, fsync, rename, fsync of the directory."""
        if self._closed:
            raise DataDirError(f"{self.path} is closed; start the vault again to change its keys.")
        path = self._file(relative)
        directory, name = os.path.split(path)
        temporary = os.path.join(directory, f"{_TMP}{name}-{uuid.uuid4().hex[:8]}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        self._sync_dir(directory)

    def _remove(self, relative: str) -> None:
        if self._closed:
            raise DataDirError(f"{self.path} is closed; start the vault again to change its keys.")
        path = self._file(relative)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        self._sync_dir(os.path.dirname(path))

    def _sync_dir(self, directory: str) -> None:
        with self._write_lock:
            fd = self._dir_fds.get(directory)
            if fd is None:
                fd = self._dir_fds[directory] = os.open(directory, os.O_RDONLY)
        os.fsync(fd)

    @staticmethod
    def _file_name(lower: str) -> str:
        if _PLAIN_NAME.match(lower):
            return f"{lower}.json"
        return f"x{base64.b32encode(lower.encode()).decode().rstrip('=').lower()}.json"[:250]

    # -- the journal (see journal.Journal) ---------------------------------------------------------

    def key_changed(self, lower: str, record: Optional[KeyRecord], deleted: Optional[DeletedKey]) -> None:
        relative = os.path.join(KEYS, self._file_name(lower))
        if deleted is not None:
            record = deleted.record
        if record is None:
            self._remove(relative)
            return
        gone = (
            {}
            if deleted is None
            else {"deleted": {"date": deleted.deleted_date, "purge": deleted.scheduled_purge_date}}
        )
        self._write(relative, self._seal(record_json(record, **gone).encode(), relative))

    def save_clock(self, offset: float) -> None:
        self._write(CLOCK, json.dumps({"offset": offset}).encode())

    # -- what a vault takes from it ---------------------------------------------------------------

    @property
    def ca_file(self) -> str:
        return self._file(CA)

    def token_issuer(self) -> TokenIssuer:
        return TokenIssuer(self.token_key, principal_id=self.principal_id)

    def clock(self) -> PersistedClock:
        clock = PersistedClock()
        clock.bind(self)
        return clock

    def secrets(self) -> Tuple[str, bytes, bytes, str]:
        """What identifies the vault kept here: a restart with other secrets would not be the same vault."""
        return self.identity_secret, self.token_key, self.backup_key, self.principal_id

    def attach(self, store: KeyStore) -> None:
        """Give ``store`` the keys read from DIR, and have it record each change here."""
        store.load(self.keys, self.deleted, self)
        self.keys, self.deleted = [], []

    def close(self) -> None:
        """Stop writing and let another vault use DIR."""
        self._closed = True
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


class PersistedClock(Clock):
    """A clock whose offset is written to DIR before a move of it returns."""

    def __init__(self) -> None:
        super().__init__()
        self._data: Optional[DataDir] = None
        self._persist_lock = threading.Lock()

    def bind(self, data: DataDir) -> None:
        """Take the offset kept in ``data`` and keep each move there."""
        with self._persist_lock, self._lock:
            self._data, self._offset = data, data.clock_offset

    def _save(self, offset: float) -> None:
        assert self._data is not None, "PersistedClock.bind() first"
        self._data.save_clock(offset)

    def advance(
        self,
        delta: Optional[timedelta] = None,
        *,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
    ) -> float:
        step = (delta or timedelta()) + timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        with self._persist_lock:
            offset = self._moved(step)
            self._save(offset)  # first: a move that cannot be written changes nothing
            with self._lock:
                self._offset = offset
            return offset

    def reset(self) -> None:
        with self._persist_lock:
            if self._offset != 0.0:
                self._save(0.0)
                super().reset()
