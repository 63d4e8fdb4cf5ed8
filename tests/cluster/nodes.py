"""Cluster nodes as child processes (`python run.py serve`), for tests that SIGKILL or SIGSTOP one."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway.auth import mint_token
from tests.conftest import SECRET
from tests.processes import ServerProcess, spawn_server


@dataclass
class NodeProcess:
    node_id: str
    server: ServerProcess
    http: httpx.AsyncClient

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    def kill(self, signum: int = signal.SIGKILL) -> None:
        self.server.process.send_signal(signum)

    async def owner_of(self, session_id: str) -> str | None:
        response = await self.http.get(f"/api/sessions/{session_id}", headers=auth("admin", admin=True))
        assert response.status_code == 200, response.text
        return response.json()["owner_node"]

    async def metric(self, name: str) -> float:
        text = (await self.http.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def token(user: str, *, admin: bool = False) -> str:
    return mint_token(SECRET, user, admin=admin, ttl=3600)


def auth(user: str, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, admin=admin)}"}


async def spawn_node(
    nursery: trio.Nursery, tmp_path: Path, env: dict[str, str], node_id: str, *args: str
) -> NodeProcess:
    server = await spawn_server(
        nursery, tmp_path / node_id, "--node-id", node_id, *args, secret=SECRET, env=env,
    )
    return NodeProcess(node_id=node_id, server=server, http=httpx.AsyncClient(base_url=server.base_url, timeout=10))


async def stop_nodes(*nodes: NodeProcess) -> None:
    for node in nodes:
        await node.http.aclose()
        if node.server.process.returncode is None:
            node.kill(signal.SIGCONT)
            node.kill(signal.SIGKILL)
        with trio.move_on_after(5):
            await node.server.process.wait()


async def create_started_session(node: NodeProcess, **fields: Any) -> str:
    body = {"payer": "alice", "provider": "bob", "rate_per_minute": 600, "currency": "USD", **fields}
    created = await node.http.post("/api/sessions", json=body, headers=auth("admin", admin=True))
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    started = await node.http.post(f"/api/sessions/{session_id}/start", headers=auth("admin", admin=True))
    assert started.status_code == 200, started.text
    return session_id
