"""Raw TCP for tests about HTTP framing: what the server sends and whether it closes."""

from __future__ import annotations

import trio


async def open_raw(port: int, *, source: str | None = None) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    if source is not None:
        await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return sock


async def read_until_close(sock: trio.socket.SocketType, *, timeout: float) -> tuple[bytes, bool]:
    """(everything read, whether the server closed within `timeout`)."""
    data = b""
    with trio.move_on_after(timeout):
        while True:
            try:
                chunk = await sock.recv(65536)
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk
    return data, False


async def read_response(sock: trio.socket.SocketType, *, timeout: float = 5.0) -> bytes:
    """One response with a Content-Length body (all this server sends)."""
    data = b""
    with trio.fail_after(timeout):
        while b"\r\n\r\n" not in data:
            chunk = await sock.recv(65536)
            assert chunk, f"closed before a response: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = await sock.recv(65536)
            assert chunk
            body += chunk
    return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def get(path: str = "/healthz", *, version: str = "1.1", headers: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode()
