"""Errors that carry the service's HTTP status, error code and message."""

from __future__ import annotations

from typing import ClassVar, Dict, Optional

KEY_NOT_FOUND_HELP = (
    "If you recently deleted this key you may be able to recover it using the correct recovery command. "
    "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
)


class VaultError(Exception):
    """A failure the service reports as ``{"error": {"code", "message", "innererror"?}}``."""

    status = 400
    code = "BadParameter"
    headers: ClassVar[Dict[str, str]] = {}  # response headers the error adds, such as Retry-After

    def __init__(self, message: str, *, inner_code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.inner_code = inner_code

    def for_managed_hsm(self, base_url: str, path: str) -> VaultError:
        """The same failure in a Managed HSM's words (``path``: the request's, without the query)."""
        return self

    def body(self) -> dict:
        error: dict = {"code": self.code, "message": self.message}
        if self.inner_code:
            error["innererror"] = {"code": self.inner_code}
        return {"error": error}


class BadParameter(VaultError):
    status = 400
    code = "BadParameter"

    # Key release policies: a vault's words (AKV.SKR.*); a Managed HSM drops the code (and the final stop)
    @classmethod
    def _skr(cls, code: str, text: str, managed_hsm: bool) -> BadParameter:
        return cls(text if managed_hsm else f"AKV.SKR.{code}: {text}.")

    @classmethod
    def exportable_without_release_policy(cls, managed_hsm: bool) -> BadParameter:
        return cls._skr("1004", "Exportable keys must have release policy", managed_hsm)

    @classmethod
    def release_policy_not_exportable(cls, managed_hsm: bool) -> BadParameter:
        return cls._skr("1005", "Non-exportable keys must not have release policy", managed_hsm)

    @classmethod
    def immutable_release_policy(cls, managed_hsm: bool) -> BadParameter:
        return cls._skr("1020", "Immutable Key Release Policy cannot be modified", managed_hsm)


class MalformedBackupBlob(VaultError):
    """A blob that is not a backup this vault can open; a Managed HSM takes it for another domain's."""

    status = 400
    code = "Malformed backup blob"

    def __init__(self) -> None:
        super().__init__("Backup blob contains invalid or corrupt version.")

    def for_managed_hsm(self, base_url: str, path: str) -> VaultError:
        error = VaultError(
            "Backup blob belongs to a different crypto domain and cannot be used with this instance."
        )
        error.code = "MalformedBackupBlob"
        return error


class Unauthorized(VaultError):
    status = 401
    code = "Unauthorized"


class Forbidden(VaultError):
    status = 403
    code = "Forbidden"

    permission = ""  # the key permission an access policy lacked

    @classmethod
    def access_denied(cls, permission: str, principal_id: str, tenant_id: str, vault: str) -> Forbidden:
        """The service's answer to a caller whose access policy lacks a key permission."""
        denied = cls(
            f"The user, group or application 'appid={principal_id};oid={principal_id};"
            f"iss=https://sts.windows.net/{tenant_id}/' does not have keys {permission} permission on key "
            f"vault '{vault}'. For help resolving this issue, please see "
            "https://go.microsoft.com/fwlink/?linkid=2125287",
            inner_code="AccessDenied",
        )
        denied.permission = permission
        return denied

    def for_managed_hsm(self, base_url: str, path: str) -> VaultError:
        if not self.permission:
            return self
        # Managed HSM grants data actions by local RBAC, on a scope: / , /keys or /keys/NAME
        action = MANAGED_HSM_DATA_ACTIONS.get(self.permission.lower(), "keys/read/action")
        parts = [p for p in path.split("/") if p][:2]
        scope = "/keys" + (f"/{parts[1]}" if len(parts) == 2 and parts[0] in ("keys", "deletedkeys") else "")
        error = VaultError(f"Not authorized to access Microsoft.KeyVault/managedHsm/{action} on {scope}")
        error.status, error.code = 403, "AccessDenied"
        return error

    @classmethod
    def purge_protected(cls, vault: str) -> Forbidden:
        return cls(
            'Operation "purge" is not allowed because purge protection is enabled for this vault. '
            "Key Vault service will automatically purge it after the retention period has passed."
            f"\r\nVault: {vault}"
        )

    @classmethod
    def hardware_key_on_standard(cls) -> Forbidden:
        return cls("Hardware key operation not allowed on standard vault")


# Managed HSM's local-RBAC data actions (Microsoft.KeyVault/managedHsm/...) for each key permission
MANAGED_HSM_DATA_ACTIONS = {
    "get": "keys/read/action",
    "list": "keys/read/action",
    "create": "keys/create",
    "update": "keys/write/action",
    "import": "keys/import/action",
    "delete": "keys/delete",
    "recover": "keys/deletedKeys/recover/action",
    "purge": "keys/deletedKeys/delete",
    "backup": "keys/backup/action",
    "restore": "keys/restore/action",
    "encrypt": "keys/encrypt/action",
    "decrypt": "keys/decrypt/action",
    "wrapkey": "keys/wrap/action",
    "unwrapkey": "keys/unwrap/action",
    "sign": "keys/sign/action",
    "verify": "keys/verify/action",
    "release": "keys/release/action",
    "rotate": "keys/rotate/action",
    "getrotationpolicy": "keys/read/action",
    "setrotationpolicy": "keys/write/action",
}


class NotFound(VaultError):
    """An unknown path: the service's generic 404."""

    status = 404
    code = "NotFound"


class KeyNotFound(VaultError):
    status = 404
    code = "KeyNotFound"
    resource = ""  # keys/NAME[/VERSION] or deletedkeys/NAME: how a Managed HSM names what it did not find

    @classmethod
    def _of(cls, message: str, resource: str) -> KeyNotFound:
        error = cls(message)
        error.resource = resource
        return error

    @classmethod
    def for_key(cls, name: str) -> KeyNotFound:
        return cls._of(
            f"A key with (name/id) {name} was not found in this key vault. {KEY_NOT_FOUND_HELP}", f"keys/{name}"
        )

    @classmethod
    def for_version(cls, name: str, version: str) -> KeyNotFound:
        return cls._of(
            f"A key with (name/id) {name}/{version} was not found in this key vault. {KEY_NOT_FOUND_HELP}",
            f"keys/{name}/{version}",
        )

    @classmethod
    def deleted(cls, name: str) -> KeyNotFound:
        return cls._of(f"Deleted Key not found: {name}", f"deletedkeys/{name}")

    def for_managed_hsm(self, base_url: str, path: str) -> VaultError:
        return KeyNotFound(f"Key not found: {base_url}/{self.resource}") if self.resource else self


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

    @classmethod
    def being_deleted(cls, name: str, recreate: bool = True) -> Conflict:
        """A name whose deletion has not completed: re-created (the first message), or recovered or
        purged (the shorter message the service gives there)."""
        message = (
            f"Key {name} is currently being deleted and cannot be re-created; retry later."
            if recreate
            else "Key is currently being deleted."
        )
        return cls(message, inner_code="ObjectIsBeingDeleted")

    @classmethod
    def being_recovered(cls, name: str) -> Conflict:
        return cls(f"Key {name} is currently being recovered and cannot be re-created; retry later.")


class Throttled(VaultError):
    status = 429
    code = "Throttled"
    headers: ClassVar[Dict[str, str]] = {"Retry-After": "1"}


class InternalServerError(VaultError):
    status = 500
    code = "InternalServerError"


class ServiceUnavailable(VaultError):
    status = 503
    code = "ServiceUnavailable"


class PayloadTooLarge(VaultError):
    status = 413
    code = "RequestEntityTooLarge"
