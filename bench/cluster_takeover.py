"""Takeover time over repeated SIGKILLs of a session's owning node: min / median / max.

    PARLEY_DATABASE_URL=postgresql://… PARLEY_REDIS_URL=redis://… .venv/bin/python bench/cluster_takeover.py

One survivor node runs throughout; each round starts a fresh victim node (a new node id),
creates and starts a session through it (so the victim owns it), SIGKILLs it, and polls the
survivor's `GET /api/sessions/{id}` (as admin) every 20 ms until `owner_node` names the
survivor. The time from the SIGKILL to that answer is one sample. Default lease (2 s) unless
`--lease-ttl` says otherwise. Uses a scratch database (it creates sessions there).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import HOST, SECRET, Server, mint


def start_node(work: Path, node_id: str, lease_ttl: float) -> Server:
    data = work / node_id
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PARLEY_SECRET=SECRET)
    argv = [sys.executable, "run.py", "serve", "--host", HOST, "--port", "0", "--data-dir", str(data),
            "--node-id", node_id, "--lease-ttl", str(lease_ttl), "--log-level", "INFO"]
    server = Server(node_id, argv, data / "server.log", env)
    server.port = int(server.wait_for_line(r"listening on http://[\d.]+:(\d+)").group(1))
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    args = parser.parse_args()
    admin = {"Authorization": f"Bearer {mint('admin', admin=True)}"}
    samples: list[float] = []
    with tempfile.TemporaryDirectory() as work:
        survivor = start_node(Path(work), "survivor", args.lease_ttl)
        try:
            for round_ in range(args.rounds):
                victim = start_node(Path(work), f"victim{round_}", args.lease_ttl)
                with httpx.Client(base_url=f"http://{HOST}:{victim.port}", headers=admin) as via_victim:
                    body = {"payer": "alice", "provider": "bob", "rate_per_minute": 60, "currency": "USD"}
                    sid = via_victim.post("/api/sessions", json=body).json()["id"]
                    via_victim.post(f"/api/sessions/{sid}/start").raise_for_status()
                    assert via_victim.get(f"/api/sessions/{sid}").json()["owner_node"] == victim.name
                time.sleep(0.5)
                victim.proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                victim.proc.wait()
                with httpx.Client(base_url=f"http://{HOST}:{survivor.port}", headers=admin) as via_survivor:
                    while via_survivor.get(f"/api/sessions/{sid}").json()["owner_node"] != "survivor":
                        time.sleep(0.02)
                samples.append(time.monotonic() - killed)
                victim.stop()
                print(f"round {round_ + 1}: taken over {samples[-1]:.2f}s after SIGKILL", flush=True)
        finally:
            survivor.stop()
    print(f"takeover over {len(samples)} SIGKILLs (lease ttl {args.lease_ttl}s): min {min(samples):.2f}s, "
          f"median {statistics.median(samples):.2f}s, max {max(samples):.2f}s")


if __name__ == "__main__":
    main()
