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
        # token -> (audiences, issuer, not before, expiry) of a token whose signature was verified
        self._verified: OrderedDict[str, Tuple[Tuple[str, ...], str, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(
        self, audience: str, now: Optional[float] = None, lifetime: Optional[int] = None, issuer: str = ISSUER
    ) -> tuple:
        """A signed token and its expiry (Unix seconds); another ``issuer`` makes one the vault refuses."""
        issued = int(time.time() if now is None else now)
        expires = issued + (self.lifetime if lifetime is None else lifetime)
        claims = {
            "aud": audience,
            "iss": issuer,
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
        return self.problem(token, audience) is None

    def problem(
        self, token: str, audience: Union[str, Iterable[str]] = VAULT_RESOURCE
    ) -> Optional[Tuple[str, str]]:
        """None for a token that may be used now, else what is wrong with it: ``("signature", "")``,
        ``("issuer", iss)``, ``("audience", aud)``, ``("expired", "")`` or ``("not yet valid", "")``."""
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
                    options={"require": ["exp", "aud", "iss"], "verify_aud": False, "verify_exp": False,
                             "verify_nbf": False, "verify_iat": False, "verify_iss": False},
                )
                aud, iss = decoded["aud"], decoded["iss"]
                audiences = (aud,) if isinstance(aud, str) else tuple(aud)
                claims = (tuple(map(str, audiences)), str(iss), float(decoded.get("nbf", 0)), float(decoded["exp"]))
            except (jwt.PyJWTError, TypeError, ValueError):
                return ("signature", "")
            with self._lock:
                self._verified[token] = claims
                if len(self._verified) > MAX_CACHED:
                    self._verified.popitem(last=False)
        audiences, issuer, not_before, expires = claims
        if issuer != ISSUER:
            return ("issuer", issuer)
        if wanted.isdisjoint(audiences):
            return ("audience", ", ".join(audiences))
        now = _now()
        if now >= expires:
            with self._lock:
                self._verified.pop(token, None)
            return ("expired", "")
        if now < not_before:
            return ("not yet valid", "")
        return None
