"""The demo page and its files are served; the token-minting route exists only in development mode."""

from __future__ import annotations

import jwt

from tests.conftest import SECRET


async def test_page_and_client_are_served(server):
    page = await server.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'data-testid="call-button"' in page.text
    for name in ("parley.js", "app.js"):
        script = await server.http.get(f"/static/{name}")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
    assert "export class Parley" in (await server.http.get("/static/parley.js")).text
    assert (await server.http.get("/static/app.css")).headers["content-type"].startswith("text/css")
    assert (await server.http.get("/static/../app.py")).status_code == 404


async def test_dev_token_mints_in_dev_mode(server):
    response = await server.http.get("/api/dev/token", params={"user": "alice"})
    assert response.status_code == 200
    body = response.json()
    assert (body["user"], body["admin"]) == ("alice", False)
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] > 0
    admin = (await server.http.get("/api/dev/token", params={"user": "root", "admin": "1"})).json()
    assert admin["admin"] is True
    assert (await server.http.get("/api/dev/token", params={"user": ""})).status_code == 422


async def test_dev_token_does_not_exist_outside_dev_mode(make_server):
    server = await make_server(dev=False)
    response = await server.http.get("/api/dev/token", params={"user": "alice"})
    assert response.status_code == 404
    assert (await server.http.get("/")).status_code == 200  # the page still loads; it asks for a token
