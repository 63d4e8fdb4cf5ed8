"""Tokens (PRODUCT.md section 2): HS256 JWTs with `sub`, `exp` and an optional `role`."""

from __future__ import annotations

import collections
import logging
import os
import secrets
import time
from pathlib import Path

import jwt

from domain.errors import Unauthorized
from domain.identity import Identity

log = logging.getLogger("parley.auth")

ALGORITHM = "HS256"
SECRET_FILE = "secret"
MAX_USER_CHARS = 128
CACHE_SIZE = 4096  # accepted tokens remembered (a few hundred bytes each)
TIME_CLAIMS = ("exp", "iat", "nbf")  # NumericDate (RFC 7519 section 2): a JSON number, never a string


def load_or_create_secret(data_dir: Path, configured: str | None) -> str:
    """The configured secret, else the one kept in `data_dir`, else a new one kept there."""
    if configured:
        return configured
    path = Path(data_dir) / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    log.warning("no PARLEY_SECRET configured: generated one and kept it in %s", path)
    return secret


def mint_token(secret: str, user: str, *, admin: bool = False, ttl: int = 3600) -> str:
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + ttl, "role": "admin" if admin else "user"}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Verifies tokens, remembering the ones it accepted (bounded, least recently used out).

    Reconnects and REST calls present the same token again and again, and a PyJWT decode
    costs 40–130 µs. What a decode checks cannot change for a given token string and secret
    except with time, and time only ends validity (`nbf`/`iat` in the future are refused and
    never remembered): so a remembered token is accepted without a decode until its `exp`,
    by PyJWT's own rule (expired once `int(exp) <= now`), and refused from then on. Refused
    tokens are never remembered."""

    def __init__(self, secret: str, *, cache_size: int = CACHE_SIZE) -> None:
        self._secret = secret
        self._cache_size = cache_size
        self._accepted: collections.OrderedDict[str, tuple[Identity, int]] = collections.OrderedDict()

    def __call__(self, token: str) -> Identity:
        """The token's identity, or Unauthorized saying why not."""
        if not token:
            raise Unauthorized("missing token")
        accepted = self._accepted.get(token)
        if accepted is not None:
            identity, exp = accepted
            if time.time() < exp:
                self._accepted.move_to_end(token)
                return identity
            del self._accepted[token]
            raise Unauthorized("token expired")
        identity, exp = self._verify(token)
        self._accepted[token] = (identity, exp)
        if len(self._accepted) > self._cache_size:
            self._accepted.popitem(last=False)
        return identity

    def _verify(self, token: str) -> tuple[Identity, int]:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        for claim in TIME_CLAIMS:
            value = claims.get(claim)
            if claim in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise Unauthorized(f"invalid token: `{claim}` must be a number")
        user, role = claims.get("sub"), claims.get("role", "user")
        if not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS:
            raise Unauthorized("invalid token: `sub` must be a non-empty string")
        if role not in ("user", "admin"):
            raise Unauthorized("invalid token: `role` must be user or admin")
        return Identity(user=user, is_admin=role == "admin"), int(claims["exp"])
