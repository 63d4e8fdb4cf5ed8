"""Domain errors. Each maps to one wire error code and one HTTP status."""

from __future__ import annotations


class ParleyError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str = "", **extra: object) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.extra = extra


class BadRequest(ParleyError):
    code = "bad_request"
    status = 400


class Unprocessable(ParleyError):
    """A well-formed request whose content is invalid (REST answers 422)."""

    code = "bad_request"
    status = 422


class Unauthorized(ParleyError):
    code = "unauthorized"
    status = 401


class Forbidden(ParleyError):
    code = "forbidden"
    status = 403


class NotFound(ParleyError):
    code = "not_found"
    status = 404


class NotJoined(ParleyError):
    code = "not_joined"
    status = 409


class Conflict(ParleyError):
    """An illegal transition; `state` names the current state."""

    code = "conflict"
    status = 409

    def __init__(self, message: str, *, state: str | None = None) -> None:
        super().__init__(message, **({"state": state} if state else {}))
        self.state = state


class TooLarge(ParleyError):
    code = "too_large"
    status = 413


class RateLimited(ParleyError):
    code = "rate_limited"
    status = 429


class StorageUnavailable(ParleyError):
    """The database refused a read or write; nothing of that request was kept."""

    code = "internal"
    status = 503


class Fenced(ParleyError):
    """Cluster mode: a newer owner of the session exists, so this node's write was refused
    (nothing of it was kept). The session actor that got it stops at once; a client that
    retries reaches the new owner."""

    code = "internal"
    status = 503


class Internal(ParleyError):
    code = "internal"
    status = 500
