"""Issue 10, items 2 and 3: deep nesting and big integers, on both edges, over real sockets."""

from __future__ import annotations

import orjson
import pytest

from protocol.bounds import INT_MAX, MAX_JSON_DEPTH, too_deep


async def error_for(client, frame: str) -> dict:
    await client.send_raw(frame)
    return await client.next_event("error", timeout=5)


async def still_open(client) -> None:
    assert (await client.request("ping", timeout=5))["type"] == "ok"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 1_000, 20_000])
async def test_deep_signal_payload_is_bad_request_not_1011(server, depth):
    async with server.client("alice") as alice:
        frame = '{"type":"signal","ref":"d","session":"s","to":"bob","kind":"offer","payload":' + nested(depth) + "}"
        error = await error_for(alice, frame)
        assert error["code"] == "bad_request", error
        assert error.get("ref") in ("d", None)
        await still_open(alice)


@pytest.mark.parametrize("field, value", [
    ("after_seq", 2**63), ("before_seq", 2**64), ("after_seq", 10**30), ("limit", 2**63), ("after_seq", -(2**63) - 1),
])
async def test_huge_history_bounds_are_bad_request_not_1011(server, field, value):
    async with server.client("alice") as alice:
        frame = f'{{"type":"chat.history","ref":"h","session":"s","{field}":{value}}}'
        error = await error_for(alice, frame)
        assert (error["code"], error.get("ref")) == ("bad_request", "h"), error
        await still_open(alice)


async def test_huge_receipt_seq_is_bad_request(server):
    async with server.client("alice") as alice:
        error = await error_for(alice, f'{{"type":"chat.receipt","ref":"r","session":"s","kind":"read","seq":{2**63}}}')
        assert error["code"] == "bad_request"
        await still_open(alice)


@pytest.mark.parametrize("query", [
    f"after_seq={2**63}", f"before_seq={10**30}", f"limit={2**70}", "after_seq=-1", "limit=0",
])
async def test_huge_query_integers_are_422_not_500(server, query):
    session = await server.create_session()
    response = await server.http.get(f"/api/sessions/{session['id']}/messages?{query}", headers=server.auth("alice"))
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("cursor", [str(2**64), "²", "１２"])
async def test_odd_cursors_are_422(server, cursor):
    response = await server.http.get("/api/sessions", params={"cursor": cursor}, headers=server.auth("alice"))
    assert response.status_code == 422, response.text


async def test_deep_rest_body_is_400_not_500(server):
    body = '{"payer":"a","provider":"b","rate_per_minute":1,"currency":"USD","metadata":{"x":' + nested(20_000) + "}}"
    response = await server.http.post(
        "/api/sessions", content=body, headers={**server.auth("admin", admin=True), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("number", [2**63, 2**64 + 1, -(2**63) - 1])
async def test_big_integers_in_rest_bodies_are_refused(server, number):
    body = f'{{"payer":"a","provider":"b","rate_per_minute":{number},"currency":"USD"}}'
    response = await server.http.post(
        "/api/sessions", content=body, headers={**server.auth("admin", admin=True), "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422), response.text
    body = f'{{"payer":"a","provider":"b","rate_per_minute":1,"currency":"USD","metadata":{{"n":{number}}}}}'
    response = await server.http.post(
        "/api/sessions", content=body, headers={**server.auth("admin", admin=True), "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422), response.text


def test_depth_check_matches_a_parser():
    for text in ["[]", nested(32), nested(33), '{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', '["\\\\",' + nested(40) + "]",
                 '["\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]', "[" + "[],{}," * 100 + "1]"]:
        value = orjson.loads(text)

        def depth(v):
            if isinstance(v, list):
                return 1 + max((depth(x) for x in v), default=0)
            if isinstance(v, dict):
                return 1 + max((depth(x) for x in v.values()), default=0)
            return 0

        assert too_deep(text.encode()) == (depth(value) > MAX_JSON_DEPTH), text
    assert INT_MAX == 2**63 - 1
