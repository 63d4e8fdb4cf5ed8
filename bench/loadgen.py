#!/usr/bin/env python3
"""Parley's own load generator (asyncio + websockets, uvloop when installed) for the
scenarios relaybench.py does not cover. One process; prints / writes JSON.

Modes (every run is bounded: --duration seconds measured after --warmup, a per-request
timeout, a set-up deadline; traffic goes to the --url given, 127.0.0.1 in run_all.py):

  chat     connections in pairs (sender, receiver) per session; each sender sends
           `chat.send` and waits for its `ok` (acked only once stored) before the next.
           → acked msg/s, ack latency p50/p99, receiver deliveries/s, server µs CPU/msg.
  fanout   every connection joined to one session; the first --senders send chat as
           fast as their acks return; everyone else counts `chat.message` deliveries.
  idle     open every connection (hello + join for Parley, `?id=` for the floor),
           hold, and measure the server's RSS per connection and its idle CPU.
  billing  payer + provider of active sessions joined; record the arrival of every
           `billing` event and derive tick lateness from their cadence.

The plan file (written by run_all.py) lists the connections:
  {"users": {user: token}, "conns": [[user, session_id], ...]}
With --raw the connections are the floor's: ws://HOST:PORT/ws?id=<user>, no hello.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import math
import os
import resource
import sys
import time
from collections import Counter

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Rest, percentiles, proc_cpu_s, proc_kib  # noqa: E402

clock = time.monotonic
_loads = json.loads
WS_OPTS = dict(compression=None, ping_interval=None, open_timeout=20, close_timeout=2,
               max_size=1 << 20, max_queue=64, user_agent_header=None)
HANDSHAKE_TIMEOUT = 20.0
CHAT_BODY = "x" * 120  # a typical short chat line
SETTLE = 1.0
MAX_BACKOFF = 0.05  # after a rate_limited reply


class Stats:
    def __init__(self) -> None:
        self.t_start = float("inf")
        self.t_end = float("inf")
        self.errors: Counter[str] = Counter()
        self.delivered = 0
        self.acked = 0
        self.latencies: list[float] = []
        self.closing = False  # set before we close: closes after that are ours, not errors

    def in_window(self, t: float) -> bool:
        return self.t_start <= t <= self.t_end


class Conn:
    __slots__ = ("user", "session", "ws", "pending", "billing", "stats", "reader")

    def __init__(self, user: str, session: str | None, stats: Stats) -> None:
        self.user = user
        self.session = session
        self.ws = None
        self.pending: dict[str, asyncio.Future] = {}
        self.billing: list[tuple[float, int]] = []
        self.stats = stats
        self.reader = None

    async def open_parley(self, url: str, token: str) -> None:
        self.ws = await connect(url.rstrip("/") + "/ws", **WS_OPTS)
        await self.ws.send(json.dumps({"type": "hello", "token": token}))
        while True:
            m = _loads(await self.ws.recv())
            if m.get("type") == "welcome":
                break
            if m.get("type") == "error":
                raise RuntimeError(f"hello: {m.get('code')}")
        await self.ws.send(json.dumps({"type": "join", "session": self.session, "ref": "join"}))
        while True:
            m = _loads(await self.ws.recv())
            if m.get("ref") == "join":
                if m.get("type") != "ok":
                    raise RuntimeError(f"join: {m.get('code')}")
                break

    async def open_raw(self, url: str) -> None:
        self.ws = await connect(f"{url.rstrip('/')}/ws?id={self.user}", **WS_OPTS)

    def start_reader(self) -> None:
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        stats = self.stats
        try:
            async for raw in self.ws:
                m = _loads(raw)
                kind = m.get("type")
                if kind == "chat.message":
                    if stats.in_window(clock()):
                        stats.delivered += 1
                elif kind == "billing":
                    self.billing.append((clock(), m.get("billable_ms", 0), bool(m.get("final"))))
                elif kind in ("ok", "error"):
                    future = self.pending.pop(m.get("ref"), None)
                    if future is not None and not future.done():
                        future.set_result(m)
                    elif kind == "error":
                        stats.errors["event:" + str(m.get("code"))] += 1
                elif kind == "replaced":
                    stats.errors["replaced"] += 1
        except ConnectionClosed as exc:
            if not stats.closing:
                code = exc.rcvd.code if exc.rcvd else None
                stats.errors[f"closed:{code}"] += 1

    async def request(self, frame: str, ref: str, timeout: float) -> dict:
        future = asyncio.get_running_loop().create_future()
        self.pending[ref] = future
        await self.ws.send(frame)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.pending.pop(ref, None)


# ---------------------------------------------------------------- set-up


async def open_all(args, plan, stats: Stats) -> list[Conn]:
    conns = [Conn(user, session, stats) for user, session in plan["conns"]]
    users = plan.get("users", {})
    sem = asyncio.Semaphore(args.connect_concurrency)

    async def one(conn: Conn) -> None:
        async with sem:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    if args.raw:
                        await conn.open_raw(args.url)
                    else:
                        await conn.open_parley(args.url, users[conn.user])
            except Exception as exc:  # noqa: BLE001 - every failure is a data point
                stats.errors["open:" + (str(exc)[:50] if isinstance(exc, RuntimeError) else type(exc).__name__)] += 1
                if conn.ws is not None:
                    conn.ws.transport.abort()
                conn.ws = None

    await asyncio.gather(*(one(c) for c in conns))
    for conn in conns:
        if conn.ws is not None:
            conn.start_reader()
    COLLECTOR.tune()  # what is open now stays: out of every later collection
    return conns


async def close_all(conns: list[Conn], timeout: float = 20.0) -> None:
    if conns:
        conns[0].stats.closing = True
    live = [c for c in conns if c.ws is not None]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(c.ws.close() for c in live), return_exceptions=True)
    except TimeoutError:
        for c in live:
            c.ws.transport.abort()
    for c in live:
        if c.reader is not None:
            c.reader.cancel()


class ClientCollector:
    """This process's garbage collections: how long each one stopped the client.

    A client-side pause delays every frame that arrives during it, so without this a
    latency the client reports could be its own. The client therefore runs with the
    server's collector settings (start-up objects frozen, a large young generation; see
    run.py's `tune_garbage_collector`), and reports the pauses it still had.
    """

    THRESHOLDS = (50_000, 20, 10)

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def tune(self) -> None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*self.THRESHOLDS)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def report(self) -> dict:
        p = self.pauses
        return {"client_gc": {"collections": len(p), "max_ms": round(1000 * max(p), 1) if p else 0.0,
                              "total_ms": round(1000 * sum(p), 1)}}


COLLECTOR = ClientCollector()


class Window:
    """The measured window: server CPU and RSS at its start and end; client GC pauses."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def begin(self) -> None:
        COLLECTOR.pauses.clear()
        self.cpu0, self.t0 = (proc_cpu_s(self.pid) if self.pid else None), clock()
        self.mycpu0 = time.process_time()

    def end(self) -> dict:
        cpu1, t1 = (proc_cpu_s(self.pid) if self.pid else None), clock()
        wall = max(1e-9, t1 - self.t0)
        cpu = (cpu1 - self.cpu0) if cpu1 is not None and self.cpu0 is not None else None
        return {"wall_s": round(wall, 2), "server_cpu_s": cpu,
                "server_cpu_pct": round(100 * cpu / wall, 1) if cpu is not None else None,
                "client_cpu_pct": round(100 * (time.process_time() - self.mycpu0) / wall, 1),
                "server_rss_kib": proc_kib(self.pid) if self.pid else None, **COLLECTOR.report()}


# ---------------------------------------------------------------- modes


async def _sender(conn: Conn, stats: Stats, timeout: float, record: bool) -> None:
    prefix = '{"type":"chat.send","session":"' + conn.session + '","body":"' + CHAT_BODY + '","client_id":"'
    n = 0
    try:
        while clock() < stats.t_end:
            n += 1
            ref = str(n)
            t0 = clock()
            try:
                reply = await conn.request(prefix + conn.user + "-" + ref + '","ref":"' + ref + '"}', ref, timeout)
            except TimeoutError:
                stats.errors["timeout"] += 1
                continue
            t1 = clock()
            if reply.get("type") == "ok":
                if stats.in_window(t1):
                    stats.acked += 1
                    if record and t0 >= stats.t_start:
                        stats.latencies.append(t1 - t0)
            else:
                code = str(reply.get("code"))
                stats.errors[code] += 1
                if code == "rate_limited":
                    await asyncio.sleep(MAX_BACKOFF)
    except ConnectionClosed:
        stats.errors["sender closed"] += 1


async def run_senders(args, conns: list[Conn], senders: list[Conn], stats: Stats) -> dict:
    window = Window(args.server_pid)
    go = clock() + SETTLE
    stats.t_start, stats.t_end = go + args.warmup, go + args.warmup + args.duration
    await asyncio.sleep(max(0.0, go - clock()))
    tasks = [asyncio.ensure_future(_sender(c, stats, args.timeout, True)) for c in senders]
    await asyncio.sleep(max(0.0, stats.t_start - clock()))
    window.begin()
    await asyncio.sleep(max(0.0, stats.t_end - clock()))
    result = window.end()
    await asyncio.wait(tasks, timeout=args.timeout + 5)
    for t in tasks:
        t.cancel()
    return result


async def mode_chat(args, plan) -> dict:
    stats = Stats()
    conns = await open_all(args, plan, stats)
    senders = [c for i, c in enumerate(conns) if i % 2 == 0 and c.ws is not None and conns[i + 1].ws is not None]
    win = await run_senders(args, conns, senders, stats)
    held = sum(1 for c in conns if c.ws is not None and c.ws.state is State.OPEN)
    await close_all(conns)
    cpu = win["server_cpu_s"]
    return {"mode": "chat", "sessions": len(conns) // 2, "senders": len(senders), "held": held,
            "acked": stats.acked, "acked_per_s": round(stats.acked / args.duration, 1),
            "delivered_per_s": round(stats.delivered / args.duration, 1),
            "ack_ms": percentiles(stats.latencies), "errors": dict(stats.errors),
            "server_us_per_msg": round(1e6 * cpu / stats.acked, 1) if cpu and stats.acked else None,
            **win}


async def mode_fanout(args, plan) -> dict:
    stats = Stats()
    conns = await open_all(args, plan, stats)
    senders = [c for c in conns[: args.senders] if c.ws is not None]
    win = await run_senders(args, conns, senders, stats)
    held = sum(1 for c in conns if c.ws is not None and c.ws.state is State.OPEN)
    await close_all(conns)
    cpu = win["server_cpu_s"]
    return {"mode": "fanout", "participants": len(conns), "senders": len(senders), "held": held,
            "acked_per_s": round(stats.acked / args.duration, 1),
            "deliveries_per_s": round(stats.delivered / args.duration, 1),
            "ack_ms": percentiles(stats.latencies), "errors": dict(stats.errors),
            "server_us_per_delivery": round(1e6 * cpu / stats.delivered, 1) if cpu and stats.delivered else None,
            **win}


async def mode_idle(args, plan) -> dict:
    stats = Stats()
    pid = args.server_pid
    await asyncio.sleep(SETTLE)
    rss0 = proc_kib(pid) if pid else None
    t0 = clock()
    conns = await open_all(args, plan, stats)
    open_time = clock() - t0
    opened = sum(1 for c in conns if c.ws is not None)
    await asyncio.sleep(args.warmup)
    window = Window(pid)
    window.begin()
    rss_samples = []
    end = clock() + args.duration
    while clock() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - clock())))
        if pid:
            rss_samples.append(proc_kib(pid))
    win = window.end()
    held = [c for c in conns if c.ws is not None and c.ws.state is State.OPEN]
    verified = 0
    if not args.raw:  # a round trip on a few held connections: they are alive, not just open
        for i, conn in enumerate(held[: args.verify]):
            try:
                reply = await conn.request('{"type":"ping","ref":"v' + str(i) + '"}', "v" + str(i), 5)
                verified += reply.get("type") == "ok"
            except (TimeoutError, ConnectionClosed):
                stats.errors["verify failed"] += 1
    rss1 = rss_samples[-1] if rss_samples else None
    await close_all(conns, timeout=60)
    per = round((rss1 - rss0) / len(held), 2) if rss0 and rss1 and held else None
    return {"mode": "idle", "target": len(conns), "opened": opened, "held": len(held),
            "open_time_s": round(open_time, 1), "open_per_s": round(opened / max(1e-9, open_time), 1),
            "verified": verified, "errors": dict(stats.errors),
            "rss_kib_before": rss0, "rss_kib_held": rss1, "rss_kib_per_conn": per,
            "hwm_kib": proc_kib(pid, "VmHWM") if pid else None, **win}


async def mode_billing(args, plan) -> dict:
    stats = Stats()
    conns = await open_all(args, plan, stats)
    opened = sum(1 for c in conns if c.ws is not None)
    start = plan.get("start")
    setup_s = None
    if start:  # start the sessions only now that everyone is joined: billing opens at once
        t0 = clock()
        await asyncio.get_running_loop().run_in_executor(
            None, Rest(start["port"]).start_sessions, start["sessions"])
        setup_s = round(clock() - t0, 1)
    await asyncio.sleep(args.warmup)
    window = Window(args.server_pid)
    t_start = clock()
    window.begin()
    await asyncio.sleep(args.duration)
    t_end = clock()
    win = window.end()
    # a tick due just before t_end may arrive after it: give it time before counting
    await asyncio.sleep(min(3.0, 2 * args.tick))
    held = sum(1 for c in conns if c.ws is not None and c.ws.state is State.OPEN)
    tick_ms = int(args.tick * 1000)
    cadence, timer, got, expected = [], [], 0, 0
    for conn in conns:
        if conn.ws is None:
            continue
        events = [(t, b) for t, b, final in conn.billing if not final]
        if not events:
            expected += int(args.duration / args.tick)
            continue
        # tick k is due when billable_ms reaches k * tick: the server-side timer lateness is
        # billable_ms - k * tick; the cadence lateness compares each arrival with the best
        # on-time grid this connection saw (its earliest arrival minus k * tick). The ticks
        # counted are those due on that grid inside the window, whenever they arrived.
        ks = [b // tick_ms for _, b in events]
        offsets = [t - k * args.tick for (t, _), k in zip(events, ks)]
        origin = min(offsets)
        due = range(math.ceil((t_start - origin) / args.tick), math.floor((t_end - origin) / args.tick) + 1)
        expected += len(due)
        got += len(set(ks).intersection(due))
        for (_, b), k, offset in zip(events, ks, offsets):
            if k in due:
                cadence.append(offset - origin)
                timer.append((b - k * tick_ms) / 1000)
    await close_all(conns, timeout=60)
    return {"mode": "billing", "connections": len(conns), "opened": opened, "held": held,
            "tick_s": args.tick, "start_s": setup_s, "events": got, "events_expected": expected,
            "cadence_lateness_ms": percentiles(cadence), "timer_lateness_ms": percentiles(timer),
            "errors": dict(stats.errors), **win}


MODES = {"chat": mode_chat, "fanout": mode_fanout, "idle": mode_idle, "billing": mode_billing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=sorted(MODES))
    ap.add_argument("--url", required=True)
    ap.add_argument("--plan", required=True, help="JSON plan file (see the module doc)")
    ap.add_argument("--raw", action="store_true", help="the floor server's protocol (no hello/join)")
    ap.add_argument("--server-pid", type=int, default=0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout")
    ap.add_argument("--senders", type=int, default=5, help="fanout: how many participants send")
    ap.add_argument("--tick", type=float, default=1.0, help="billing: the server's --billing-tick")
    ap.add_argument("--verify", type=int, default=20, help="idle: pings on held connections")
    ap.add_argument("--connect-concurrency", type=int, default=64)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(args.plan) as fh:
        plan = json.load(fh)
    coro = MODES[args.mode](args, plan)
    if importlib.util.find_spec("uvloop"):
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    result["url"] = args.url
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
