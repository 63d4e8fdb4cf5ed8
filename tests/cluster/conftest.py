"""Cluster fixtures: a real Redis (`redis-server --save '' --appendonly no` on a free port, one per
test, stopped by pid) and the real PostgreSQL of the storage tests (a fresh database per test).
Nodes run in the test's own Trio run (`make_node`) or as child processes (tests/processes.py)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import ServerFixture, require_system, start_server, test_settings
from tests.storage.conftest import _free_port, postgres_server, postgres_url  # noqa: F401  (fixtures)

LEASE_TTL = 1.0  # seconds: short, so takeover tests stay short (the default is 2 s)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_redis(port: int | None = None) -> RedisServer:
    binary = require_system("redis-server", "cluster tests run a real Redis")
    port = port or _free_port()
    directory = tempfile.mkdtemp(prefix="parley-redis-")
    process = subprocess.Popen(
        [binary, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
         "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return RedisServer(port=port, process=process)
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_env(redis_server: RedisServer, postgres_url: str) -> dict[str, str]:  # noqa: F811
    return {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_DATABASE_URL": postgres_url}


@pytest.fixture
def make_node(nursery: trio.Nursery, tmp_path: Path, cluster_env: dict[str, str]) -> Any:
    """Start a cluster node in this Trio run: `await make_node("n1", billing_tick=1.0)`."""
    return functools.partial(_make_node, nursery, tmp_path, cluster_env)


async def _make_node(
    nursery: trio.Nursery, tmp_path: Path, env: dict[str, str], node_id: str, **overrides: Any
) -> ServerFixture:
    settings = test_settings(
        tmp_path / node_id, redis_url=env["PARLEY_REDIS_URL"], database_url=env["PARLEY_DATABASE_URL"],
        node_id=node_id, lease_ttl=LEASE_TTL, **overrides,
    )
    return await start_server(nursery, settings)
