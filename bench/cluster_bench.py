"""Cross-node cost, in one run: chat acked msg/s and signal round trips with both users on the
session's owning node vs on another node (every request and event crosses Redis twice).

    PARLEY_DATABASE_URL=postgresql://… PARLEY_REDIS_URL=redis://… .venv/bin/python bench/cluster_bench.py

Two nodes run in this process (gateway.server.serve), on the given PostgreSQL and Redis (a
scratch database: it creates sessions there). Ratios are what to compare across runs; nothing
here is asserted.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.settings import Settings  # noqa: E402
from gateway.auth import mint_token  # noqa: E402
from gateway.server import serve  # noqa: E402
from parley_client import connect  # noqa: E402

SECRET = "bench-secret-which-is-long-enough-for-hs256"


async def _node(nursery: trio.Nursery, node_id: str, data: Path) -> tuple[str, trio.Event]:
    settings = Settings(
        port=0, data_dir=data / node_id, secret=SECRET, redis_url=os.environ["PARLEY_REDIS_URL"],
        database_url=os.environ["PARLEY_DATABASE_URL"], node_id=node_id, heartbeat=30.0,
        frames_per_second=100_000.0, frame_burst=100_000, log_level="WARNING",
    )
    shutdown = trio.Event()
    running = await nursery.start(functools.partial(serve, settings, shutdown=shutdown))
    return f"127.0.0.1:{running.port}", shutdown


def _auth(user: str, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, admin=admin)}"}


async def _session(owner: str) -> str:
    async with httpx.AsyncClient(base_url=f"http://{owner}") as http:
        body = {"payer": "alice", "provider": "bob", "rate_per_minute": 60, "currency": "USD"}
        sid = (await http.post("/api/sessions", json=body, headers=_auth("admin", True))).json()["id"]
        await http.post(f"/api/sessions/{sid}/start", headers=_auth("admin", True))  # the owner claims it
    return sid


async def _scenario(owner: str, clients_at: str, messages: int, window: int, signals: int) -> dict[str, float]:
    sid = await _session(owner)
    url = f"ws://{clients_at}/ws"
    async with connect(url, mint_token(SECRET, "alice")) as alice, connect(url, mint_token(SECRET, "bob")) as bob:
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        started = time.perf_counter()
        for i in range(signals):  # one round trip each: alice → owner → bob, bob → owner → alice
            await alice.request("signal", session=sid, to="bob", kind="candidate", payload={"i": i})
            await bob.next_event("signal")
        signal_ms = (time.perf_counter() - started) / signals * 1000
        limiter = trio.Semaphore(window)
        started = time.perf_counter()

        async def send(i: int) -> None:
            async with limiter:
                await alice.request("chat.send", session=sid, client_id=f"c{i}", body=f"message {i}", timeout=30)

        async with trio.open_nursery() as nursery:
            for i in range(messages):
                nursery.start_soon(send, i)
        for _ in range(messages):
            await bob.next_event("chat.message", timeout=30)
        chat_rate = messages / (time.perf_counter() - started)
    return {"chat_acked_per_s": chat_rate, "signal_relay_ms": signal_ms}


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as data:
        async with trio.open_nursery() as nursery:
            first, stop_first = await _node(nursery, "bench-a", Path(data))
            second, stop_second = await _node(nursery, "bench-b", Path(data))
            local = await _scenario(first, first, args.messages, args.window, args.signals)
            remote = await _scenario(first, second, args.messages, args.window, args.signals)
            print(f"{'':28} {'same node':>12} {'across nodes':>14} {'ratio':>8}")
            for key in local:
                print(f"{key:28} {local[key]:12.1f} {remote[key]:14.1f} {remote[key] / local[key]:8.2f}")
            stop_first.set()
            stop_second.set()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=32, help="chat sends in flight")
    parser.add_argument("--signals", type=int, default=300)
    trio.run(main, parser.parse_args())
