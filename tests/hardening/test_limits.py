"""Issue 10, items 1 and 6: connections per address, fd exhaustion, REST and ping rate limits."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import trio
import wsproto.events
import wsproto.utilities
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.processes import LISTENING, ROOT

from .rawhttp import get, open_raw, read_response, read_until_close, status_of


async def test_rest_writes_of_a_user_are_rate_limited_with_retry_after(make_server):
    server = await make_server(rest_writes_per_second=2.0, rest_write_burst=5)
    session = await server.create_session()
    statuses = []
    for n in range(8):
        response = await server.http.post(
            f"/api/sessions/{session['id']}/messages", json={"client_id": f"c{n}", "body": "hi"},
            headers=server.auth("alice"),
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limited"
            assert int(response.headers["Retry-After"]) >= 1
    assert statuses[:5] == [201] * 5 and 429 in statuses[5:], statuses
    # another user has a bucket of their own; reads and admins are not limited
    response = await server.http.post(f"/api/sessions/{session['id']}/messages",
                                      json={"client_id": "b1", "body": "hi"}, headers=server.auth("bob"))
    assert response.status_code == 201
    assert (await server.http.get(f"/api/sessions/{session['id']}/messages", headers=server.auth("alice"))).status_code == 200
    for _ in range(8):
        await server.create_session()


async def test_a_ping_flood_gets_no_pongs_and_is_closed_4008(make_server):
    server = await make_server(ping_frames_per_second=1.0, ping_frame_burst=5)
    async with open_websocket_url(server.ws_url + "?token=" + server.token("alice")) as ws:
        welcome = await ws.get_message()
        assert "welcome" in welcome
        with trio.fail_after(10):
            try:
                for n in range(300):
                    await ws._send(wsproto.events.Ping(payload=b"%d" % n))
                    await trio.sleep(0)
                while True:
                    await ws.get_message()
            except (ConnectionClosed, wsproto.utilities.LocalProtocolError):
                pass
            while ws.closed is None:
                await trio.sleep(0.01)
        assert ws.closed.code == 4008, ws.closed
    assert (await server.http.get("/healthz")).status_code == 200


async def test_connections_per_address_are_capped_and_others_get_in(make_server):
    server = await make_server(max_connections_per_address=5)
    held = [await open_raw(server.port, source="127.0.0.2") for _ in range(5)]
    for sock in held:  # each is a live keep-alive connection
        await sock.send(get())
        assert status_of(await read_response(sock)) == 200
    extra = await open_raw(server.port, source="127.0.0.2")
    data, closed = await read_until_close(extra, timeout=3)
    assert closed and status_of(data) == 429, data
    # another address is not affected, for REST and WebSocket alike
    assert (await server.http.get("/healthz")).status_code == 200
    async with server.client("alice") as alice:
        assert (await alice.request("ping"))["type"] == "ok"
    for sock in held:
        sock.close()
    with trio.fail_after(5):  # the count goes back down
        while True:
            again = await open_raw(server.port, source="127.0.0.2")
            await again.send(get(headers="Connection: close\r\n"))
            data, _ = await read_until_close(again, timeout=3)
            if status_of(data) == 200:
                break
            await trio.sleep(0.05)


async def test_fd_exhaustion_idle_connections_cannot_lock_out_clients(nursery, tmp_path):
    """A server whose open-file limit is 200 (hard 256), and 400 idle keep-alive connections
    from 20 addresses: the server raises its limit to 256, refuses what it cannot hold,
    closes idle ones after the keep-alive timeout, and a normal client still gets in."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 256))

    env = {**os.environ, "PARLEY_SECRET": "s" * 40, "PARLEY_LOG_LEVEL": "INFO"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "run.py", "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
         "--keep-alive-timeout", "2", "--max-connections-per-address", "0"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=low_limit,
    )
    log = b""
    try:
        with trio.fail_after(30):
            while (match := LISTENING.search(log.decode(errors="replace"))) is None:
                chunk = await process.stderr.receive_some()
                assert chunk, log.decode(errors="replace")
                log += chunk

        async def drain() -> None:
            nonlocal log
            async for chunk in process.stderr:
                log += chunk

        nursery.start_soon(drain)
        assert b"open-file limit raised from 200 to 256" in log, log
        port = int(match.group(2))
        attackers = []
        refused = 0
        for n in range(400):
            sock = await open_raw(port, source=f"127.0.0.{2 + n % 20}")
            await sock.send(get())
            attackers.append(sock)
        for sock in attackers:
            data = await read_response(sock, timeout=10)
            refused += status_of(data) == 503
        assert refused > 0, "the server accepted more connections than it has files for"
        # a normal client gets in as soon as idle connections time out (2 s here)
        with trio.fail_after(10):
            while True:
                client = await open_raw(port)
                await client.send(get(headers="Connection: close\r\n"))
                data, _ = await read_until_close(client, timeout=5)
                client.close()
                if data and status_of(data) == 200:
                    break
                await trio.sleep(0.2)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send_message('{"type":"ping"}')  # before hello: refused with 4001, but served
            with trio.fail_after(5):
                try:
                    await ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 4001
        assert b"EMFILE" not in log and b"Too many open files" not in log, log.decode(errors="replace")[-2000:]
        for sock in attackers:
            sock.close()
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
