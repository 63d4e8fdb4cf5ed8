"""One TCP port for both edges: WebSocket upgrades on `/ws` and everything else over HTTP.

ASGI has no way to show an application WebSocket pongs, and PRODUCT.md's
liveness and billing rules are built on them ("the last moment it was known
alive: its last frame or pong"). So the listener reads each connection's
request head itself: a WebSocket upgrade of `/ws` goes to trio-websocket and a
connection actor (which sees every pong); anything else is replayed, byte for
byte, into Hypercorn serving the quart-trio app.

Connection lifetimes (PRODUCT.md section 8: no client holds file descriptors
without limit):
- the listener counts connections per client address and in all; past either cap
  a new connection gets a one-line HTTP refusal and is closed at once, so the
  process never reaches its open-file limit (and `accept` never fails with EMFILE);
- `/ws` upgrades whose `Origin` is not allowed get 403 before the upgrade;
- HTTP connections are closed after `http_keep_alive_timeout` idle seconds, after a
  response to `Connection: close` or HTTP/1.0, and after a refused body (413).
  Hypercorn does all of that, but from inside the application's task, which
  quart-trio cancels as soon as the response is sent: the close and the idle timer
  were cancelled with it, and the connection stayed open for good. `_HTTPConnection`
  runs those steps shielded, each under a deadline.
"""

from __future__ import annotations

import logging
import os
import resource
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import outcome
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState as WSState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.events import Event as WSEvent
from wsproto.utilities import RemoteProtocolError

from actors import connection
from domain import audit, metrics
from domain.ratelimit import TokenBucket

from .origins import origin_allowed

log = logging.getLogger("parley.listener")

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 10.0
HTTP_SHUTDOWN_GRACE = 1.0
HTTP_SEND_TIMEOUT = 10.0  # a client that reads nothing of a response for this long is dropped
HTTP_CLOSE_TIMEOUT = 2.0
REFUSE_TIMEOUT = 1.0
FD_RESERVE = 64  # open files kept free of connections: SQLite, its WAL, logs, listening sockets
WS_QUEUE = 4  # frames trio-websocket reads ahead before TCP pushes back
PING_FRAME = b"\x89\x00"  # FIN + ping, unmasked, no payload (what wsproto makes of `Ping()`)
PING_STRIKES = 100  # client pings over the rate in a row before the connection is closed (4008)
RECEIVE_SIZE = 65536  # bytes one read takes from the socket (trio's SocketStream default)
PONG_OPCODE = 0x8A  # FIN + pong, no RSV bits: the first byte of every valid pong frame
MASKED = 0x80  # the mask bit of the second byte: every client frame has it (RFC 6455 5.1)
MAX_CONTROL_PAYLOAD = 125  # RFC 6455 5.5: a control frame's payload length fits the 7-bit field

_SET_EVENT = trio.Event()  # shared by every open server WebSocket: set, and never waited on
_SET_EVENT.set()

# wsproto event → the `_ServerWebSocket` method that handles it (one table for every connection)
_HANDLERS: dict[type, str] = {
    AcceptConnection: "_handle_accept_connection_event",
    BytesMessage: "_handle_message_event",
    CloseConnection: "_handle_close_connection_event",
    Ping: "_handle_ping_event",
    Pong: "_handle_pong_event",
    RejectConnection: "_handle_reject_connection_event",
    RejectData: "_handle_reject_data_event",
    Request: "_handle_request_event",
    TextMessage: "_handle_message_event",
}


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


@dataclass(frozen=True, slots=True)
class Head:
    """What the listener needs of a request head (the rest is Hypercorn's business)."""

    websocket: bool = False  # a WebSocket upgrade of /ws
    token: str | None = None  # the `token` query parameter
    origin: str | None = None
    host: str | None = None


def parse_head(head: bytes) -> Head:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return Head()
    target = urllib.parse.urlsplit(parts[1].decode("latin-1"))
    if target.path != "/ws":
        return Head()
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers.setdefault(name.strip().lower(), value.strip())
    upgrade = b"websocket" in headers.get(b"upgrade", b"").lower()
    tokens = urllib.parse.parse_qs(target.query).get("token")
    origin, host = headers.get(b"origin"), headers.get(b"host")
    return Head(
        websocket=upgrade, token=tokens[0] if tokens else None,
        origin=None if origin is None else origin.decode("latin-1"),
        host=None if host is None else host.decode("latin-1"),
    )


def _plain_response(status: str, code: str, message: str, *extra: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one (at start); returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft, soft
    return soft, target


def connection_cap(configured: int) -> int:
    """Connections held at once: as configured, and never more than the open-file limit allows."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    by_files = (1 << 30) if soft == resource.RLIM_INFINITY else max(1, soft - FD_RESERVE)
    return min(configured, by_files) if configured > 0 else by_files


class _Messages:
    """trio-websocket's message queue, for its one producer (the reader task) and one
    consumer at a time (`get_message`), with what `trio.open_memory_channel(size)` does for
    the calls trio-websocket makes: a bounded buffer whose full state makes the producer
    wait (so TCP pushes back), `EndOfChannel` to the consumer once the send side is closed
    and drained, `BrokenResourceError` to the producer once the receive side is closed,
    `ClosedResourceError` on a closed side, and a checkpoint in every call. A memory channel
    (its state, two OrderedDicts of waiting tasks, two endpoints with a set each) is ~3.5 KB
    a connection; this is a few hundred bytes. A second concurrent consumer (or producer)
    gets `BusyResourceError` instead of a place in a queue."""

    __slots__ = ("_items", "_size", "_send_closed", "_receive_closed", "_receiver", "_sender", "_pending")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the message queue holds at least one message")
        self._items: list[Any] = []  # (a list: at most `size`, a handful)
        self._size = size
        self._send_closed = False
        self._receive_closed = False
        self._receiver: trio.lowlevel.Task | None = None  # waiting in `receive` on an empty queue
        self._sender: trio.lowlevel.Task | None = None  # waiting in `send` on a full queue
        self._pending: Any = None  # what the waiting sender sends

    async def send(self, value: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._send_closed:
            raise trio.ClosedResourceError
        if self._receive_closed:
            raise trio.BrokenResourceError
        receiver = self._receiver
        if receiver is not None:  # (then the queue is empty)
            self._receiver = None
            trio.lowlevel.reschedule(receiver, outcome.Value(value))
        elif len(self._items) < self._size:
            self._items.append(value)
        else:
            if self._sender is not None:
                raise trio.BusyResourceError("another task is sending on this queue")
            self._sender, self._pending = trio.lowlevel.current_task(), value

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._sender = self._pending = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            return
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._receive_closed:
            raise trio.ClosedResourceError
        if self._items:
            value = self._items.pop(0)
            sender = self._sender
            if sender is not None:  # room now: its value goes in behind the others
                self._items.append(self._pending)
                self._sender = self._pending = None
                trio.lowlevel.reschedule(sender, outcome.Value(None))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return value
        if self._send_closed:
            raise trio.EndOfChannel
        if self._receiver is not None:
            raise trio.BusyResourceError("another task is receiving from this queue")
        self._receiver = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._receiver = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def close_send(self) -> None:
        self._send_closed = True
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            trio.lowlevel.reschedule(receiver, outcome.Error(trio.EndOfChannel()))

    def close_receive(self) -> None:
        self._receive_closed = True
        self._items.clear()
        sender, self._sender, self._pending = self._sender, None, None
        if sender is not None:
            trio.lowlevel.reschedule(sender, outcome.Error(trio.BrokenResourceError()))
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            trio.lowlevel.reschedule(receiver, outcome.Error(trio.ClosedResourceError()))


class _MessagesSendEnd:
    """The producer's side of `_Messages` (what trio-websocket calls `_send_channel`)."""

    __slots__ = ("_queue",)

    def __init__(self, queue: _Messages) -> None:
        self._queue = queue

    async def send(self, value: Any) -> None:
        await self._queue.send(value)

    async def aclose(self) -> None:
        self._queue.close_send()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> _MessagesSendEnd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._queue.close_send()


class _MessagesReceiveEnd:
    """The consumer's side of `_Messages` (what trio-websocket calls `_recv_channel`)."""

    __slots__ = ("_queue",)

    def __init__(self, queue: _Messages) -> None:
        self._queue = queue

    async def receive(self) -> Any:
        return await self._queue.receive()

    async def aclose(self) -> None:
        self._queue.close_receive()
        await trio.lowlevel.checkpoint()


def message_queue(size: int) -> tuple[_MessagesSendEnd, _MessagesReceiveEnd]:
    queue = _Messages(size)
    return _MessagesSendEnd(queue), _MessagesReceiveEnd(queue)


class _HTTPConnection(TCPServer):
    """Hypercorn's connection driver, with the steps that end a connection shielded.

    quart-trio cancels the application task right after the response; Hypercorn sends
    `Closed` (Connection: close, HTTP/1.0, a refused body) and re-arms its keep-alive
    timer (`Updated(idle=True)`) from that same task, so both were cancelled at their
    first checkpoint. Here they run shielded, each under a deadline; a response the
    client does not read within HTTP_SEND_TIMEOUT drops the connection.
    """

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            with trio.CancelScope(shield=True):
                with trio.move_on_after(HTTP_SEND_TIMEOUT) as sending:
                    async with self.send_lock:
                        try:
                            await self.stream.send_all(event.data)
                            return
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                if sending.cancelled_caught:
                    await trio.aclose_forcefully(self.stream)
                with trio.move_on_after(HTTP_CLOSE_TIMEOUT):
                    await self.protocol.handle(Closed())
            return
        with trio.CancelScope(shield=True), trio.move_on_after(HTTP_CLOSE_TIMEOUT) as closing:
            await super().protocol_send(event)
        if closing.cancelled_caught:
            await trio.aclose_forcefully(self.stream)

    async def _read_data(self) -> None:
        await super()._read_data()
        # the client is gone: do not keep the connection (and its count) for the idle timer
        await self.idle_task.stop()


class _ServerWebSocket(trio_websocket.WebSocketConnection):
    """trio-websocket's server connection, with these changes:

    - text frames can be written without a task hop (`try_send_nowait`, for whichever task
      delivers one while nothing else is being written) and several at once
      (`send_messages`, for the connection's writer); what the socket did not take waits
      in `_unsent`, which every write sends first;
    - a frame that breaks the protocol (bad framing 1002, invalid UTF-8 text 1007) gets a
      close frame with that code before the TCP connection ends; trio-websocket treats
      wsproto's synthesized close as if the peer had sent it and drops the socket silently;
    - client ping frames are rate limited by the same token bucket as data frames: a ping
      over the rate gets no pong, and PING_STRIKES of them in a row close with 4008;
    - liveness without a waiting task (actors/heartbeat.py): every pong calls `on_pong`
      (trio-websocket's `ping()` parks a task on an Event until it comes), and
      `ping_nowait` sends a ping without ever waiting, see there.
    """

    def __init__(
        self, *args: Any, nursery: trio.Nursery, ping_rate: float, ping_burst: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        # the same queue in a few hundred bytes instead of a memory channel's ~3.5 KB (`_Messages`)
        self._send_channel, self._recv_channel = message_queue(  # type: ignore[assignment]
            kwargs.get("message_queue_size", 1))
        self._ping_bucket = TokenBucket(rate=ping_rate, burst=ping_burst, now=trio.current_time())
        self._ping_strikes = 0
        self._nursery = nursery  # this connection's own (it runs `_reader_task`)
        self._unsent = b""  # ping or frame bytes waiting for the stream: written before anything else
        self.on_pong: Callable[[], None] | None = None
        # (no more attributes: past 29 the instance dict loses key sharing, +1.3 KiB a connection)

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` in this connection's nursery (the connection's writer, while it has one)."""
        self._nursery.start_soon(fn)

    def ping_nowait(self) -> None:
        """Send a ping frame without waiting (the heartbeat wheel must never wait on one socket).

        trio-websocket serializes writes with `_stream_lock`, and bytes written around it
        would land inside another frame. So: if nobody holds the lock, the frame (2 bytes)
        goes straight to the socket with one non-blocking `send`; whatever part of it the
        socket does not take, or all of it if a writer holds the lock, waits in `_unsent`,
        which the lock's holder writes before releasing it (`_send`) or, if nobody holds
        it, a flush task in this connection's nursery. The frame carries no payload (any
        pong counts as alive) and is always the same two bytes: a server's frames are not
        masked, and wsproto keeps no state for a ping it sends.
        """
        if self._close_reason is not None or self._wsproto.state != WSState.OPEN:
            return
        if self._unsent or self._stream_lock.locked():
            self._unsent += PING_FRAME  # whoever holds or next takes the lock writes it
        else:
            self._write_or_keep(PING_FRAME, getattr(self._stream, "socket", None))

    def _write_or_keep(self, data: bytes, sock: trio.socket.SocketType | None) -> None:
        """Nobody holds the lock and nothing waits: one non-blocking write of what the socket
        (None: tests' memory streams) takes; the rest waits in `_unsent`, for a flush task of
        this connection's nursery."""
        written = 0
        if sock is not None:
            try:
                written = os.write(sock.fileno(), data)
            except OSError:  # full (BlockingIOError), or failing: the flush finds out and closes
                pass
        if written < len(data):
            self._unsent = data[written:]
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            await self._send_unsent(b"")  # nothing left if a writer came first: a no-op
        except trio_websocket.ConnectionClosed:
            pass

    async def _send(self, event: WSEvent) -> None:
        await self._send_unsent(self._wsproto.send(event))

    async def _send_unsent(self, data: bytes) -> None:
        """trio-websocket's `_send`, writing waiting ping frames first (and any added meanwhile)."""
        async with self._stream_lock:
            try:
                while self._unsent or data:
                    data, self._unsent = self._unsent + data, b""
                    await self._stream.send_all(data)
                    data = b""
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                assert self._close_reason is not None
                raise trio_websocket.ConnectionClosed(self._close_reason) from None

    async def _handle_pong_event(self, event: Pong) -> None:
        if self.on_pong is not None:
            self.on_pong()
        if self._pings:  # somebody awaits `ping()`
            await super()._handle_pong_event(event)

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state == WSState.OPEN:  # not the peer's close: wsproto refused a frame
            metrics.ERRORS.labels("bad_request").inc()
            with trio.move_on_after(connection.CLOSE_TIMEOUT):
                try:
                    await self._send(CloseConnection(code=event.code, reason=(event.reason or "")[:120]))
                except trio_websocket.ConnectionClosed:
                    pass
        await super()._handle_close_connection_event(event)

    async def _handle_ping_event(self, event: Ping) -> None:
        if self._ping_bucket.take(trio.current_time()) == 0.0:
            self._ping_strikes = 0
            await super()._handle_ping_event(event)
            return
        metrics.ERRORS.labels("rate_limited").inc()
        self._ping_strikes += 1
        if self._ping_strikes > PING_STRIKES:
            reason = "ping rate limit exceeded"
            self._close_reason = trio_websocket.CloseReason(connection.CLOSE_POLICY, reason)
            try:
                await self._send(CloseConnection(code=connection.CLOSE_POLICY, reason=reason))
            except trio_websocket.ConnectionClosed:
                pass
            await self._close_web_socket(connection.CLOSE_POLICY, reason)
            await self._close_stream()
            raise trio_websocket.ConnectionClosed(self._close_reason)

    async def _accept(self, request: Any, subprotocol: str | None, extra_headers: list[tuple[bytes, bytes]]) -> None:
        """trio-websocket's accept; then what only the handshake needed is let go (about 1.5 KB
        a connection): wsproto's HTTP/1.1 state (an `h11.Connection` with its buffers), the
        request it kept (every header), its event deque, and two `trio.Event`s nobody waits
        on for a server connection once it is open (trio-websocket's clients wait on the first;
        its own tests on the second)."""
        await super()._accept(request, subprotocol, extra_headers)
        handshake = self._wsproto.handshake
        if self._wsproto.connection is not None and not handshake._events:
            handshake._h11_connection = None  # used only until the connection exists
            handshake._initiating_request = None
            handshake._events = ()  # (read only while it has events; nothing is added any more)
        self._open_handshake = _SET_EVENT
        self._for_testing_peer_closed_connection = _SET_EVENT

    # ------------------------------------------------------------ reading (an idle connection's pong)

    async def _reader_task(self) -> None:
        """trio-websocket's `_reader_task` (0.12.2, server side), with two changes for idle
        connections, whose only traffic is the pong to each heartbeat ping:

        - a read that starts with complete pong frames, while wsproto is between frames,
          is answered here (`_take_pongs`): `on_pong`, no wsproto parsing, no events; the
          rest of the read, if any, goes to wsproto as before;
        - reads go straight to the socket (`_receive`): after a read of pongs only, it waits
          for the socket to be readable before reading, instead of a read that finds nothing.
        """
        fed = True  # wsproto was given bytes since its events were last taken
        async with self._send_channel:
            while self._reader_running:
                if fed:
                    for event in self._wsproto.events():
                        name = _HANDLERS.get(type(event))
                        if name is None:
                            log.warning("%s received unknown event type: %r", self, type(event))
                            continue
                        try:
                            await getattr(self, name)(event)
                        except trio_websocket.ConnectionClosed:
                            self._reader_running = False
                            break
                try:
                    data = await self._receive(wait_first=not fed)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._abort_web_socket()
                    break
                if not data:  # the TCP connection closed: abnormal if the WebSocket had not
                    if self._wsproto.state != WSState.CLOSED:
                        await self._abort_web_socket()
                    break
                fed = False
                if self._wsproto.state != WSState.CLOSED:
                    data = self._take_pongs(data)
                    if data:
                        fed = True
                        try:
                            self._wsproto.receive_data(data)
                        except RemoteProtocolError as err:
                            if err.event_hint:
                                await self._send(err.event_hint)
                            await self._close_stream()

    def _take_pongs(self, data: bytes) -> bytes:
        """Answer the complete pong frames `data` starts with; return what wsproto must parse.

        Only while wsproto is between frames (no partial header or payload buffered, no event
        waiting, the connection open) and nobody awaits trio-websocket's `ping()`; then a
        frame counts only if it is exactly what RFC 6455 allows a client's pong: first byte
        0x8A (FIN, no RSV bits, opcode pong), the mask bit set, a payload length ≤ 125 in
        the 7-bit field, and all of its 6 + length bytes in `data`. Anything else, or a
        frame cut by the read, stops the scan, and wsproto gets it and every byte after it
        (and refuses what is invalid: 1002). The payload is not unmasked: any pong counts.
        A control frame may come between the frames of a fragmented message (5.4), and
        wsproto keeps that message's state apart from its frame decoder, which is empty."""
        ws = self._wsproto.connection
        if data[0] != PONG_OPCODE or ws is None or self._pings or ws._events or ws.state != WSState.OPEN:
            return data
        decoder = ws._proto._frame_decoder
        if decoder.header is not None or decoder.buffer.buffer:
            return data
        size, at = len(data), 0
        while at + 6 <= size and data[at] == PONG_OPCODE:
            second = data[at + 1]
            if second < MASKED or second - MASKED > MAX_CONTROL_PAYLOAD:
                break
            end = at + 6 + second - MASKED
            if end > size:
                break
            at = end
        if not at:
            return data
        if self.on_pong is not None:
            self.on_pong()
        return data[at:]

    async def _receive(self, *, wait_first: bool) -> bytes:
        """One read of the stream: `SocketStream.receive_some`, without its layers, for a socket.

        `wait_first` (the last read held only pongs: the peer is most likely idle) waits for
        the socket to be readable before reading; otherwise a read is tried first, as trio
        does, with a checkpoint either way. The file descriptor is fetched again right before
        each read and wait, in the same step: a socket closed meanwhile has none (-1), and
        its waiter is woken with `ClosedResourceError` by trio's `notify_closing`."""
        stream = self._stream
        sock = _socket_of(stream)
        if sock is None:  # the replayed request head, or tests' memory streams
            return await stream.receive_some(self._receive_buffer_size)
        size = self._receive_buffer_size or RECEIVE_SIZE
        if wait_first:
            await trio.lowlevel.wait_readable(_fileno(sock))
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        waited = wait_first
        while True:
            try:
                data = os.read(_fileno(sock), size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(_fileno(sock))
                waited = True
                continue
            except OSError as exc:  # reset by the peer, or closed
                raise trio.BrokenResourceError from exc
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data


    # ------------------------------------------------------------ sending without a task hop

    def try_send_nowait(self, message: str) -> bool:
        """Write one text frame now, from whatever task delivers it (no hop through the
        connection's writer), if nothing else is being written. False: queue it for the
        writer (a write is under way, bytes still wait in `_unsent`, the socket is not open,
        or there is no socket: tests' memory streams). True: the frame is the socket's, or
        its tail waits in `_unsent` for a flush task, ahead of every later write."""
        if self._close_reason is not None or self._unsent or self._stream_lock.locked():
            return False
        sock = getattr(self._stream, "socket", None)
        if sock is None or self._wsproto.state != WSState.OPEN:  # (memory streams: the writer sends)
            return False
        self._write_or_keep(self._wsproto.send(TextMessage(data=message)), sock)
        return True

    async def send_messages(self, messages: list[str]) -> None:
        """Several text frames in one socket write (the writer found more than one waiting)."""
        if self._close_reason:
            raise trio_websocket.ConnectionClosed(self._close_reason)
        await self._send_unsent(b"".join(self._wsproto.send(TextMessage(data=message)) for message in messages))


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a stream whose reads can go straight to it (no bytes replayed first)."""
    if type(stream) is ReplayStream:
        return None if stream._prefix else stream.socket
    if type(stream) is trio.SocketStream:
        return stream.socket
    return None


def _fileno(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was closed")
    return fd


async def _wrap_server_stream(
    nursery: trio.Nursery, stream: trio.abc.Stream, *, max_message_size: int, ping_rate: float, ping_burst: int,
) -> trio_websocket.WebSocketRequest:
    """`trio_websocket.wrap_server_stream` (0.12.2), with `_ServerWebSocket`."""
    ws = _ServerWebSocket(
        stream, WSConnection(ConnectionType.SERVER), message_queue_size=WS_QUEUE,
        max_message_size=max_message_size, nursery=nursery, ping_rate=ping_rate, ping_burst=ping_burst,
    )
    nursery.start_soon(ws._reader_task)
    return await ws._get_request()


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
        settings = context.settings
        self.config = hypercorn_config or HypercornConfig()
        self.config.keep_alive_timeout = settings.http_keep_alive_timeout
        self.app = wrap_app(app, self.config.wsgi_max_body_size, "asgi")
        self.worker_context = WorkerContext(None)
        self.per_address = settings.max_connections_per_address
        self.cap = connection_cap(settings.max_connections)
        self._open: dict[str, int] = {}  # client address → open connections (this listener owns it)
        self._total = 0
        log.info("connections: at most %d in all, %s per client address", self.cap,
                 self.per_address if self.per_address > 0 else "no limit")

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

    def _admit(self, address: str) -> str | None:
        """Count a new connection in, or say why not (sync: no checkpoint between check and count)."""
        if self._total >= self.cap:
            return "server"
        if self.per_address > 0 and self._open.get(address, 0) >= self.per_address:
            return "address"
        self._total += 1
        self._open[address] = self._open.get(address, 0) + 1
        return None

    def _release(self, address: str) -> None:
        self._total -= 1
        left = self._open[address] - 1
        if left:
            self._open[address] = left
        else:
            del self._open[address]

    def statistics(self) -> dict[str, int]:
        return {"open": self._total, "addresses": len(self._open)}

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            address = stream.socket.getpeername()[0]
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        refused = self._admit(address)
        if refused is not None:
            metrics.ERRORS.labels("rate_limited").inc()
            if refused == "address":
                reply = _plain_response("429 Too Many Requests", "rate_limited",
                                        "too many connections from this address", "retry-after: 1")
            else:
                reply = _plain_response("503 Service Unavailable", "internal",
                                        "too many connections", "retry-after: 1")
            await self._refuse(stream, reply)
            return
        try:
            await self._handle(stream, address)
        finally:
            self._release(address)

    async def _refuse(self, stream: trio.SocketStream, reply: bytes) -> None:
        with trio.move_on_after(REFUSE_TIMEOUT):
            try:
                await stream.send_all(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream, address: str) -> None:
        try:
            raw = await self._read_head(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        head = parse_head(raw)
        replay = ReplayStream(stream, raw)
        if head.websocket:
            settings = self.context.settings
            if head.origin is not None and not origin_allowed(
                head.origin, host=head.host, allowed=settings.allowed_origins, dev=settings.dev,
            ):
                metrics.ERRORS.labels("forbidden").inc()
                audit.refused(who=None, what="websocket upgrade", session=None,
                              why=f"Origin {head.origin!r} is not allowed", address=address)
                await self._refuse(stream, _plain_response(
                    "403 Forbidden", "forbidden", "this Origin may not open a WebSocket here"))
                return
            await self._serve_websocket(replay, head.token)
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
                    request = await _wrap_server_stream(
                        nursery, stream, max_message_size=settings.max_frame_bytes,
                        ping_rate=settings.ping_frames_per_second, ping_burst=settings.ping_frame_burst,
                    )
                    ws = await request.accept()
                if handshake.cancelled_caught:
                    nursery.cancel_scope.cancel()
                    return
                del request, handshake  # (the request's headers and the scope, for the connection's life)
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
            await _HTTPConnection(self.app, self.config, self.worker_context, ConnectionState({}), stream)
            nursery.cancel_scope.cancel()


def bound_port(listeners: list[trio.SocketListener]) -> int:
    return listeners[0].socket.getsockname()[1]

