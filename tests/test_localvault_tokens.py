"""Token verification: a token's signature is checked once and its claims kept; audience and expiry are
checked on every use."""

from __future__ import annotations

from typing import List

import jwt
import pytest

from localvault import tokens
from localvault.server import MANAGED_HSM_AUDIENCES, VAULT_AUDIENCES
from localvault.tokens import MANAGED_HSM_RESOURCE, VAULT_RESOURCE, TokenIssuer


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The tokens PyJWT is asked to verify."""
    calls: List[str] = []
    real = jwt.decode

    def counted(token: str, *args, **kwargs):
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counted)
    return calls


def test_a_token_is_verified_once_then_served_from_its_claims(decodes):
    issuer = TokenIssuer()
    token, _ = issuer.issue(VAULT_RESOURCE)
    assert all(issuer.verify(token, VAULT_AUDIENCES) for _ in range(5))
    assert decodes == [token]


def test_a_cached_token_is_refused_once_it_expires(decodes, monkeypatch):
    issuer = TokenIssuer()
    token, expires = issuer.issue(VAULT_RESOURCE)
    assert issuer.verify(token, VAULT_AUDIENCES)
    monkeypatch.setattr(tokens, "_now", lambda: float(expires))
    assert not issuer.verify(token, VAULT_AUDIENCES)
    assert not issuer.verify(token, VAULT_AUDIENCES)  # and is not verified anew into the cache
    assert decodes == [token, token]


def test_a_cached_token_is_still_refused_for_another_audience(decodes):
    issuer = TokenIssuer()
    token, _ = issuer.issue(VAULT_RESOURCE)
    assert issuer.verify(token, VAULT_AUDIENCES)
    assert not issuer.verify(token, MANAGED_HSM_AUDIENCES)
    assert not issuer.verify(token, MANAGED_HSM_RESOURCE)
    assert issuer.verify(token, VAULT_RESOURCE)


def test_forged_and_foreign_tokens_are_refused_every_time(decodes):
    issuer = TokenIssuer()
    token, _ = issuer.issue(VAULT_RESOURCE)
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    foreign, _ = TokenIssuer().issue(VAULT_RESOURCE)
    for _ in range(2):
        assert not issuer.verify(forged, VAULT_AUDIENCES)
        assert not issuer.verify(foreign, VAULT_AUDIENCES)
    assert decodes == [forged, foreign, forged, foreign]


def test_the_cache_is_bounded(decodes, monkeypatch):
    monkeypatch.setattr(tokens, "MAX_CACHED", 3)
    issuer = TokenIssuer()
    issued = [issuer.issue(VAULT_RESOURCE, lifetime=3600 + i)[0] for i in range(10)]
    for _ in range(2):
        assert all(issuer.verify(token, VAULT_AUDIENCES) for token in issued)
    assert decodes == issued * 2  # each dropped before its next use, so verified anew
    assert all(issuer.verify(token, VAULT_AUDIENCES) for token in issued[-3:])
    assert len(decodes) == 20  # the last three were kept


def test_a_token_not_yet_valid_is_refused(monkeypatch):
    issuer = TokenIssuer()
    token, expires = issuer.issue(VAULT_RESOURCE)
    assert issuer.verify(token, VAULT_AUDIENCES)
    monkeypatch.setattr(tokens, "_now", lambda: float(expires - issuer.lifetime - 60))
    assert not issuer.verify(token, VAULT_AUDIENCES)
