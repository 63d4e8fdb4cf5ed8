"""The bounds every decoded input is held to, WebSocket frames and REST bodies and query
strings alike (PRODUCT.md section 8). Sans-IO.

- JSON depth: at most `MAX_JSON_DEPTH` levels of arrays/objects in one document. It is
  checked on the bytes, before any parser runs, so no parser recurses on hostile input
  (msgspec raises RecursionError past ~1,000 levels, Python's json too).
- Integers: within SQLite's INTEGER, signed 64-bit (`INT_MIN`..`INT_MAX`). Typed fields use
  `Int64` (msgspec) or `INT_FIELD` bounds (pydantic); free-form JSON (`loads`) is walked.
- Text: UTF-8, as JSON requires; invalid bytes are a bad request, not a decode crash.
"""

from __future__ import annotations

import array
import itertools
from typing import Annotated, Any

import msgspec

from domain.errors import BadRequest

MAX_JSON_DEPTH = 32
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1

Int64 = Annotated[int, msgspec.Meta(ge=INT_MIN, le=INT_MAX)]
NonNegativeInt64 = Annotated[int, msgspec.Meta(ge=0, le=INT_MAX)]

_any = msgspec.json.Decoder()
_NOT_BRACKET_OR_QUOTE = bytes(range(256)).translate(None, b'[]{}"')
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays/objects deeper than `limit`, without parsing it.

    Everything runs in C (bytes methods, array, accumulate): a 64 KiB frame of brackets
    costs ~2 ms, a normal frame microseconds. Brackets inside strings do not count.
    A text with unbalanced brackets may be reported as too deep; it is malformed anyway.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    if b"\\" in raw:  # drop escapes so that an escaped quote does not end a string
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = raw.translate(None, _NOT_BRACKET_OR_QUOTE)
    if b'"' in brackets:  # keep what lies outside strings: the even pieces between quotes
        brackets = b"".join(brackets.split(b'"')[::2])
    # cheap passes (each takes off one or two levels) settle shallow runs such as [][][]
    shallow = brackets
    for _ in range(2):
        shallow = shallow.replace(b"[]", b"").replace(b"{}", b"")
    if not shallow:
        return False
    return max(itertools.accumulate(array.array("b", brackets.translate(_SIGNS)))) > limit


def check_text(raw: bytes, *, what: str = "JSON") -> None:
    """Refuse (BadRequest) a document that nests too deep. Parsers check UTF-8 themselves."""
    if too_deep(raw):
        raise BadRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")


def check_int(value: int, name: str, *, minimum: int = INT_MIN) -> int:
    if not minimum <= value <= INT_MAX:
        raise BadRequest(f"`{name}` must be {minimum} to {INT_MAX}")
    return value


def loads(raw: bytes | str) -> Any:
    """Free-form JSON (REST bodies) within the bounds, or BadRequest saying why not."""
    if isinstance(raw, str):
        try:
            raw = raw.encode()
        except UnicodeEncodeError:  # lone surrogates
            raise BadRequest("body is not valid UTF-8") from None
    check_text(raw, what="body")
    try:
        # msgspec keeps big integers exact (orjson would turn them into floats) and refuses
        # invalid UTF-8, NaN and Infinity
        value = _any.decode(raw)
    except msgspec.ValidationError as exc:  # a number past a double's range
        raise BadRequest(f"malformed JSON: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    _check_numbers(value)
    return value


def _check_numbers(value: Any) -> None:
    """Every integer within signed 64-bit."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                raise BadRequest(f"an integer is outside {INT_MIN} to {INT_MAX}")
