#!/usr/bin/env python3
"""Storage-only benchmark: chat inserts through the storage actor's group commit, no sockets.

In one process: `storage.actor.StorageActor` over `storage.sqlite_backend.SqliteBackend`
(WAL, `synchronous=FULL`, a fresh database file per run). First --sessions sessions are
created the way `POST /api/sessions` creates them (`CreateSession` with its `created`
timeline entry). Then --writers concurrent Trio tasks, each the one sender of one session
(its payer), insert messages one after another exactly as `chat.send` stores them
(`write_many([InsertMessage(message)])` with a fresh id made by chat.py's `new_message_id`
and a fresh client_id, awaiting the reply: the ack point). Every batch bound given is run
in turn; each run stops after --seconds or --inserts, whichever comes first.

Every answer is checked (the session's next `seq`, not a duplicate), and after each run
the database is read back: each session holds exactly the messages acked to it, numbered
1..n without a gap. Any refused write or mismatch stops the bench with a message and exit
status 1 (and `"fatal"` in the --json result), never a quiet 0.

The floor is SQLite itself: single-row INSERT + COMMIT, FULL, WAL, same disk, same run.

--saturated-batches runs those batch bounds once more beside one task that keeps the Trio loop
saturated the way a busy server does (always runnable, ~0.1 ms of Python between checkpoints):
the storage threads then get the GIL only through `storage/gil_turns.py`.

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

import outcome
import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from common import percentiles  # noqa: E402

from actors.session.chat import new_message_id  # noqa: E402
from domain.chat import ChatMessage  # noqa: E402
from domain.session import SessionRecord  # noqa: E402
from domain.timeline import CREATED, TimelineEntry  # noqa: E402
from storage import messages as sm  # noqa: E402
from storage.actor import StorageActor  # noqa: E402
from storage.sqlite_backend import SqliteBackend  # noqa: E402

BODY = "x" * 120
WRITE_TIMEOUT = 60.0
ADMIN = "bench-admin"


class BenchFailed(Exception):
    """A write was refused or the stored chat does not match what was acked."""


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


def now_ms() -> int:
    return int(time.time() * 1000)


async def create_sessions(storage, count: int) -> list[SessionRecord]:
    """As `gateway/app.py: create_session` does, one `CreateSession` per session."""
    records = []
    for i in range(count):
        at = now_ms()
        records.append(SessionRecord(
            id=uuid.uuid4().hex, payer=f"p{i:05d}", provider=f"v{i:05d}", rate_per_minute=100,
            currency="EUR", created_at=at, created_by=ADMIN,
        ))
    requests = [
        sm.CreateSession(session=r, idempotency_key=None, timeline=TimelineEntry(
            session_id=r.id, at=r.created_at, kind=CREATED, actor=ADMIN,
            detail={"rate_per_minute": r.rate_per_minute, "currency": r.currency}))
        for r in records
    ]
    for start in range(0, len(requests), 256):
        for result in await storage.write_many(requests[start:start + 256], timeout=WRITE_TIMEOUT):
            stored, replayed = result.unwrap()
            if replayed:
                raise BenchFailed(f"session {stored.id} created twice")
    return records


def verify(path: Path, acked: dict[str, int]) -> None:
    """Every session holds exactly its acked messages, seq 1..n, nothing else."""
    conn = sqlite3.connect(path)
    try:
        stored = {
            sid: (n, lo, hi, last)
            for sid, n, lo, hi, last in conn.execute(
                "SELECT s.id, COUNT(m.id), MIN(m.seq), MAX(m.seq), s.last_seq FROM sessions s"
                " LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.id"
            )
        }
    finally:
        conn.close()
    for sid, count in acked.items():
        n, lo, hi, last = stored.get(sid, (0, None, None, 0))
        if n != count or last != count or (count and (lo != 1 or hi != count)):
            raise BenchFailed(
                f"session {sid}: acked {count} messages, stored {n} (seq {lo}..{hi}, last_seq {last})"
            )


async def saturate_loop(stop: trio.Event) -> None:
    """Always runnable: ~0.1 ms of Python between two checkpoints, as a saturated server."""
    while not stop.is_set():
        end = time.perf_counter() + 0.0001
        while time.perf_counter() < end:
            pass
        await trio.sleep(0)


async def actor_run(directory: Path, batch: int, writers: int, sessions: int, seconds: float,
                    inserts: int, saturated: bool = False) -> dict:
    path = directory / f"actor-{batch}{'-saturated' if saturated else ''}.sqlite3"
    actor = StorageActor(SqliteBackend(path, synchronous="FULL"), max_batch=batch)
    latencies: list[float] = []
    count = 0
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(actor.run)
        records = await create_sessions(storage, sessions)
        acked = {r.id: 0 for r in records}
        stop_saturating = trio.Event()
        if saturated:
            nursery.start_soon(saturate_loop, stop_saturating)
        base = storage.statistics()
        stop_at = trio.current_time() + seconds
        t0 = time.perf_counter()
        cpu0 = time.process_time()

        async with trio.open_nursery() as writers_nursery:

            async def writer(w: int) -> None:
                nonlocal count
                session = records[w % len(records)]
                while count < inserts and trio.current_time() < stop_at:
                    at = now_ms()
                    message = ChatMessage(  # as actors/session/chat.py: _candidate
                        id=new_message_id(at), session_id=session.id, seq=acked[session.id] + 1,
                        client_id=f"c{acked[session.id] + 1}", sender=session.payer, body=BODY, created_at=at,
                    )
                    start = time.perf_counter()
                    [result] = await storage.write_many([sm.InsertMessage(message=message)], timeout=WRITE_TIMEOUT)
                    elapsed = time.perf_counter() - start
                    if isinstance(result, outcome.Error):
                        failures.append(f"insert into session {session.id} refused: {result.error!r}")
                        writers_nursery.cancel_scope.cancel()
                        return
                    stored, duplicate = result.unwrap()
                    acked[session.id] += 1
                    if duplicate or stored.seq != acked[session.id] or stored.id != message.id:
                        failures.append(f"session {session.id}: expected new seq {acked[session.id]},"
                                        f" got seq {stored.seq} duplicate={duplicate}")
                        writers_nursery.cancel_scope.cancel()
                        return
                    latencies.append(elapsed)
                    count += 1

            for w in range(writers):
                writers_nursery.start_soon(writer, w)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stop_saturating.set()
        stats = storage.statistics()
        await storage.aclose()
    if failures:
        raise BenchFailed(f"batch bound {batch}: {len(failures)} failed writes, first: {failures[0]}")
    verify(path, acked)
    batches = stats.batches - base.batches
    return {"batch_bound": batch, "saturated": saturated, "gil_turns": actor.gil_turns.turns, "writers": writers, "sessions": sessions, "inserts": count, "errors": 0,
            "seconds": round(elapsed, 2), "inserts_per_s": round(count / elapsed, 1),
            "cpu_us_per_insert": round(1e6 * cpu / max(1, count), 1),
            "latency_ms": percentiles(latencies), "batches": batches,
            "mean_batch": round((stats.writes - base.writes) / max(1, batches), 1),
            "largest_batch": stats.largest_batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256,1024", help="batch bounds to try, comma-separated")
    ap.add_argument("--saturated-batches", default="",
                    help="batch bounds to run again beside a saturated Trio loop, comma-separated")
    ap.add_argument("--writers", type=int, default=1024, help="concurrent inserting tasks")
    ap.add_argument("--sessions", type=int, default=0,
                    help="sessions the writers share, round robin (default: one per writer)")
    ap.add_argument("--seconds", type=float, default=6.0, help="time bound of each run")
    ap.add_argument("--inserts", type=int, default=200_000, help="count bound of each run")
    ap.add_argument("--floor-seconds", type=float, default=3.0)
    ap.add_argument("--dir", help="where the database files go (default: a temp dir on the data disk)")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--default-gc", action="store_true",
                    help="keep CPython's collector settings (default: the server's, from run.py)")
    args = ap.parse_args(argv)
    from run import GC_THRESHOLDS

    if not args.default_gc:  # measure the storage actor under the collector settings the server runs with
        import gc

        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    result_gc = "CPython defaults" if args.default_gc else f"the server's {GC_THRESHOLDS}"
    if args.sessions and args.sessions < args.writers:
        ap.error("--sessions below --writers: two writers of one session would race for its seq")
    sessions = args.sessions or args.writers
    base = Path(args.dir) if args.dir else None
    result: dict = {"cpus": os.cpu_count(), "gc": result_gc}
    status = 0
    with tempfile.TemporaryDirectory(prefix="parley-storage-bench-", dir=base) as tmp:
        directory = Path(tmp)
        floor = sqlite_floor(directory, args.floor_seconds, 1_000_000)
        result["floor"] = floor
        print(f"sqlite single-row FULL commits: {floor['commits_per_s']}/s", flush=True)
        runs: list[dict] = result.setdefault("runs", [])
        plan = [(int(b), False) for b in args.batches.split(",") if b]
        plan += [(int(b), True) for b in args.saturated_batches.split(",") if b]
        for batch, saturated in plan:
            try:
                run = trio.run(actor_run, directory, batch, args.writers, sessions, args.seconds, args.inserts,
                               saturated)
            except BenchFailed as exc:
                result["fatal"] = str(exc)
                print(f"FAILED: {exc}", file=sys.stderr, flush=True)
                status = 1
                break
            runs.append(run)
            lat = run["latency_ms"]
            print(f"batch<={batch:5d}{' (loop saturated)' if saturated else ''}: {run['inserts_per_s']:9.0f}"
                  f" inserts/s  mean batch {run['mean_batch']:7.1f}"
                  f"  cpu {run['cpu_us_per_insert']:6.1f} us/insert"
                  f"  latency p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms  errors {run['errors']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
