"""A Python client for Parley's WebSocket protocol (trio + trio-websocket).

    async with connect("ws://127.0.0.1:8080/ws", token) as client:
        await client.request("join", session=session_id)
        await client.request("signal", session=session_id, to="bob", kind="offer", payload={...})
        event = await client.next_event("signal")

`request` sends a frame with a fresh `ref` and returns the `ok` reply's fields,
or raises `RequestError` with the server's error code. Everything the server
sends without a `ref` is an event, read with `next_event` (optionally waiting
for one `type`; events of other types stay queued, in order).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

EVENT_BUFFER = 100_000


class RequestError(Exception):
    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code = frame.get("code")
        self.frame = frame


class Closed(Exception):
    """The server closed the connection; `code` and `reason` say why."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class Client:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self._refs = itertools.count(1)
        self._pending: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events: deque[dict[str, Any]] = deque()
        self._event_arrived = trio.Event()
        self.closed: Closed | None = None

    @property
    def user(self) -> str:
        return self.welcome["user"]

    async def send_raw(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await self.ws.send_message(frame)

    async def request(self, type_: str, *, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        ref = f"r{next(self._refs)}"
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[ref] = send
        try:
            with trio.fail_after(timeout):
                await self.send_raw({"type": type_, "ref": ref, **fields})
                reply = await receive.receive()
        finally:
            self._pending.pop(ref, None)
        if reply.get("type") == "error":
            raise RequestError(reply)
        return reply

    async def next_event(self, type_: str | None = None, *, timeout: float = 10.0) -> dict[str, Any]:
        """The oldest queued event (of `type_`, if given), waiting up to `timeout`."""
        with trio.fail_after(timeout):
            while True:
                for index, event in enumerate(self._events):
                    if type_ is None or event.get("type") == type_:
                        del self._events[index]
                        return event
                if self.closed is not None:
                    raise self.closed
                self._event_arrived = trio.Event()
                await self._event_arrived.wait()

    def pending_events(self, type_: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self._events if type_ is None or e.get("type") == type_]

    async def wait_closed(self, *, timeout: float = 10.0) -> Closed:
        with trio.fail_after(timeout):
            while self.closed is None:
                self._event_arrived = trio.Event()
                await self._event_arrived.wait()
        return self.closed

    async def _read(self) -> None:
        try:
            while True:
                frame = orjson.loads(await self.ws.get_message())
                ref = frame.get("ref")
                if ref is not None and ref in self._pending and frame.get("type") in ("ok", "error"):
                    self._pending.pop(ref).send_nowait(frame)
                    continue
                if len(self._events) < EVENT_BUFFER:
                    self._events.append(frame)
                self._event_arrived.set()
        except ConnectionClosed as exc:
            reason = exc.reason
            self.closed = Closed(reason.code if reason else None, reason.reason if reason else None)
            self._event_arrived.set()
            for channel in self._pending.values():
                channel.send_nowait({"type": "error", "code": "closed", "message": str(self.closed)})
            self._pending.clear()


@asynccontextmanager
async def connect(url: str, token: str | None, *, token_in_query: bool = False) -> AsyncIterator[Client]:
    """Connect, say hello, and serve the client until the block ends."""
    if token_in_query and token is not None:
        url = f"{url}{'&' if '?' in url else '?'}token={token}"
    async with open_websocket_url(url, message_queue_size=EVENT_BUFFER, max_message_size=1 << 20) as ws:
        client = Client(ws)
        if not token_in_query:
            await client.send_raw({"type": "hello", "token": token})
        first = orjson.loads(await ws.get_message())
        if first.get("type") != "welcome":
            raise RequestError(first)
        client.welcome = first
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
