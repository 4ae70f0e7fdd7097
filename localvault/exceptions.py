"""Errors that carry the service's HTTP status, error code and message."""

from __future__ import annotations

from typing import Optional

KEY_NOT_FOUND_HELP = (
    "If you recently deleted this key you may be able to recover it using the correct recovery command. "
    "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
)


class VaultError(Exception):
    """A failure the service reports as ``{"error": {"code", "message", "innererror"?}}``."""

    status = 400
    code = "BadParameter"

    def __init__(self, message: str, *, inner_code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.inner_code = inner_code

    def body(self) -> dict:
        error: dict = {"code": self.code, "message": self.message}
        if self.inner_code:
            error["innererror"] = {"code": self.inner_code}
        return {"error": error}


class BadParameter(VaultError):
    status = 400
    code = "BadParameter"


class Unauthorized(VaultError):
    status = 401
    code = "Unauthorized"


class Forbidden(VaultError):
    status = 403
    code = "Forbidden"


class NotFound(VaultError):
    """An unknown path: the service's generic 404."""

    status = 404
    code = "NotFound"


class KeyNotFound(VaultError):
    status = 404
    code = "KeyNotFound"

    @classmethod
    def for_key(cls, name: str) -> KeyNotFound:
        return cls(f"A key with (name/id) {name} was not found in this key vault. {KEY_NOT_FOUND_HELP}")

    @classmethod
    def for_version(cls, name: str, version: str) -> KeyNotFound:
        return cls(
            f"A key with (name/id) {name}/{version} was not found in this key vault. {KEY_NOT_FOUND_HELP}"
        )

    @classmethod
    def deleted(cls, name: str) -> KeyNotFound:
        return cls(f"Deleted Key not found: {name}")


class MethodNotAllowed(VaultError):
    status = 405
    code = "MethodNotAllowed"


class Conflict(VaultError):
    status = 409
    code = "Conflict"

    @classmethod
    def deleted_but_recoverable(cls, name: str) -> Conflict:
        return cls(
            f"Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; "
            "in this state, the key can only be recovered or purged.",
            inner_code="ObjectIsDeletedButRecoverable",
        )


class PayloadTooLarge(VaultError):
    status = 413
    code = "RequestEntityTooLarge"
