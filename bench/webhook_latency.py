"""Webhook delivery latency: from the commit that wrote an event to its arrival at a receiver.

    .venv/bin/python bench/webhook_latency.py [--events 300] [--synchronous FULL]

In-process on purpose (like storage_bench.py): the server runs in this Trio run, on SQLite
in a temporary data dir, so the bench can subscribe to the outbox's commit signal and
stamp the instant each commit that wrote a delivery returned. The receiver is the tests'
(a Trio HTTP server on 127.0.0.1 verifying with `standardwebhooks`). Sessions are created
one at a time over REST, each waiting for its `session.created` webhook and for its
delivery to be recorded, so the first commit after each request is that event's. Prints
p50/p90/p99/max of commit → receiver and of request sent → receiver (which adds the REST
round trip and the commit itself).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.settings import Settings  # noqa: E402
from gateway.auth import mint_token  # noqa: E402
from gateway.server import serve  # noqa: E402
from storage import backend_for  # noqa: E402
from tests.webhooks.receiver import Receiver  # noqa: E402

SECRET = "parley-bench-secret-not-for-production"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(events: int, synchronous: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(port=0, data_dir=Path(tmp), secret=SECRET, dev=True, sqlite_synchronous=synchronous)
        backend = backend_for(settings)
        commits: list[float] = []
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(Receiver().serve)
            shutdown = trio.Event()
            running = await nursery.start(lambda task_status: serve(
                settings, shutdown=shutdown, backend=backend, task_status=task_status))
            backend.webhook_commits.subscribe(lambda: commits.append(trio.current_time()))
            admin = {"Authorization": f"Bearer {mint_token(SECRET, 'admin', admin=True)}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}", headers=admin) as http:
                endpoint = (await http.post("/api/webhooks", json={
                    "url": receiver.url("/bench"), "events": ["session.created"]})).json()
                receiver.secrets["/bench"] = endpoint["secret"]
                from_commit, from_request = [], []
                for n in range(events):
                    commits.clear()
                    sent = trio.current_time()
                    created = await http.post("/api/sessions", json={
                        "payer": "alice", "provider": "bob", "rate_per_minute": 100, "currency": "USD"})
                    assert created.status_code == 201, created.text
                    await receiver.wait_until(lambda: len(receiver.received) == n + 1)
                    arrived = receiver.received[-1].at
                    assert receiver.received[-1].verified, receiver.received[-1].error
                    with trio.fail_after(5):  # then its delivery is recorded: a second such commit
                        while len(commits) < 2:
                            await trio.sleep(0.001)
                    from_commit.append((arrived - commits[0]) * 1000)
                    from_request.append((arrived - sent) * 1000)
            shutdown.set()
            nursery.cancel_scope.deadline = trio.current_time() + 15
    print(f"webhook latency, {events} events one at a time, SQLite synchronous={synchronous} (ms)")
    print(f"{'':24} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>7}")
    for name, values in (("commit → receiver", from_commit), ("request sent → receiver", from_request)):
        print(f"{name:24} {pct(values, 50):7.2f} {pct(values, 90):7.2f} {pct(values, 99):7.2f} "
              f"{max(values):7.2f} {statistics.fmean(values):7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    args = parser.parse_args()
    trio.run(main, args.events, args.synchronous)
