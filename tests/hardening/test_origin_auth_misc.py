"""Issue 10, items 7 and 9, and the concurrent Idempotency-Key race (Actor seams)."""

from __future__ import annotations

import logging
import time

import jwt
import pytest
import trio

from parley_client import RequestError
from tests.conftest import SECRET

from .rawhttp import open_raw, read_until_close, status_of


def upgrade(origin: str | None, host: str = "127.0.0.1") -> bytes:
    lines = [
        "GET /ws HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def upgrade_status(port: int, origin: str | None, host: str | None = None) -> int:
    sock = await open_raw(port)
    await sock.send(upgrade(origin, host or f"127.0.0.1:{port}"))
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            chunk = await sock.recv(4096)
            if not chunk:
                break
            data += chunk
    sock.close()
    return status_of(data)


@pytest.mark.parametrize("origin, allowed", [
    (None, True), ("OWN", True), ("http://localhost:5173", True), ("http://127.0.0.1:9", True),
    ("https://evil.example", False), ("null", False), ("http://localhost.evil.example", False),
])
async def test_origin_checked_before_the_upgrade_in_dev_mode(server, origin, allowed):
    if origin == "OWN":
        origin = f"http://127.0.0.1:{server.port}"
    assert await upgrade_status(server.port, origin) == (101 if allowed else 403)


async def test_origin_allow_list_outside_dev_mode(make_server):
    server = await make_server(dev=False, allowed_origins=("https://app.example",))
    assert await upgrade_status(server.port, "https://app.example") == 101
    assert await upgrade_status(server.port, f"http://127.0.0.1:{server.port}") == 101  # its own
    assert await upgrade_status(server.port, "http://localhost:5173") == 403
    assert await upgrade_status(server.port, "https://evil.example") == 403


async def test_cors_only_for_allowed_origins(server):
    ok = await server.http.get("/healthz", headers={"Origin": "http://localhost:3000"})
    assert ok.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    evil = await server.http.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers
    preflight = await server.http.request("OPTIONS", "/api/sessions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert preflight.status_code < 300
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


async def test_signal_without_payload_is_bad_request(server):
    async with server.client("alice") as alice:
        await alice.send_raw({"type": "signal", "ref": "s1", "session": "s", "to": "bob", "kind": "offer"})
        error = await alice.next_event("error", timeout=5)
        assert (error["code"], error["ref"]) == ("bad_request", "s1")


@pytest.mark.parametrize("currency, status", [("ZZZ", 422), ("usd", 422), ("EUR", 201), ("JPY", 201)])
async def test_currency_is_iso_4217(server, currency, status):
    body = {"payer": "a", "provider": "b", "rate_per_minute": 1, "currency": currency}
    response = await server.http.post("/api/sessions", json=body, headers=server.auth("admin", admin=True))
    assert response.status_code == status, response.text


async def test_exp_as_a_numeric_string_is_refused(server):
    token = jwt.encode({"sub": "alice", "exp": str(int(time.time()) + 3600)}, SECRET, algorithm="HS256")
    response = await server.http.get("/api/sessions", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, response.text


async def test_refused_authorizations_are_audit_logged_without_tokens(server, caplog):
    caplog.set_level(logging.INFO)
    session = await server.create_session()
    token = server.token("mallory")
    response = await server.http.get(f"/api/sessions/{session['id']}", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "parley.audit"]
    assert any("mallory" in line and session["id"] in line for line in lines), lines
    assert all(token not in r.getMessage() for r in caplog.records)
    async with server.client("mallory") as mallory:
        await mallory.send_raw({"type": "join", "ref": "j", "session": session["id"]})
        assert (await mallory.next_event("error"))["code"] == "forbidden"
        with pytest.raises(RequestError):
            await mallory.request("chat.history", session=session["id"])
    lines = [r.getMessage() for r in caplog.records if r.name == "parley.audit"]
    assert any("mallory" in line and "JoinSession" in line and session["id"] in line for line in lines), lines
    assert any("mallory" in line and "ChatHistory" in line and session["id"] in line for line in lines), lines
    await upgrade_status(server.port, "https://evil.example")
    lines = [r.getMessage() for r in caplog.records if r.name == "parley.audit"]
    assert any("evil.example" in line for line in lines), lines


async def test_a_query_string_token_never_reaches_a_log_line(make_server, caplog):
    caplog.set_level(logging.DEBUG)
    server = await make_server()
    from parley_client import connect

    token = server.token("alice")
    async with connect(server.ws_url, token, token_in_query=True) as alice:
        assert (await alice.request("ping"))["type"] == "ok"
    bad = "not.a.valid-token-value"
    sock = await open_raw(server.port)
    await sock.send(upgrade(None).replace(b"/ws", f"/ws?token={bad}".encode(), 1))
    await read_until_close(sock, timeout=2)
    # the test's own client logs its URL ("Connecting to ..."): only the server's lines count
    text = "\n".join(r.getMessage() for r in caplog.records if not r.getMessage().startswith("Connecting to"))
    assert token not in text and bad not in text


def test_the_process_log_filter_redacts_query_tokens():
    from run import RedactTokens

    record = logging.LogRecord("x", logging.INFO, "f", 1, "GET %s", ("/ws?token=abc.def-ghi&x=1",), None)
    assert RedactTokens().filter(record)
    assert record.getMessage() == "GET /ws?token=[redacted]&x=1"


async def upgraded(server):
    """A raw socket, upgraded to a WebSocket on /ws (no hello yet)."""
    sock = await open_raw(server.port)
    await sock.send(upgrade(None, f"127.0.0.1:{server.port}"))
    head = b""
    while b"\r\n\r\n" not in head:
        head += await sock.recv(4096)
    assert status_of(head) == 101
    return sock


async def close_code_after(sock, frame: bytes) -> int:
    """Send one raw frame; the code of the close frame the server answers with."""
    await sock.send(frame)
    data, _ = await read_until_close(sock, timeout=5)
    assert data[:1] == b"\x88", data  # a close frame
    return int.from_bytes(data[2:4], "big")


async def test_invalid_utf8_text_frame_is_closed_1007(server):
    sock = await upgraded(server)
    payload = b"\xff\xfe"
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert await close_code_after(sock, bytes([0x81, 0x80 | len(payload)]) + mask + masked) == 1007  # masked text
    assert (await server.http.get("/healthz")).status_code == 200


async def test_an_unmasked_client_frame_is_closed_1002(server):
    """A client frame must be masked (RFC 6455 5.1): the server closes with 1002, not a dropped socket."""
    sock = await upgraded(server)
    payload = b'{"type":"ping"}'
    assert await close_code_after(sock, bytes([0x81, len(payload)]) + payload) == 1002  # no mask
    assert (await server.http.get("/healthz")).status_code == 200


async def test_health_routes_are_in_openapi(server):
    paths = (await server.http.get("/openapi.json")).json()["paths"]
    for route in ("/healthz", "/readyz", "/metrics"):
        assert route in paths


async def test_concurrent_requests_with_one_idempotency_key_both_get_the_reply(server):
    session = await server.create_session()
    headers = {**server.auth("alice"), "Idempotency-Key": "start-1"}
    responses = []

    async def start() -> None:
        responses.append(await server.http.post(f"/api/sessions/{session['id']}/start", headers=headers))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(start)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1


async def test_reusing_an_idempotency_key_with_another_body_is_422(server):
    headers = {**server.auth("admin", admin=True), "Idempotency-Key": "create-1"}
    body = {"payer": "a", "provider": "b", "rate_per_minute": 100, "currency": "USD"}
    first = await server.http.post("/api/sessions", json=body, headers=headers)
    again = await server.http.post("/api/sessions", json=body, headers=headers)
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    other = await server.http.post("/api/sessions", json={**body, "rate_per_minute": 1}, headers=headers)
    assert other.status_code == 422, other.text
