"""The connection's side of chat delivery: every `seq` once, in order, with no gap.

Owned by the connection's writer task. For each session the connection joined it
keeps the next `seq` its client should see. A join's `ChatCursor` says what the
client has acknowledged and what exists: the gap between is the offline queue,
streamed from storage page by page, paced by this connection's own socket
writes. A live `ChatFrame` below the next `seq` is a duplicate and is dropped;
one above it means messages went missing on the way (a lost notice, a node that
died), and the gap is filled from storage first. So a lost delivery costs
latency, never correctness, and no other actor paces this one. Between two
pages of a long backlog the connection sends the other frames waiting for it
(signaling, typing, presence), so a catch-up never holds up a call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from domain.chat import MAX_HISTORY_LIMIT
from protocol import wire
from storage import messages as sm
from storage.actor import StorageHandle

from .ports import ChatCursor, ChatFrame

PAGE = MAX_HISTORY_LIMIT


class OfflineQueue:
    def __init__(
        self,
        storage: StorageHandle,
        send: Callable[[str], Awaitable[None]],
        between_pages: Callable[[], Awaitable[None]],
    ) -> None:
        self._storage = storage
        self._send = send
        self._between_pages = between_pages
        self._next: dict[str, int] = {}  # session id → next seq the client should see

    async def cursor(self, cursor: ChatCursor) -> None:
        """After a join: the client has seen up to `after_seq` (on this socket: maybe more)."""
        next_seq = max(self._next.get(cursor.session_id, 0), cursor.after_seq + 1)
        self._next[cursor.session_id] = next_seq
        if cursor.last_seq >= next_seq:
            await self._fill(cursor.session_id, cursor.last_seq)

    def cursor_nowait(self, cursor: ChatCursor) -> bool:
        """`cursor` at once when it has nothing to stream (the client has seen every message:
        the common join); False, with nothing changed, when its backlog must be sent first."""
        next_seq = max(self._next.get(cursor.session_id, 0), cursor.after_seq + 1)
        if cursor.last_seq >= next_seq:
            return False
        self._next[cursor.session_id] = next_seq
        return True

    def in_order(self, frame: ChatFrame) -> bool:
        """The frame is the next one this client should see (or the first of its session here):
        it can go out as it is, with no fill from storage and nothing to drop."""
        next_seq = self._next.get(frame.session_id)
        return next_seq is None or frame.seq == next_seq

    def sent(self, frame: ChatFrame) -> None:
        """An in-order frame went out without `frame` (the connection wrote it at once)."""
        if frame.session_id in self._next:
            self._next[frame.session_id] = frame.seq + 1

    async def frame(self, frame: ChatFrame) -> None:
        next_seq = self._next.get(frame.session_id)
        if next_seq is not None:
            if frame.seq < next_seq:
                return  # already sent: a duplicate
            if frame.seq > next_seq:
                await self._fill(frame.session_id, frame.seq - 1)
            self._next[frame.session_id] = frame.seq + 1
        if frame.text is not None:
            await self._send(frame.text)

    async def _fill(self, session_id: str, upto_seq: int) -> None:
        """Send every stored message from the next seq up to `upto_seq`, oldest first."""
        after = self._next[session_id] - 1
        while after < upto_seq:
            page = await self._storage.read(sm.GetMessages(
                session_id=session_id, after_seq=after, limit=min(PAGE, upto_seq - after),
            ))
            if not page:
                break  # nothing more is stored (a seq that never committed)
            for message in page:
                await self._send(wire.encode({"type": "chat.message", "session": session_id, **wire.record(message)}))
                after = message.seq
            self._next[session_id] = after + 1
            if after < upto_seq:
                await self._between_pages()
        self._next[session_id] = max(self._next[session_id], upto_seq + 1)
