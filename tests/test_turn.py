"""GET /api/turn: ICE servers, and TURN credentials in the coturn REST-API scheme.

coturn's `use-auth-secret` scheme: username = "<unix expiry>:<user>",
credential = base64(HMAC-SHA1(static-auth-secret, username)). The test
recomputes the HMAC itself, so it checks the format coturn will accept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

TURN_SECRET = "coturn-static-auth-secret"
TURN_URLS = ("turn:turn.example.test:3478?transport=udp", "turns:turn.example.test:5349?transport=tcp")
STUN_URLS = ("stun:stun.example.test:3478",)


async def test_without_a_secret_only_stun(make_server):
    server = await make_server(stun_urls=STUN_URLS)
    response = await server.http.get("/api/turn", headers=server.auth("alice"))
    assert response.status_code == 200, response.text
    servers = response.json()["ice_servers"]
    assert servers == [{"urls": list(STUN_URLS)}]
    assert all("credential" not in s and "username" not in s for s in servers)


async def test_nothing_configured_gives_no_servers(server):
    response = await server.http.get("/api/turn", headers=server.auth("alice"))
    assert response.status_code == 200, response.text
    assert response.json()["ice_servers"] == []


async def test_secret_without_urls_gives_no_turn(make_server):
    server = await make_server(turn_secret=TURN_SECRET)
    response = await server.http.get("/api/turn", headers=server.auth("alice"))
    assert response.status_code == 200, response.text
    assert response.json()["ice_servers"] == []


async def test_turn_credentials_follow_the_coturn_scheme(make_server):
    ttl = 600
    server = await make_server(turn_secret=TURN_SECRET, turn_urls=TURN_URLS, stun_urls=STUN_URLS, turn_ttl=ttl)
    before = int(time.time())
    response = await server.http.get("/api/turn", headers=server.auth("alice"))
    after = int(time.time())
    assert response.status_code == 200, response.text
    body = response.json()
    turn = [s for s in body["ice_servers"] if "credential" in s]
    assert len(turn) == 1, body
    entry = turn[0]
    assert entry["urls"] == list(TURN_URLS)
    assert {"urls": list(STUN_URLS)} in body["ice_servers"]

    expiry_text, _, user = entry["username"].partition(":")
    assert user == "alice"
    expiry = int(expiry_text)
    assert before + ttl <= expiry <= after + ttl  # in the future by about turn_ttl

    digest = hmac.new(TURN_SECRET.encode(), entry["username"].encode(), hashlib.sha1).digest()
    assert entry["credential"] == base64.b64encode(digest).decode()
    assert len(base64.b64decode(entry["credential"])) == 20  # an SHA-1 digest


async def test_each_user_gets_their_own_credentials(make_server):
    server = await make_server(turn_secret=TURN_SECRET, turn_urls=TURN_URLS)
    alice = (await server.http.get("/api/turn", headers=server.auth("alice"))).json()["ice_servers"][0]
    bob = (await server.http.get("/api/turn", headers=server.auth("bob"))).json()["ice_servers"][0]
    assert alice["username"].endswith(":alice") and bob["username"].endswith(":bob")
    assert alice["credential"] != bob["credential"]


async def test_turn_needs_a_token(make_server):
    server = await make_server(turn_secret=TURN_SECRET, turn_urls=TURN_URLS)
    response = await server.http.get("/api/turn")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    response = await server.http.get("/api/turn", headers={"Authorization": "Bearer not-a-jwt"})
    assert response.status_code == 401
