"""The REST API of PRODUCT.md section 7 over real HTTP: auth, sessions, transitions,
idempotency, validation, error format, operations endpoints."""

from __future__ import annotations

import time

import jwt
import pytest

from tests.conftest import SECRET

BODY = {"payer": "alice", "provider": "bob", "rate_per_minute": 100, "currency": "USD"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------- auth


def _bad_auth() -> dict[str, dict[str, str]]:
    now = int(time.time())
    return {
        "no header": {},
        "not bearer": {"Authorization": "Basic YWxpY2U6cHc="},
        "empty bearer": {"Authorization": "Bearer"},
        "bad signature": bearer(jwt.encode({"sub": "admin", "role": "admin", "exp": now + 60}, "x" * 40, algorithm="HS256")),
        "expired": bearer(jwt.encode({"sub": "admin", "role": "admin", "exp": now - 60}, SECRET, algorithm="HS256")),
        "alg none": bearer(jwt.encode({"sub": "admin", "role": "admin", "exp": now + 60}, None, algorithm="none")),
        "no exp": bearer(jwt.encode({"sub": "admin", "role": "admin"}, SECRET, algorithm="HS256")),
        "bad role": bearer(jwt.encode({"sub": "admin", "role": "root", "exp": now + 60}, SECRET, algorithm="HS256")),
        "garbage": bearer("a.b.c"),
    }


@pytest.mark.parametrize("case", list(_bad_auth()))
async def test_bad_credentials_are_401(server, case):
    headers = _bad_auth()[case]
    assert_error(await server.http.post("/api/sessions", json=BODY, headers=headers), 401, "unauthorized")
    assert_error(await server.http.get("/api/sessions", headers=headers), 401, "unauthorized")


async def test_only_admins_create_sessions(server):
    assert_error(await server.http.post("/api/sessions", json=BODY, headers=server.auth("alice")), 403, "forbidden")
    listing = await server.http.get("/api/sessions", headers=server.auth("admin", admin=True))
    assert listing.json()["items"] == []


# ---------------------------------------------------------------- create / get / list


async def test_create_and_get(server):
    created = await server.http.post(
        "/api/sessions", headers=server.auth("admin", admin=True),
        json={**BODY, "guests": ["carol"], "metadata": {"topic": "tax"}, "max_amount_minor": 5000},
    )
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["state"] == "scheduled"
    assert (session["payer"], session["provider"], session["guests"]) == ("alice", "bob", ["carol"])
    assert (session["rate_per_minute"], session["currency"], session["max_amount_minor"]) == (100, "USD", 5000)
    assert session["metadata"] == {"topic": "tax"}
    assert session["created_at"].endswith("Z") and session["started_at"] is None and session["end_reason"] is None
    for user, admin in [("alice", False), ("bob", False), ("carol", False), ("admin", True)]:
        got = await server.http.get(f"/api/sessions/{session['id']}", headers=server.auth(user, admin=admin))
        assert got.status_code == 200 and got.json() == session


async def test_unknown_is_404_and_non_participant_403(server):
    session = await server.create_session()
    assert_error(await server.http.get("/api/sessions/nope", headers=server.auth("alice")), 404, "not_found")
    assert_error(await server.http.post("/api/sessions/nope/start", headers=server.auth("admin", admin=True)), 404, "not_found")
    for route in ("", "/start", "/end", "/cancel"):
        method = server.http.get if not route else server.http.post
        assert_error(await method(f"/api/sessions/{session['id']}{route}", headers=server.auth("mallory")), 403, "forbidden")
    still = await server.http.get(f"/api/sessions/{session['id']}", headers=server.auth("alice"))
    assert still.json()["state"] == "scheduled"


async def test_list_newest_first_filtered_paged_and_scoped(server):
    ids = []
    for i in range(7):
        payer = "alice" if i % 2 == 0 else "dave"
        ids.append((await server.create_session(payer=payer, provider="bob"))["id"])
    await server.start_session(ids[0])
    admin = server.auth("admin", admin=True)

    everything = (await server.http.get("/api/sessions", headers=admin)).json()
    assert [s["id"] for s in everything["items"]] == ids[::-1]
    assert everything["next_cursor"] is None

    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await server.http.get("/api/sessions", params=params, headers=admin)).json()
        assert len(page["items"]) <= 3
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]

    active = (await server.http.get("/api/sessions", params={"state": "active"}, headers=admin)).json()
    assert [s["id"] for s in active["items"]] == [ids[0]]
    scheduled = (await server.http.get("/api/sessions", params={"state": "scheduled"}, headers=admin)).json()
    assert [s["id"] for s in scheduled["items"]] == ids[1:][::-1]

    alice = (await server.http.get("/api/sessions", headers=server.auth("alice"))).json()
    assert [s["id"] for s in alice["items"]] == [ids[i] for i in (6, 4, 2, 0)]
    bob = (await server.http.get("/api/sessions", params={"limit": 2}, headers=server.auth("bob"))).json()
    assert [s["id"] for s in bob["items"]] == ids[::-1][:2] and bob["next_cursor"] is not None
    nobody = (await server.http.get("/api/sessions", headers=server.auth("mallory"))).json()
    assert nobody == {"items": [], "next_cursor": None}

    assert_error(await server.http.get("/api/sessions", params={"state": "bogus"}, headers=admin), 422, "bad_request")
    assert_error(await server.http.get("/api/sessions", params={"cursor": "xyz"}, headers=admin), 422, "bad_request")
    assert_error(await server.http.get("/api/sessions", params={"limit": 0}, headers=admin), 422, "bad_request")


# ---------------------------------------------------------------- transitions


async def test_transitions_and_409_naming_the_state(server):
    session = await server.create_session()
    sid = session["id"]
    alice = server.auth("alice")
    error = assert_error(await server.http.post(f"/api/sessions/{sid}/end", headers=alice), 409, "conflict")
    assert error["state"] == "scheduled"
    started = await server.http.post(f"/api/sessions/{sid}/start", headers=alice)
    assert started.status_code == 200 and started.json()["state"] == "active" and started.json()["started_at"]
    error = assert_error(await server.http.post(f"/api/sessions/{sid}/start", headers=alice), 409, "conflict")
    assert error["state"] == "active"
    assert assert_error(await server.http.post(f"/api/sessions/{sid}/cancel", headers=alice), 409, "conflict")["state"] == "active"
    ended = await server.http.post(f"/api/sessions/{sid}/end", headers=server.auth("bob"))
    assert ended.status_code == 200
    assert (ended.json()["state"], ended.json()["end_reason"]) == ("ended", "ended")
    for name in ("start", "end", "cancel"):
        error = assert_error(await server.http.post(f"/api/sessions/{sid}/{name}", headers=alice), 409, "conflict")
        assert error["state"] == "ended"

    other = (await server.create_session())["id"]
    cancelled = await server.http.post(f"/api/sessions/{other}/cancel", headers=server.auth("admin", admin=True))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert assert_error(await server.http.post(f"/api/sessions/{other}/start", headers=alice), 409, "conflict")["state"] == "cancelled"


async def test_idempotency_key_on_create(server):
    admin = {**server.auth("admin", admin=True), "Idempotency-Key": "create-1"}
    first = await server.http.post("/api/sessions", json=BODY, headers=admin)
    second = await server.http.post("/api/sessions", json=BODY, headers=admin)
    assert first.status_code == 201 and second.status_code in (200, 201)
    assert second.json()["id"] == first.json()["id"]
    other = await server.http.post("/api/sessions", json=BODY, headers={**admin, "Idempotency-Key": "create-2"})
    assert other.json()["id"] != first.json()["id"]
    listing = (await server.http.get("/api/sessions", headers=server.auth("admin", admin=True))).json()
    assert len(listing["items"]) == 2
    too_long = await server.http.post("/api/sessions", json=BODY, headers={**admin, "Idempotency-Key": "k" * 200})
    assert too_long.status_code in (400, 422)


async def test_idempotency_key_on_transitions(server):
    sid = (await server.create_session())["id"]
    headers = {**server.auth("alice"), "Idempotency-Key": "start-1"}
    first = await server.http.post(f"/api/sessions/{sid}/start", headers=headers)
    again = await server.http.post(f"/api/sessions/{sid}/start", headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    # without the key, the same call is a conflict
    assert_error(await server.http.post(f"/api/sessions/{sid}/start", headers=server.auth("alice")), 409, "conflict")
    end_headers = {**server.auth("alice"), "Idempotency-Key": "end-1"}
    ended = await server.http.post(f"/api/sessions/{sid}/end", headers=end_headers)
    ended_again = await server.http.post(f"/api/sessions/{sid}/end", headers=end_headers)
    assert ended.status_code == ended_again.status_code == 200 and ended_again.json() == ended.json()
    timeline = (await server.http.get(f"/api/sessions/{sid}/timeline", headers=server.auth("alice"))).json()["items"]
    assert [e["kind"] for e in timeline].count("started") == 1
    assert [e["kind"] for e in timeline].count("ended") == 1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("change", [
    {"rate_per_minute": -1},
    {"rate_per_minute": 1.5},
    {"rate_per_minute": 10**7 + 1},
    {"rate_per_minute": "100"},
    {"rate_per_minute": 100.0},
    {"max_amount_minor": "5000"},
    {"max_amount_minor": 0},
    {"currency": "usd"},
    {"currency": "US"},
    {"currency": "USDX"},
    {"metadata": {"blob": "x" * 4100}},
    {"metadata": [1, 2]},
    {"provider": "alice"},
    {"payer": ""},
    {"guests": "carol"},
    {"unknown_field": 1},
], ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values())))[:12])
async def test_bad_bodies_are_422(server, change):
    response = await server.http.post("/api/sessions", json={**BODY, **change}, headers=server.auth("admin", admin=True))
    assert_error(response, 422, "bad_request")


@pytest.mark.parametrize("missing", ["payer", "provider", "rate_per_minute", "currency"])
async def test_missing_fields_are_422(server, missing):
    body = {k: v for k, v in BODY.items() if k != missing}
    assert_error(await server.http.post("/api/sessions", json=body, headers=server.auth("admin", admin=True)), 422, "bad_request")


async def test_limits_at_the_edge_are_accepted(server):
    body = {**BODY, "rate_per_minute": 10**7, "metadata": {"blob": "x" * 3000}}
    response = await server.http.post("/api/sessions", json=body, headers=server.auth("admin", admin=True))
    assert response.status_code == 201, response.text


async def test_malformed_json_is_an_error_not_a_crash(server):
    response = await server.http.post(
        "/api/sessions", content=b"{not json", headers={**server.auth("admin", admin=True), "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert response.json()["error"]["code"] == "bad_request"


async def test_body_over_the_limit_is_413(server):
    body = {**BODY, "metadata": {"blob": "x" * (server.settings.max_body_bytes + 10)}}
    assert_error(await server.http.post("/api/sessions", json=body, headers=server.auth("admin", admin=True)), 413, "too_large")
    assert (await server.http.get("/healthz")).status_code == 200


# ---------------------------------------------------------------- operations


async def test_health_ready_metrics(server):
    healthz = await server.http.get("/healthz")
    assert healthz.status_code == 200 and healthz.json()["status"] == "ok"
    readyz = await server.http.get("/readyz")
    assert readyz.status_code == 200
    await server.create_session()
    async with server.client("alice"):
        metrics = await server.http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("parley_connections", "parley_live_sessions", "parley_frames_in", "parley_frames_out", "parley_errors"):
        assert f"\n{name}" in text or text.startswith(name) or f"# TYPE {name}" in text, name


async def test_openapi_lists_every_route(server):
    response = await server.http.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    expected = {
        "/api/sessions": {"get", "post"},
        "/api/sessions/{session_id}": {"get"},
        "/api/sessions/{session_id}/start": {"post"},
        "/api/sessions/{session_id}/end": {"post"},
        "/api/sessions/{session_id}/cancel": {"post"},
        "/api/sessions/{session_id}/billing": {"get"},
        "/api/sessions/{session_id}/timeline": {"get"},
        "/api/sessions/{session_id}/messages": {"get", "post"},
        "/api/sessions/{session_id}/messages/{message_id}": {"get", "patch", "delete"},
        "/api/turn": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, (path, sorted(paths))
        assert methods <= set(paths[path]), (path, sorted(paths[path]))
    create = paths["/api/sessions"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema  # documented from the same model that validates it
