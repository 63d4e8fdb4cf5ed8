"""Issue 10, items 1, 4 and 5: HTTP connection lifetimes over raw TCP."""

from __future__ import annotations

import trio

from .rawhttp import get, open_raw, read_response, read_until_close, status_of


async def test_connection_close_is_honoured(server):
    sock = await open_raw(server.port)
    await sock.send(get(headers="Connection: close\r\n"))
    data, closed = await read_until_close(sock, timeout=3)
    assert status_of(data) == 200
    assert closed, "the server kept the connection after `Connection: close`"


async def test_http_1_0_is_closed_after_its_response(server):
    sock = await open_raw(server.port)
    await sock.send(get(version="1.0"))
    data, closed = await read_until_close(sock, timeout=3)
    assert status_of(data) == 200
    assert closed, "the server kept an HTTP/1.0 connection open"


async def test_idle_keep_alive_connections_are_closed(make_server):
    server = await make_server(http_keep_alive_timeout=0.5)
    sock = await open_raw(server.port)
    await sock.send(get())
    assert status_of(await read_response(sock)) == 200
    await sock.send(get())  # keep-alive still serves a second request
    assert status_of(await read_response(sock)) == 200
    started = trio.current_time()
    data, closed = await read_until_close(sock, timeout=5)
    assert closed and data == b"", "an idle keep-alive connection stayed open"
    assert trio.current_time() - started < 3


async def test_invalid_utf8_body_is_400(server):
    sock = await open_raw(server.port)
    body = b'{"client_id": "c", "body": "\xff\xfe"}'
    token = server.token("alice")
    await sock.send(
        b"POST /api/sessions/nope/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    response = await read_response(sock)
    assert status_of(response) == 400, response
    assert b'"bad_request"' in response


async def test_after_a_413_the_connection_is_closed_not_hung(server):
    sock = await open_raw(server.port)
    size = 2 * 1024 * 1024
    token = server.token("admin", admin=True)
    await sock.send(
        b"POST /api/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {size}\r\n\r\n".encode() + b"[" * 100_000
    )
    data, closed = await read_until_close(sock, timeout=5)
    assert status_of(data) == 413, data
    assert closed, "after a 413 the connection neither drained nor closed"
    # and the server serves the next connection
    assert (await server.http.get("/healthz")).status_code == 200
