"""Which browser origins may use this server (PRODUCT.md section 8). Sans-IO.

Allowed: the server's own origin (the `Origin`'s host and port equal the request's
`Host`), every entry of `PARLEY_ALLOWED_ORIGINS`, and, when no list is configured and
development mode is on, `http://localhost:*` and `http://127.0.0.1:*`. An entry may end
in `:*` for any port. `null` (sandboxed frames, file://) is allowed only if listed.
"""

from __future__ import annotations

import urllib.parse

DEV_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*")


def _normalize(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def parse_allowed(value: str | None) -> tuple[str, ...]:
    return tuple(_normalize(o) for o in (value or "").split(",") if o.strip())


def _matches(origin: str, pattern: str) -> bool:
    if pattern.endswith(":*"):
        prefix = pattern[:-2]
        if origin == prefix:
            return True
        base, sep, port = origin.rpartition(":")
        return bool(sep) and base == prefix and port.isdigit() and port.isascii()
    return origin == pattern


def origin_allowed(origin: str, *, host: str | None, allowed: tuple[str, ...], dev: bool) -> bool:
    origin = _normalize(origin)
    if origin != "null" and host:
        netloc = urllib.parse.urlsplit(origin).netloc if "://" in origin else ""
        if netloc and netloc == host.strip().lower():
            return True
    patterns = allowed if allowed else (DEV_ORIGINS if dev else ())
    return any(_matches(origin, _normalize(p)) for p in patterns)
