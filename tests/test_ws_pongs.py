"""The pong fast path of the server WebSocket (gateway/listener.py `_ServerWebSocket._take_pongs`),
with real frames over a real socket pair: a pong is answered without wsproto only when it is
whole, valid and read between frames; everything else is wsproto's, as before."""

from __future__ import annotations

import pytest
import trio
import trio.testing
import wsproto
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from gateway.listener import ReplayStream, _wrap_server_stream

MASK = b"\x37\xfa\x21\x3d"


def frame(first: int, payload: bytes, *, masked: bool = True, length: int | None = None) -> bytes:
    """One client frame, built by hand (wsproto's client would refuse to build the bad ones)."""
    n = len(payload) if length is None else length
    if not masked:
        return bytes([first, n]) + payload
    return bytes([first, 0x80 | n]) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def pong(payload: bytes = b"") -> bytes:
    return frame(0x8A, payload)


class Pair:
    """A server WebSocket over one end of a socket pair, a wsproto client on the other."""

    def __init__(self, ws, client_stream: trio.SocketStream, client: WSConnection) -> None:
        self.ws, self.stream, self.client = ws, client_stream, client
        self.pongs = 0
        ws.on_pong = self._pong

    def _pong(self) -> None:
        self.pongs += 1

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)
        await trio.testing.wait_all_tasks_blocked()

    async def close_code(self) -> int:
        """The code of the close frame the server sends (it then drops the socket)."""
        with trio.fail_after(5):
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise AssertionError("the socket closed without a close frame")
                self.client.receive_data(data)
                for event in self.client.events():
                    if isinstance(event, wsproto.events.CloseConnection):
                        return event.code


@pytest.fixture
async def pair(nursery):
    a, b = trio.socket.socketpair()
    server_stream, client_stream = ReplayStream(trio.SocketStream(a), b""), trio.SocketStream(b)
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(client.send(Request(host="parley.test", target="/ws")))
    request = await _wrap_server_stream(nursery, server_stream, max_message_size=1 << 16, ping_rate=5.0,
                                        ping_burst=20)
    ws = await request.accept()
    client.receive_data(await client_stream.receive_some(65536))
    assert isinstance(next(client.events()), AcceptConnection)
    return Pair(ws, client_stream, client)


@pytest.fixture
def wsproto_reads(monkeypatch):
    """The reads that reached the server's wsproto after the handshake."""
    calls: list[bytes] = []
    real = wsproto.WSConnection.receive_data

    def counting(self, data):
        if not self.client and self.connection is not None:
            calls.append(bytes(data))
        return real(self, data)

    monkeypatch.setattr(wsproto.WSConnection, "receive_data", counting)
    return calls


async def test_a_lone_pong_is_answered_without_wsproto(pair, wsproto_reads):
    await pair.send(pong())
    await pair.send(pong(b"x" * 125))  # the largest payload a control frame may have
    assert pair.pongs == 2
    assert wsproto_reads == []


async def test_several_pongs_in_one_read_are_one_alive_instant(pair, wsproto_reads):
    await pair.send(pong(b"1") + pong(b"") + pong(b"3" * 40))
    assert pair.pongs == 1
    assert wsproto_reads == []


async def test_a_pong_split_across_reads_goes_through_wsproto(pair, wsproto_reads):
    data = pong(b"abcd")
    for seen, cut in enumerate((1, 2, 5, 9)):  # inside the header, the mask, the payload
        await pair.send(data[:cut])
        assert pair.pongs == seen  # not whole yet: nothing
        await pair.send(data[cut:])
        assert pair.pongs == seen + 1

    assert wsproto_reads  # wsproto assembled them


async def test_a_pong_then_text_in_one_read_are_both_seen_in_order(pair):
    text = b'{"type":"ping"}'
    await pair.send(pong(b"p") + frame(0x81, text))
    assert pair.pongs == 1
    with trio.fail_after(5):
        assert await pair.ws.get_message() == text.decode()


async def test_text_then_pong_in_one_read_are_both_seen(pair):
    await pair.send(frame(0x81, b"hello") + pong())
    assert pair.pongs == 1
    with trio.fail_after(5):
        assert await pair.ws.get_message() == "hello"


async def test_a_pong_between_the_frames_of_a_fragmented_message(pair, wsproto_reads):
    await pair.send(frame(0x01, b"frag"))  # text, FIN unset
    await pair.send(pong(b"mid"))  # RFC 6455 5.4: control frames may be injected here
    assert pair.pongs == 1
    await pair.send(frame(0x80, b"mented"))  # continuation, FIN
    with trio.fail_after(5):
        assert await pair.ws.get_message() == "fragmented"
    assert not any(read.startswith(b"\x8a") for read in wsproto_reads)  # the pong took the fast path


async def test_a_pong_while_a_data_frame_is_half_read_is_wsproto_s(pair, wsproto_reads):
    text = frame(0x81, b"x" * 100)
    await pair.send(text[:50])
    await pair.send(text[50:])
    await pair.send(pong())
    with trio.fail_after(5):
        assert await pair.ws.get_message() == "x" * 100
    assert pair.pongs == 1


@pytest.mark.parametrize("bad", [
    frame(0x8A, b"", masked=False),  # a client frame must be masked (5.1)
    frame(0x0A, b""),  # a control frame must not be fragmented (5.5)
    frame(0xCA, b""),  # RSV1 without an extension (5.2)
    frame(0x8A, b"", length=126) + b"\x00\x7e" + b"x" * 126,  # control payload > 125 (5.5)
])
async def test_bad_pongs_are_refused_1002_as_before(pair, bad):
    await pair.send(bad)
    assert pair.pongs == 0
    assert await pair.close_code() == 1002


async def test_a_good_pong_then_a_bad_one_in_one_read(pair):
    await pair.send(pong() + frame(0x8A, b"", masked=False))
    assert pair.pongs == 1
    assert await pair.close_code() == 1002


async def test_a_pong_awaited_by_ping_still_wakes_it(pair):
    """trio-websocket's own `ping()` waits for its pong: such reads stay wsproto's."""
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def pinger() -> None:
            await pair.ws.ping(b"abcd")
            done.set()

        nursery.start_soon(pinger)
        with trio.fail_after(5):
            while True:
                pair.client.receive_data(await pair.stream.receive_some(65536))
                pings = [e for e in pair.client.events() if isinstance(e, wsproto.events.Ping)]
                if pings:
                    break
        await pair.send(pair.client.send(pings[0].response()))
        with trio.fail_after(5):
            await done.wait()
    assert pair.pongs == 1


async def test_a_peer_that_resets_is_an_abnormal_close(pair):
    pair.stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await pair.send(pong())
    pair.stream.socket.close()
    with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
        await pair.ws.get_message()
    assert closed.value.reason.code == 1006


async def test_a_socket_closed_under_the_waiting_reader_ends_it(pair):
    """The listener closes the stream while the reader waits for the socket (after a pong):
    trio wakes it (`notify_closing`), and the WebSocket ends as an abnormal close."""
    await pair.send(pong())
    with trio.fail_after(5):
        await trio.aclose_forcefully(pair.ws._stream)
        with pytest.raises(ConnectionClosed) as closed:
            await pair.ws.get_message()
    assert closed.value.reason.code == 1006
