"""The heartbeat wheel (actors/heartbeat.py) with fake connections, under `autojump_clock`,
and the server WebSocket's non-blocking ping (gateway/listener.py `_ServerWebSocket`)."""

from __future__ import annotations

import os

import trio
import trio.testing
import wsproto
from wsproto import ConnectionType, WSConnection
from wsproto.events import Ping, Request

from actors.heartbeat import SLOTS, HeartbeatWheel
from gateway.listener import _wrap_server_stream

INTERVAL = 10.0
STEP = INTERVAL / SLOTS


class FakeConn:
    """A connection as the wheel sees it; `answers`: it pongs every ping at once."""

    def __init__(self, *, answers: bool = True) -> None:
        self.last_alive = trio.current_time()
        self.answers = answers
        self.pings: list[float] = []
        self.reports: list[float] = []
        self._reported = self.last_alive
        self.timed_out_at: float | None = None
        self.went_away = False

    def ping(self) -> None:
        self.pings.append(trio.current_time())
        if self.answers:
            self.last_alive = trio.current_time()
            self.report_alive()

    def report_alive(self) -> None:
        if self.last_alive != self._reported:
            self._reported = self.last_alive
            self.reports.append(self.last_alive)

    def heartbeat_timeout(self) -> None:
        self.timed_out_at = trio.current_time()

    def going_away(self) -> None:
        self.went_away = True


async def test_a_silent_connection_times_out_after_two_intervals_and_is_pinged_once(autojump_clock, nursery):
    wheel = HeartbeatWheel(INTERVAL)
    await nursery.start(wheel.run)
    await trio.sleep(3.3)
    conn = FakeConn(answers=False)
    wheel.register(conn)
    started = conn.last_alive
    await trio.sleep(5 * INTERVAL)
    assert conn.timed_out_at is not None
    assert 2 * INTERVAL <= conn.timed_out_at - started <= 2 * INTERVAL + STEP
    assert len(conn.pings) == 1 and INTERVAL <= conn.pings[0] - started <= INTERVAL + STEP
    assert len(wheel) == 0


async def test_an_answering_connection_is_pinged_once_an_interval_and_reported_each_pong(autojump_clock, nursery):
    wheel = HeartbeatWheel(INTERVAL)
    await nursery.start(wheel.run)
    conn = FakeConn()
    wheel.register(conn)
    await trio.sleep(10 * INTERVAL + 0.5)
    assert conn.timed_out_at is None
    gaps = [b - a for a, b in zip(conn.pings, conn.pings[1:])]
    assert len(conn.pings) >= 9 and all(INTERVAL <= gap <= INTERVAL + STEP for gap in gaps), conn.pings
    assert conn.reports == conn.pings  # the sessions hear every pong


async def test_a_connection_with_traffic_is_not_pinged_but_still_reported_each_interval(autojump_clock, nursery):
    wheel = HeartbeatWheel(INTERVAL)
    await nursery.start(wheel.run)
    conn = FakeConn()
    wheel.register(conn)
    for _ in range(100):  # a frame every second for 100 s
        await trio.sleep(1.0)
        conn.last_alive = trio.current_time()
    assert conn.pings == []
    assert conn.timed_out_at is None
    gaps = [b - a for a, b in zip(conn.reports, conn.reports[1:])]
    assert len(conn.reports) >= 9 and all(gap <= INTERVAL + STEP for gap in gaps), conn.reports


async def test_nothing_changed_means_no_report(autojump_clock, nursery):
    wheel = HeartbeatWheel(INTERVAL)
    await nursery.start(wheel.run)
    conn = FakeConn(answers=False)
    wheel.register(conn)
    await trio.sleep(3 * INTERVAL)
    assert conn.reports == []  # silent: the sessions keep what they heard (billing stops there)


async def test_unregistered_connections_are_forgotten_and_shutdown_walks_the_rest(autojump_clock, nursery):
    wheel = HeartbeatWheel(INTERVAL)
    await nursery.start(wheel.run)
    gone, staying = FakeConn(answers=False), FakeConn()
    beat = wheel.register(gone)
    wheel.register(staying)
    wheel.unregister(beat)
    await trio.sleep(3 * INTERVAL)
    assert gone.pings == [] and gone.timed_out_at is None
    wheel.shut_down()
    assert staying.went_away and not gone.went_away


async def test_the_wheel_sleeps_while_nobody_is_registered(autojump_clock, nursery):
    wheel = HeartbeatWheel(INTERVAL)
    await nursery.start(wheel.run)
    await trio.sleep(1000)
    conn = FakeConn(answers=False)
    wheel.register(conn)
    await trio.sleep(3 * INTERVAL)
    assert conn.timed_out_at is not None and conn.timed_out_at - conn.last_alive <= 2 * INTERVAL + STEP


# ---------------------------------------------------------------- the socket side


async def _server_ws(nursery: trio.Nursery, stream: trio.abc.Stream):
    request = await _wrap_server_stream(nursery, stream, max_message_size=1 << 16, ping_rate=5.0, ping_burst=20)
    return await request.accept()


def _handshake(client: WSConnection) -> bytes:
    return client.send(Request(host="parley.test", target="/ws"))


async def test_a_ping_on_a_socket_that_takes_nothing_waits_without_blocking_and_keeps_frames_whole(nursery):
    """A real socket pair whose peer reads nothing: the ping is left to a flush task, the
    caller never waits, and once the peer reads, every frame arrives whole and in order."""
    a, b = trio.socket.socketpair()
    a.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(_handshake(client))
    ws = await _server_ws(nursery, server_stream)
    client.receive_data(await client_stream.receive_some(65536))
    assert isinstance(next(client.events()), wsproto.events.AcceptConnection)
    pongs: list[float] = []
    ws.on_pong = lambda: pongs.append(trio.current_time())

    big = "x" * 1000
    sent = 0
    async with trio.open_nursery() as writers:
        async def write_until_blocked() -> None:
            nonlocal sent
            while True:
                await ws.send_message(big)
                sent += 1

        writers.start_soon(write_until_blocked)
        await trio.testing.wait_all_tasks_blocked()  # the socket is full: the writer waits
        for _ in range(3):
            ws.ping_nowait()  # returns at once although the socket takes nothing
        assert ws._unsent
        # the peer reads everything: the frames are whole, the pings among them
        received_text, received_pings = 0, 0
        with trio.fail_after(10):
            while received_pings < 3:
                client.receive_data(await client_stream.receive_some(65536))
                for event in client.events():
                    if isinstance(event, wsproto.events.TextMessage):
                        assert event.data == big
                        received_text += 1
                    elif isinstance(event, Ping):
                        received_pings += 1
                        await client_stream.send_all(client.send(event.response()))
        writers.cancel_scope.cancel()
    with trio.fail_after(5):
        while not pongs:
            await trio.sleep(0.01)
    assert received_text >= 1


async def test_a_ping_on_an_idle_socket_is_written_at_once(nursery):
    a, b = trio.socket.socketpair()
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(_handshake(client))
    ws = await _server_ws(nursery, server_stream)
    client.receive_data(await client_stream.receive_some(65536))
    list(client.events())
    ws.ping_nowait()
    assert not ws._unsent  # no task, no waiting: one non-blocking send
    client.receive_data(await client_stream.receive_some(65536))
    assert [type(e) for e in client.events()] == [Ping]


async def test_a_ping_the_socket_takes_only_part_of_is_finished_by_a_flush_task(nursery, monkeypatch):
    """The kernel took 1 byte of the ping (2 bytes): the rest is written, in order, by a
    flush task, before any later frame."""
    import gateway.listener as listener

    a, b = trio.socket.socketpair()
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(_handshake(client))
    ws = await _server_ws(nursery, server_stream)
    client.receive_data(await client_stream.receive_some(65536))
    list(client.events())

    real_write = os.write

    class PartialOs:
        @staticmethod
        def write(fd: int, data: bytes) -> int:
            return real_write(fd, data[:1])

    monkeypatch.setattr(listener, "os", PartialOs)
    ws.ping_nowait()
    assert ws._unsent
    await ws.send_message("after")
    with trio.fail_after(5):
        seen: list[type] = []
        while len(seen) < 2:
            client.receive_data(await client_stream.receive_some(65536))
            seen += [type(e) for e in client.events()]
    assert seen == [Ping, wsproto.events.TextMessage]
    assert not ws._unsent


def test_the_ping_frame_is_what_wsproto_makes_of_a_ping():
    from gateway.listener import PING_FRAME

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(_handshake(client))
    next(server.events())
    client.receive_data(server.send(wsproto.events.AcceptConnection()))
    assert server.send(Ping()) == PING_FRAME


async def test_the_server_websocket_keeps_a_shared_key_instance_dict(nursery):
    """CPython shares an instance dict's keys up to 30 attributes; one more and every
    connection's dict costs ~1.3 KiB more (bench/README.md, performance pass 2)."""
    server_stream, _ = trio.testing.memory_stream_pair()
    from gateway.listener import _ServerWebSocket

    ws = _ServerWebSocket(server_stream, WSConnection(ConnectionType.SERVER), nursery=nursery,
                          ping_rate=5.0, ping_burst=20)
    assert len(ws.__dict__) < 30
