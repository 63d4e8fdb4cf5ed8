"""A real HTTP receiver for webhook tests: a small Trio server (h11) on a free port that
verifies every request with the `standardwebhooks` package — an implementation that is
not ours — and answers what the test tells it to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson
import trio
from standardwebhooks import Webhook

MAX_REQUEST = 1024 * 1024


@dataclass
class Received:
    at: float  # trio.current_time() on arrival
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool = False
    error: str | None = None

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def event(self) -> dict[str, Any]:
        return orjson.loads(self.body)

    @property
    def type(self) -> str:
        return self.event["type"]


Respond = Callable[[Received], Awaitable[int]]


async def ok(_: Received) -> int:
    return 200


@dataclass
class Receiver:
    respond: Respond = ok
    secrets: dict[str, str] = field(default_factory=dict)  # path → whsec_… (set after creating the endpoint)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[Receiver] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    def _note(self, received: Received) -> None:
        secret = self.secrets.get(received.path)
        if secret is None:
            received.error = f"no secret for {received.path}"
        else:
            try:
                Webhook(secret).verify(received.body, received.headers)
                received.verified = True
            except Exception as exc:  # the library's verification error, whatever its class
                received.error = f"{type(exc).__name__}: {exc}"
        self.received.append(received)
        self._changed.set()
        self._changed = trio.Event()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            while True:
                target, headers, body = None, {}, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        target = event.target.decode()
                        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert target is not None
                received = Received(at=trio.current_time(), path=target, headers=headers, body=body)
                self._note(received)
                status = await self.respond(received)
                reply = b"ok"
                await stream.send_all(conn.send(h11.Response(
                    status_code=status, headers=[("content-length", str(len(reply))), ("content-type", "text/plain")],
                )))
                await stream.send_all(conn.send(h11.Data(data=reply)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
