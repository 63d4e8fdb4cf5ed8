"""Server → client frames, encoded once to JSON text (PRODUCT.md section 6).

An event sent to many connections is encoded once and the same `str` goes into
every outbox.
"""

from __future__ import annotations

from typing import Any

import orjson


def encode(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def ok(ref: str | None, **fields: Any) -> str:
    return encode({"type": "ok", "ref": ref, **fields})


def error(ref: str | None, code: str, message: str, **extra: Any) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message, **extra}
    if ref is not None:
        frame["ref"] = ref
    return encode(frame)


def event(type_: str, **fields: Any) -> str:
    return encode({"type": type_, **fields})
