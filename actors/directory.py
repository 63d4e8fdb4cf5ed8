"""How a session is found: the `SessionDirectory` port, and the one retry rule for it.

A lookup hands out a `SessionHandle`; a handle goes stale when its actor retires
(nobody joined, session not active) or crashes, and sending to it raises
`SessionGone`. Whoever holds a handle asks again, at most `LOOKUP_ATTEMPTS`
times; after that the caller gets a `ParleyError` (never `SessionGone`, which is
this layer's own business). In one process the supervisor is the directory; a
cluster puts a directory that knows the owning node behind the same port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from domain.errors import StorageUnavailable
from protocol.replies import Reply

from .ports import ReplyTo
from .post_office import PostOffice
from .session import SessionGone, SessionHandle, SessionMessage

LOOKUP_ATTEMPTS = 3
CALL_TIMEOUT = 30.0


class SessionDirectory(Protocol):
    async def lookup(self, session_id: str) -> SessionHandle:
        """A handle to the session's live actor, starting one if none is running."""
        ...


async def send_to_session(
    directory: SessionDirectory, session_id: str, message: SessionMessage, *, handle: SessionHandle | None = None
) -> SessionHandle:
    """Queue `message` for the session (awaiting room: back-pressure), looking it up again
    while its actor is being replaced. Returns the handle that took it."""
    for _ in range(LOOKUP_ATTEMPTS):
        if handle is None:
            handle = await directory.lookup(session_id)
        try:
            await handle.send(message)
        except SessionGone:
            handle = None
            continue
        return handle
    raise StorageUnavailable("the session is restarting; try again")


async def call_session(
    directory: SessionDirectory,
    calls: PostOffice,
    session_id: str,
    make: Callable[[ReplyTo], SessionMessage],
    *,
    timeout: float = CALL_TIMEOUT,
) -> Reply:
    """Send `make(reply_to)` and wait for its one answer (the REST path).
    Raises the session's `ParleyError`, or `trio.TooSlowError` after `timeout`."""
    with calls.call() as (reply_to, answer), trio.fail_after(timeout):
        await send_to_session(directory, session_id, make(reply_to))
        result = await answer.receive()
    return result.unwrap()
