"""What each idle connection holds: a `tracemalloc` snapshot diff of an in-process Parley.

    .venv/bin/python bench/idle_memory.py --conns 2000 [--top 25] [--frames 1]

Starts Parley in this process (temp data dir, 127.0.0.1, port 0) with tracemalloc on,
creates conns/2 sessions straight in storage, then a child process (this file with
`--client`, asyncio `websockets`, like loadgen.py) opens every connection (hello, join)
and holds it. Snapshots are taken after a gc before the connections open and while
they are held; the diff, grouped by traceback (`--frames` deep) and by file, is printed
in bytes per connection. Python allocations only: kernel socket buffers and malloc's
own overhead are not in it (compare with the RSS per connection of `run_all.py --only idle`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
SECRET = "parley-bench-secret-not-for-production"


async def client_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import connect

    plan = json.loads(Path(args.plan).read_text())
    sem = asyncio.Semaphore(64)
    conns = []

    async def one(token: str, session: str) -> None:
        async with sem:
            try:
                ws = await connect(f"ws://127.0.0.1:{args.port}/ws", compression=None, ping_interval=None,
                                   open_timeout=60, close_timeout=2, max_queue=16)
                await ws.send(json.dumps({"type": "hello", "token": token}))
                while json.loads(await ws.recv()).get("type") != "welcome":
                    pass
                await ws.send(json.dumps({"type": "join", "session": session, "ref": "j"}))
                while json.loads(await ws.recv()).get("ref") != "j":
                    pass
            except Exception as exc:  # noqa: BLE001 - a busy machine: count what opened
                print(f"open failed: {type(exc).__name__}", file=sys.stderr)
                return
            conns.append(ws)

    await asyncio.gather(*(one(t, s) for t, s in plan))

    async def drain(ws) -> None:  # keep reading (presence, billing): a held client, not a dead one
        try:
            async for _ in ws:
                pass
        except Exception:  # noqa: BLE001
            pass

    readers = [asyncio.ensure_future(drain(ws)) for ws in conns]
    print(f"ready {len(conns)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
    for r in readers:
        r.cancel()


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, top: int) -> None:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"\nPython heap growth: {total / n:,.0f} B per connection ({n} connections)\n")
    print("by file:")
    for stat in after.compare_to(before, "filename")[:top]:
        if stat.size_diff <= 0:
            break
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / n:8,.0f} B  {stat.count_diff / n:6.1f} blocks  {frame.filename}")
    print("\nby the innermost Parley line that led to it (needs --frames deep enough):")
    repo = str(BENCH_DIR.parent)
    owners: dict[str, list[int]] = {}
    for stat in after.compare_to(before, "traceback"):
        ours = [f for f in stat.traceback if f.filename.startswith(repo) and "/bench/" not in f.filename]
        key = f"{Path(ours[0].filename).relative_to(repo)}:{ours[0].lineno}" if ours else "(outside Parley)"
        entry = owners.setdefault(key, [0, 0])
        entry[0] += stat.size_diff
        entry[1] += stat.count_diff
    for key, (size, count) in sorted(owners.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {size / n:8,.0f} B  {count / n:6.1f} blocks  {key}")
    print("\nby line:")
    for stat in after.compare_to(before, "traceback")[:top]:
        if stat.size_diff <= 0:
            break
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
        print(f"  {stat.size_diff / n:8,.0f} B  {stat.count_diff / n:6.1f} blocks  {where}")


async def server_main(args: argparse.Namespace) -> None:
    import trio

    from domain.session import SessionRecord
    from domain.settings import Settings
    from domain.timeline import CREATED, TimelineEntry
    from gateway.auth import mint_token
    from gateway.server import serve
    from storage import messages as sm

    data_dir = Path(tempfile.mkdtemp(prefix="parley-idle-mem-"))
    settings = Settings(data_dir=data_dir, secret=SECRET, host="127.0.0.1", port=0, heartbeat=args.heartbeat,
                        max_connections_per_address=0, log_level="WARNING")
    shutdown = trio.Event()
    n = args.conns - args.conns % 2
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(settings, shutdown=shutdown, task_status=task_status))
        plan = []
        now = int(time.time() * 1000)
        for k in range(n // 2):
            payer, provider = f"m{2 * k:05d}", f"m{2 * k + 1:05d}"
            record = SessionRecord(id=uuid.uuid4().hex, payer=payer, provider=provider, guests=(),
                                   rate_per_minute=60, currency="USD", created_at=now, created_by="admin")
            await running.storage.write(sm.CreateSession(
                session=record, timeline=TimelineEntry(session_id=record.id, at=now, kind=CREATED, actor="admin")))
            plan += [[mint_token(running.secret, payer), record.id], [mint_token(running.secret, provider), record.id]]
        plan_path = data_dir / "plan.json"
        plan_path.write_text(json.dumps(plan))
        # warm up every code path once (imports, caches) with two connections, then measure the rest
        gc.collect()
        before = tracemalloc.take_snapshot()
        client = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--client", "--port", str(running.port), "--plan", str(plan_path)],
            stdin=-1, stdout=-1)
        line = b""
        with trio.fail_after(600):
            while not line.endswith(b"\n"):
                line += await client.stdout.receive_some(100)
        held = int(line.split()[1])
        await trio.sleep(args.settle)
        gc.collect()
        after = tracemalloc.take_snapshot()
        report(before, after, held, args.top)
        await client.stdin.aclose()
        await client.wait()
        shutdown.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--heartbeat", type=float, default=15.0)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds held before the second snapshot")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--frames", type=int, default=1, help="traceback depth of the by-line grouping")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        asyncio.run(client_main(args))
        return
    import resource

    import trio

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tracemalloc.start(args.frames)
    os.environ.pop("PARLEY_SECRET", None)
    trio.run(server_main, args)


if __name__ == "__main__":
    main()
