"""One TCP port for both edges: WebSocket upgrades on `/ws` and everything else over HTTP.

ASGI has no way to show an application WebSocket pongs, and PRODUCT.md's
liveness and billing rules are built on them ("the last moment it was known
alive: its last frame or pong"). So the listener reads each connection's
request head itself: a WebSocket upgrade of `/ws` goes to trio-websocket and a
connection actor (which sees every pong); anything else is replayed, byte for
byte, into Hypercorn serving the quart-trio app.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from actors import connection

log = logging.getLogger("parley.listener")

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 10.0
HTTP_SHUTDOWN_GRACE = 1.0
WS_QUEUE = 4  # frames trio-websocket reads ahead before TCP pushes back


class ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first bytes (already read while sniffing) are given again."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket
        # every frame passes here: once the prefix is given, calls go straight to the socket
        self.send_all = stream.send_all  # type: ignore[method-assign]
        if not prefix:
            self.receive_some = stream.receive_some  # type: ignore[method-assign]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            if not self._prefix:
                self.receive_some = self._stream.receive_some  # type: ignore[method-assign]
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def setsockopt(self, *args: Any) -> None:
        self._stream.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._stream.getsockopt(*args)


def parse_head(head: bytes) -> tuple[bool, str | None]:
    """(is a WebSocket upgrade of /ws, the `token` query parameter if any)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False, None
    target = urllib.parse.urlsplit(parts[1].decode("latin-1"))
    if target.path != "/ws":
        return False, None
    upgrade = any(
        line.split(b":", 1)[0].strip().lower() == b"upgrade"
        and b"websocket" in line.split(b":", 1)[1].lower()
        for line in lines[1:]
        if b":" in line
    )
    tokens = urllib.parse.parse_qs(target.query).get("token")
    return upgrade, tokens[0] if tokens else None


class Listener:
    """Accepts connections and hands each to the right edge, in `edge_nursery`."""

    def __init__(
        self,
        *,
        app: Any,
        context: connection.ConnectionContext,
        hypercorn_config: HypercornConfig | None = None,
    ) -> None:
        self.context = context
        self.config = hypercorn_config or HypercornConfig()
        self.config.keep_alive_timeout = 30
        self.app = wrap_app(app, self.config.wsgi_max_body_size, "asgi")
        self.worker_context = WorkerContext(None)

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        handler_nursery: trio.Nursery,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until the returned cancel scope is cancelled (stop accepting)."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await trio.serve_listeners(self.handle, listeners, handler_nursery=handler_nursery)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            head = await self._read_head(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        is_ws, token = parse_head(head)
        replay = ReplayStream(stream, head)
        if is_ws:
            await self._serve_websocket(replay, token)
        else:
            await self._serve_http(replay)

    async def _read_head(self, stream: trio.SocketStream) -> bytes:
        head = bytearray()
        with trio.move_on_after(HEAD_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                chunk = await stream.receive_some(HEAD_LIMIT)
                if not chunk:
                    break
                head += chunk
        return bytes(head)

    async def _serve_websocket(self, stream: ReplayStream, token: str | None) -> None:
        settings = self.context.settings
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(HEAD_TIMEOUT) as handshake:
                    request = await trio_websocket.wrap_server_stream(
                        nursery, stream, message_queue_size=WS_QUEUE,
                        max_message_size=settings.max_frame_bytes,
                    )
                    ws = await request.accept()
                if handshake.cancelled_caught:
                    nursery.cancel_scope.cancel()
                    return
                await connection.serve(ws, self.context, query_token=token)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio_websocket.ConnectionClosed):
            pass  # the peer went away during the handshake
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_http(self, stream: ReplayStream) -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_shutdown() -> None:
                await self.context.shutting_down.wait()
                await trio.sleep(HTTP_SHUTDOWN_GRACE)  # let requests under way finish
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_shutdown)
            await TCPServer(self.app, self.config, self.worker_context, ConnectionState({}), stream)
            nursery.cancel_scope.cancel()


def bound_port(listeners: list[trio.SocketListener]) -> int:
    return listeners[0].socket.getsockname()[1]

