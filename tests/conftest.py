"""Shared fixtures: a real Parley server on a free port, in the test's own nursery."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from domain.settings import Settings
from gateway.auth import mint_token
from gateway.server import Running, serve
from parley_client import Client, connect

SECRET = "test-secret-which-is-long-enough-for-hs256"


def require_system(binary: str, why: str) -> str:
    """Path of a system program; skip locally when missing, fail in CI (CI=true)."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed ({why}); .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class ServerFixture:
    running: Running
    settings: Settings
    shutdown: trio.Event
    http: httpx.AsyncClient
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, *, admin: bool = False, ttl: int = 3600) -> str:
        return mint_token(SECRET, user, admin=admin, ttl=ttl)

    def auth(self, user: str, *, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, admin=admin)}"}

    async def create_session(self, payer: str = "alice", provider: str = "bob", **fields: Any) -> dict[str, Any]:
        body = {"payer": payer, "provider": provider, "rate_per_minute": 100, "currency": "USD", **fields}
        response = await self.http.post("/api/sessions", json=body, headers=self.auth("admin", admin=True))
        assert response.status_code == 201, response.text
        return response.json()

    async def start_session(self, session_id: str, user: str = "admin") -> dict[str, Any]:
        response = await self.http.post(
            f"/api/sessions/{session_id}/start", headers=self.auth(user, admin=user == "admin")
        )
        assert response.status_code == 200, response.text
        return response.json()

    @asynccontextmanager
    async def client(self, user: str, **kwargs: Any) -> AsyncIterator[Client]:
        async with connect(self.ws_url, self.token(user), **kwargs) as client:
            yield client

    async def stop(self) -> None:
        self.shutdown.set()
        await self.stopped.wait()


def test_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = Settings(
        port=0, data_dir=tmp_path / "data", secret=SECRET, dev=True, sqlite_synchronous="NORMAL",
        heartbeat=30.0,
    )
    return replace(base, **overrides)


test_settings.__test__ = False  # a helper, not a test


async def start_server(nursery: trio.Nursery, settings: Settings) -> ServerFixture:
    shutdown = trio.Event()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(settings, shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    running = await nursery.start(run)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}", timeout=15)
    return ServerFixture(running=running, settings=settings, shutdown=shutdown, http=http, stopped=stopped)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[ServerFixture]:
    fixture = await start_server(nursery, test_settings(tmp_path))
    yield fixture
    await fixture.http.aclose()


@pytest.fixture
def make_server(nursery: trio.Nursery, tmp_path: Path) -> Any:
    """Start a server with settings overrides: `await make_server(heartbeat=1.0)`."""
    return functools.partial(_make_server, nursery, tmp_path)


async def _make_server(nursery: trio.Nursery, tmp_path: Path, **overrides: Any) -> ServerFixture:
    return await start_server(nursery, test_settings(tmp_path, **overrides))
