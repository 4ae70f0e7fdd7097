"""Access tokens the vault issues from its managed-identity endpoint and checks on every request."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import OrderedDict
from typing import Iterable, Optional, Tuple, Union

import jwt

VAULT_RESOURCE = "https://vault.azure.net"
MANAGED_HSM_RESOURCE = "https://managedhsm.azure.net"
ISSUER = "https://localvault.invalid/"
TENANT_ID = "00000000-0000-0000-0000-00000000abcd"
TOKEN_LIFETIME = 3600
_ALGORITHM = "HS256"
MAX_CACHED = 1024  # verified tokens whose claims are kept, the least recently used dropped first
_now = time.time  # what expiry is checked against, as PyJWT checks it


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
        # token -> (audiences, not before, expiry) of a token whose signature and issuer were verified
        self._verified: OrderedDict[str, Tuple[Tuple[str, ...], float, float]] = OrderedDict()
        self._lock = threading.Lock()

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
        """Signature, issuer, audience and expiry. The signature is checked once per token, its claims
        kept until it expires; audience and time are checked on every use."""
        wanted = {audience} if isinstance(audience, str) else set(audience)
        with self._lock:
            claims = self._verified.get(token)
            if claims is not None:
                self._verified.move_to_end(token)
        if claims is None:
            try:
                decoded = jwt.decode(
                    token,
                    self._secret,
                    algorithms=[_ALGORITHM],
                    audience=list(wanted),
                    issuer=ISSUER,
                    options={"require": ["exp", "aud", "iss"]},
                )
            except jwt.PyJWTError:
                return False
            aud = decoded["aud"]
            claims = ((aud,) if isinstance(aud, str) else tuple(aud), decoded.get("nbf", 0), decoded["exp"])
            with self._lock:
                self._verified[token] = claims
                if len(self._verified) > MAX_CACHED:
                    self._verified.popitem(last=False)
        audiences, not_before, expires = claims
        now = _now()
        if now >= expires:
            with self._lock:
                self._verified.pop(token, None)
            return False
        return now >= not_before and not wanted.isdisjoint(audiences)
