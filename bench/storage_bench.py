#!/usr/bin/env python3
"""Storage-only benchmark: chat inserts through the storage actor's group commit, no sockets.

In one process: `storage.actor.StorageActor` over `storage.sqlite_backend.SqliteBackend`
(WAL, `synchronous=FULL`, a fresh database file per run) and --writers concurrent Trio
tasks, each inserting messages one after another (`InsertMessage`, awaiting each write's
reply: the ack point of `chat.send`). Every batch bound given is run in turn; each run
stops after --seconds or --inserts, whichever comes first.

The floor is SQLite itself: single-row INSERT + COMMIT, FULL, WAL, same disk, same run.

    .venv/bin/python bench/storage_bench.py --batches 1,16,64,256,1024 --writers 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from common import percentiles  # noqa: E402

from domain.chat import ChatMessage  # noqa: E402
from storage import messages as sm  # noqa: E402
from storage.actor import StorageActor  # noqa: E402
from storage.sqlite_backend import SqliteBackend  # noqa: E402

BODY = "x" * 120
WRITE_TIMEOUT = 60.0


def sqlite_floor(directory: Path, seconds: float, rows: int) -> dict:
    """Single-row autocommit inserts with synchronous=FULL: what no batching gets."""
    path = directory / "floor.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE m (id TEXT PRIMARY KEY, session_id TEXT, seq INT, body TEXT)")
    done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while done < rows and time.perf_counter() < end:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO m VALUES (?, ?, ?, ?)", (uuid.uuid4().hex, "s", done, BODY))
        conn.execute("COMMIT")
        done += 1
    elapsed = time.perf_counter() - t0
    conn.close()
    return {"commits": done, "commits_per_s": round(done / elapsed, 1)}


async def actor_run(directory: Path, batch: int, writers: int, seconds: float, inserts: int) -> dict:
    path = directory / f"actor-{batch}.sqlite3"
    actor = StorageActor(SqliteBackend(path, synchronous="FULL"), max_batch=batch)
    latencies: list[float] = []
    count = 0
    errors = 0
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(actor.run)
        stop_at = trio.current_time() + seconds
        t0 = time.perf_counter()

        async def writer(w: int) -> None:
            nonlocal count, errors
            seq = 0
            session = f"s{w:05d}"
            while count < inserts and trio.current_time() < stop_at:
                seq += 1
                message = ChatMessage(
                    id=uuid.uuid4().hex, session_id=session, seq=seq, client_id=f"c{seq}",
                    sender="u" + session, body=BODY, created_at=int(time.time() * 1000),
                )
                start = time.perf_counter()
                try:
                    await storage.write(sm.InsertMessage(message=message), timeout=WRITE_TIMEOUT)
                except Exception:  # noqa: BLE001 - counted, reported
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                count += 1

        async with trio.open_nursery() as writers_nursery:
            for w in range(writers):
                writers_nursery.start_soon(writer, w)
        elapsed = time.perf_counter() - t0
        stats = storage.statistics()
        await storage.aclose()
    return {"batch_bound": batch, "writers": writers, "inserts": count, "errors": errors,
            "seconds": round(elapsed, 2), "inserts_per_s": round(count / elapsed, 1),
            "latency_ms": percentiles(latencies), "batches": stats.batches,
            "mean_batch": round(stats.writes / max(1, stats.batches), 1),
            "largest_batch": stats.largest_batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256,1024", help="batch bounds to try, comma-separated")
    ap.add_argument("--writers", type=int, default=1024, help="concurrent inserting tasks")
    ap.add_argument("--seconds", type=float, default=6.0, help="time bound of each run")
    ap.add_argument("--inserts", type=int, default=200_000, help="count bound of each run")
    ap.add_argument("--floor-seconds", type=float, default=3.0)
    ap.add_argument("--dir", help="where the database files go (default: a temp dir on the data disk)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    base = Path(args.dir) if args.dir else None
    with tempfile.TemporaryDirectory(prefix="parley-storage-bench-", dir=base) as tmp:
        directory = Path(tmp)
        floor = sqlite_floor(directory, args.floor_seconds, 1_000_000)
        print(f"sqlite single-row FULL commits: {floor['commits_per_s']}/s", flush=True)
        runs = []
        for batch in [int(b) for b in args.batches.split(",") if b]:
            run = trio.run(actor_run, directory, batch, args.writers, args.seconds, args.inserts)
            runs.append(run)
            lat = run["latency_ms"]
            print(f"batch<={batch:5d}: {run['inserts_per_s']:9.0f} inserts/s  mean batch {run['mean_batch']:7.1f}"
                  f"  latency p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms  errors {run['errors']}", flush=True)
    result = {"floor": floor, "runs": runs, "cpus": os.cpu_count()}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
