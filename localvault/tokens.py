"""Access tokens the vault issues from its managed-identity endpoint and checks on every request."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Iterable, Optional, Union

import jwt

VAULT_RESOURCE = "https://vault.azure.net"
MANAGED_HSM_RESOURCE = "https://managedhsm.azure.net"
ISSUER = "https://localvault.invalid/"
TENANT_ID = "00000000-0000-0000-0000-00000000abcd"
TOKEN_LIFETIME = 3600
_ALGORITHM = "HS256"


class TokenIssuer:
    """Signs tokens with a per-vault secret (HMAC-SHA256) and verifies signature, audience and expiry."""

    def __init__(
        self,
        secret: Optional[bytes] = None,
        lifetime: int = TOKEN_LIFETIME,
        principal_id: Optional[str] = None,
    ) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self.lifetime = lifetime
        self.principal_id = principal_id or str(uuid.uuid4())

    def issue(self, audience: str, now: Optional[float] = None, lifetime: Optional[int] = None) -> tuple:
        """A signed token and its expiry (Unix seconds)."""
        issued = int(time.time() if now is None else now)
        expires = issued + (self.lifetime if lifetime is None else lifetime)
        claims = {
            "aud": audience,
            "iss": ISSUER,
            "iat": issued,
            "nbf": issued,
            "exp": expires,
            "oid": self.principal_id,
            "sub": self.principal_id,
            "tid": TENANT_ID,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), expires

    def verify(self, token: str, audience: Union[str, Iterable[str]] = VAULT_RESOURCE) -> bool:
        try:
            jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=audience,
                issuer=ISSUER,
                options={"require": ["exp", "aud", "iss"]},
            )
        except jwt.PyJWTError:
            return False
        return True
