"""Token verification (PRODUCT.md section 2) with its cache of verified tokens: a token seen
again (a reconnect, every REST call) is not decoded again, and is refused from its `exp` on,
exactly as a fresh decode would refuse it."""

from __future__ import annotations

import time

import jwt
import pytest

from domain.errors import Unauthorized
from domain.identity import Identity
from gateway import auth
from gateway.auth import TokenVerifier, mint_token

SECRET = "auth-tests-secret-which-is-long-enough-for-hs256"


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args, **kwargs):
        seen.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(auth.jwt, "decode", counting)
    return seen


def test_a_token_seen_again_is_not_decoded_again(decodes: list[str]) -> None:
    verify = TokenVerifier(SECRET)
    token = mint_token(SECRET, "alice")
    assert verify(token) == verify(token) == Identity(user="alice", is_admin=False)
    assert verify(mint_token(SECRET, "root", admin=True)) == Identity(user="root", is_admin=True)
    assert len(decodes) == 2


def test_a_cached_token_is_refused_from_its_exp_on(decodes: list[str]) -> None:
    verify = TokenVerifier(SECRET)
    exp = int(time.time()) + 1
    token = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    assert verify(token).user == "alice"
    assert verify(token).user == "alice"
    assert len(decodes) == 1
    time.sleep(max(0.0, exp - time.time()) + 0.01)  # PyJWT's clock is the wall clock, too
    for _ in range(2):  # remembered, then forgotten: refused both times
        with pytest.raises(Unauthorized, match="expired"):
            verify(token)


def test_refused_tokens_are_never_remembered(decodes: list[str]) -> None:
    verify = TokenVerifier(SECRET)
    forged = mint_token("another-secret-which-is-long-enough-for-hs256", "alice")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verify(forged)
    not_yet = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "nbf": int(time.time()) + 30},
                         SECRET, algorithm="HS256")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verify(not_yet)
    assert len(decodes) == 4


def test_the_cache_is_bounded_oldest_out(decodes: list[str]) -> None:
    verify = TokenVerifier(SECRET, cache_size=2)
    a, b, c = (mint_token(SECRET, user) for user in "abc")
    verify(a), verify(b), verify(a), verify(c)  # b is the least recently used: out
    assert len(decodes) == 3
    verify(a), verify(c)
    assert len(decodes) == 3
    verify(b)
    assert len(decodes) == 4
