#!/usr/bin/env python3
"""Run every Parley benchmark against the floor in one go and keep the table.

    make bench                                   # full sizes (about 10 minutes)
    make bench BENCH_ARGS=--quick                # everything small, under ~2 minutes
    .venv/bin/python bench/run_all.py --only relay,storage --relay-duration 20

For each scenario it starts a fresh Parley (subprocess, temp data dir, PARLEY_SECRET set,
port 0, the port read from its `listening on` line) and, where one applies, the floor
server (../shared/bench/relay_trio.py: Trio + trio-websocket, no auth, no storage), drives
both from a separate client process, prints a table and prepends it to bench/README.md.
Every loop is bounded in count and time; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_DIR,
    FLOOR_SERVER,
    HOST,
    RELAYBENCH,
    Rest,
    metric_value,
    mint,
    raise_nofile,
    start_floor,
    start_parley,
)
from parley_adapter import pair_of  # noqa: E402

PY = sys.executable
README = BENCH_DIR / "README.md"
RESULTS_MARK = "<!-- results: run_all.py prepends each run below this line -->"
CLIENT_GRACE = 180.0  # seconds a client process may take beyond its planned run


# ---------------------------------------------------------------- rows


class Row(dict):
    """scenario, metric, floor, parley, ratio, cpu_floor, cpu_parley, target, notes."""


def ratio(parley: float | None, floor: float | None) -> float | None:
    if parley is None or floor in (None, 0):
        return None
    return round(parley / floor, 2)


def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


# ---------------------------------------------------------------- client processes


def run_client(argv: list[str], out: Path, planned_s: float, log: Path) -> dict:
    """Run a client process to completion (bounded) and return its JSON result."""
    with open(log, "ab") as fh:
        fh.write(("$ " + " ".join(argv) + "\n").encode())
        fh.flush()
        try:
            subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           timeout=planned_s + CLIENT_GRACE, check=False)
        except subprocess.TimeoutExpired:
            return {"fatal": f"client did not finish within {planned_s + CLIENT_GRACE:.0f}s"}
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return {"fatal": f"no result; see {log}"}


def relaybench(url: str, pid: int, label: str, out: Path, log: Path, *, pairs: int, rate: float,
               duration: float, warmup: float, procs: int, adapter: str = "raw",
               adapter_opts: tuple[str, ...] = ()) -> dict:
    argv = [PY, str(RELAYBENCH), "load", "--adapter", adapter, "--url", url, "--pairs", str(pairs),
            "--duration", str(duration), "--warmup", str(warmup), "--procs", str(procs),
            "--server-pid", str(pid), "--label", label, "--json", str(out)]
    if rate:
        argv += ["--rate", str(rate)]
    for opt in adapter_opts:
        argv += ["--adapter-opt", opt]
    return run_client(argv, out, duration + warmup + 60, log)


def loadgen(mode: str, url: str, pid: int, plan: dict, work: Path, log: Path, *, duration: float,
            warmup: float, raw: bool = False, extra: tuple[str, ...] = (), setup_s: float = 120.0) -> dict:
    tag = f"{mode}-{'floor' if raw else 'parley'}"
    plan_path, out = work / f"{tag}-plan.json", work / f"{tag}.json"
    plan_path.write_text(json.dumps(plan))
    argv = [PY, str(BENCH_DIR / "loadgen.py"), mode, "--url", url, "--plan", str(plan_path),
            "--server-pid", str(pid), "--duration", str(duration), "--warmup", str(warmup),
            "--json", str(out), *extra]
    if raw:
        argv.append("--raw")
    return run_client(argv, out, duration + warmup + setup_s, log)


def tokens_for(users: list[str]) -> dict[str, str]:
    return {user: mint(user) for user in users}


def problems(server) -> str:
    found = {k: v for k, v in server.log_problems().items() if v}
    return "; server log: " + ", ".join(f"{k} {v}" for k, v in found.items()) if found else ""


def errors_note(errors: dict | None) -> str:
    if not errors:
        return ""
    items = sorted(errors.items(), key=lambda kv: -kv[1])[:4]
    return "; errors " + ", ".join(f"{k}×{v}" for k, v in items)


# ---------------------------------------------------------------- scenarios


def scenario_relay(args, work: Path, log: Path, shared: dict) -> list[Row]:
    """Signaling relay: relaybench pairs through the floor and through Parley sessions."""
    configs = [("relay", args.relay_pairs, 0.0), ("relay paced", args.relay_pairs, args.relay_rate),
               ("relay", args.relay_big_pairs, 0.0)]
    configs = [c for c in configs if c[1] > 0]
    max_pairs = max(c[1] for c in configs)
    procs = args.relay_procs
    floor = start_floor(work / "floor-relay")
    parley = start_parley(work / "parley-relay", heartbeat=args.heartbeat)
    rows = []
    try:
        users = [f"w{w}p{i:04d}{side}" for w in range(procs) for i in range(max_pairs) for side in "ab"]
        # relaybench splits pairs over its workers: worker w gets pairs [lo, hi) named w<w>p<i>
        keys = sorted({pair_of(u) for u in users})
        ids = Rest(parley.port).create_sessions(
            [{"payer": k + "a", "provider": k + "b"} for k in keys])
        map_path = work / "relay-map.json"
        map_path.write_text(json.dumps({"users": tokens_for(users), "sessions": dict(zip(keys, ids))}))
        adapter = f"{BENCH_DIR / 'parley_adapter.py'}:ParleyAdapter"
        for name, pairs, rate in configs:
            common = dict(pairs=pairs, rate=rate, duration=args.relay_duration, warmup=args.warmup, procs=procs)
            label = f"{name} {pairs}p"
            floors, parleys = [], []
            for rep in range(args.relay_repeat):  # alternate, so drift on the machine hits both
                floors.append(relaybench(f"ws://{HOST}:{floor.port}", floor.pid, "floor " + label,
                                         work / f"relay-floor-{pairs}-{int(rate)}-{rep}.json", log, **common))
                parleys.append(relaybench(f"ws://{HOST}:{parley.port}", parley.pid, "parley " + label,
                                          work / f"relay-parley-{pairs}-{int(rate)}-{rep}.json", log,
                                          adapter=adapter, adapter_opts=(f"map={map_path}",), **common))
            f, p = median_run(floors, rate), median_run(parleys, rate)
            shared.setdefault("relay", {})[(pairs, rate)] = (f, p)
            rows += relay_rows(name, pairs, rate, f, p)
        rows[-1]["notes"] += problems(parley)
    finally:
        floor.stop()
        parley.stop()
    return rows


def median_run(runs: list[dict], rate: float) -> dict:
    """The median run: by msg/s at max rate, by RTT p99 when paced (fatal runs last)."""
    def key(r: dict) -> float:
        if r.get("fatal"):
            return float("inf") if rate else float("-inf")
        return (r.get("rtt_ms") or {}).get("p99", float("inf")) if rate else r.get("relayed_msgs_per_s", 0.0)

    ordered = sorted(runs, key=key)
    chosen = dict(ordered[(len(ordered) - 1) // 2] if rate else ordered[len(ordered) // 2])
    chosen["repeats"] = len(runs)
    return chosen


def relay_rows(name: str, pairs: int, rate: float, f: dict, p: dict) -> list[Row]:
    def get(r, *path):
        for key in path:
            if not isinstance(r, dict):
                return None
            r = r.get(key)
        return r

    scen = f"{name}, {pairs} pairs" + (f", {rate * 2:,.0f} msg/s" if rate else ", max rate")
    fatal = "; ".join(str(r.get("fatal")) for r in (f, p) if r.get("fatal"))
    held = f"held {get(f, 'connections_held')}/{get(p, 'connections_held')} of {2 * pairs}"
    other = f"other procs {get(f, 'system', 'other_pct')}%/{get(p, 'system', 'other_pct')}% of a core"
    reps = f"median of {p.get('repeats')}; " if (p.get("repeats") or 1) > 1 else ""
    notes = (f"{reps}RTT p50 {get(f, 'rtt_ms', 'p50')}/{get(p, 'rtt_ms', 'p50')} ms; {held}; {other}"
             + errors_note(get(p, "errors")) + (f"; FATAL {fatal}" if fatal else ""))
    rows = [Row(scenario=scen, metric="relayed msg/s", floor=get(f, "relayed_msgs_per_s"),
                parley=get(p, "relayed_msgs_per_s"),
                cpu_floor=get(f, "server", "cpu_us_per_msg"), cpu_parley=get(p, "server", "cpu_us_per_msg"),
                target="≥ 0.90, µs ≤ 1.1×" if not rate else "", notes=notes)]
    rows.append(Row(scenario=scen, metric="RTT p99 ms", floor=get(f, "rtt_ms", "p99"),
                    parley=get(p, "rtt_ms", "p99"), target="≤ 1.2×" if rate else "", digits=1,
                    notes=f"server CPU {get(f, 'server', 'cpu_pct')}% / {get(p, 'server', 'cpu_pct')}%"))
    return rows


def scenario_storage(args, work: Path, log: Path, shared: dict) -> list[Row]:
    out = work / "storage.json"
    argv = [PY, str(BENCH_DIR / "storage_bench.py"), "--batches", args.storage_batches,
            "--writers", str(args.storage_writers), "--seconds", str(args.storage_seconds),
            "--inserts", str(args.storage_inserts), "--dir", str(work), "--json", str(out),
            "--saturated-batches", args.storage_saturated_batches]
    runs = len(args.storage_batches.split(",")) + len([b for b in args.storage_saturated_batches.split(",") if b])
    planned = (runs + 1) * (args.storage_seconds + 10)
    result = run_client(argv, out, planned, log)
    if result.get("fatal"):
        return [Row(scenario="storage inserts", metric="inserts/s", notes="FATAL " + result["fatal"])]
    floor = result["floor"]["commits_per_s"]
    rows = []
    for run in result["runs"]:
        lat = run["latency_ms"]
        saturated = run.get("saturated")
        rows.append(Row(
            scenario=f"storage only, batch ≤ {run['batch_bound']}, {run['writers']} writers"
                     + (", Trio loop saturated" if saturated else ""),
            metric="inserts/s (FULL)", floor=floor, parley=run["inserts_per_s"],
            target="reported" if saturated else "≥ 20,000/s",
            notes=f"floor = SQLite 1-row commits; mean batch {run['mean_batch']}; "
                  f"latency p50 {lat.get('p50')} p99 {lat.get('p99')} ms; errors {run['errors']}"
                  + (f"; GIL turns {run.get('gil_turns')}" if saturated else "")))
    return rows


def scenario_chat(args, work: Path, log: Path, shared: dict) -> list[Row]:
    n = args.chat_sessions
    parley = start_parley(work / "parley-chat", heartbeat=args.heartbeat)
    try:
        users = [f"c{i:05d}{side}" for i in range(n) for side in "ab"]
        ids = Rest(parley.port).create_sessions([{"payer": f"c{i:05d}a", "provider": f"c{i:05d}b"} for i in range(n)])
        plan = {"users": tokens_for(users), "conns": [[u, ids[i // 2]] for i, u in enumerate(users)]}
        r = loadgen("chat", f"ws://{HOST}:{parley.port}", parley.pid, plan, work, log,
                    duration=args.chat_duration, warmup=args.warmup)
        notes_tail = problems(parley)
    finally:
        parley.stop()
    relay = shared.get("relay", {}).get((args.relay_pairs, 0.0))
    relay_parley = relay[1].get("relayed_msgs_per_s") if relay else None
    ack = r.get("ack_ms", {})
    return [Row(scenario=f"durable chat, {n} sessions, 1 sender each", metric="acked msg/s",
                floor=relay_parley, parley=r.get("acked_per_s"), cpu_parley=r.get("server_us_per_msg"),
                target="≥ 0.80 of relay",
                notes=(f"floor = Parley relay {args.relay_pairs}p this run; ack p50 {ack.get('p50')} "
                       f"p99 {ack.get('p99')} ms; server CPU {r.get('server_cpu_pct')}%"
                       + errors_note(r.get("errors")) + notes_tail
                       + (f"; FATAL {r['fatal']}" if r.get("fatal") else "")))]


def scenario_fanout(args, work: Path, log: Path, shared: dict) -> list[Row]:
    n = args.fanout_participants
    parley = start_parley(work / "parley-fanout", heartbeat=args.heartbeat)
    try:
        users = [f"f{i:03d}" for i in range(n)]
        ids = Rest(parley.port).create_sessions([{"payer": users[0], "provider": users[1], "guests": users[2:]}])
        plan = {"users": tokens_for(users), "conns": [[u, ids[0]] for u in users]}
        r = loadgen("fanout", f"ws://{HOST}:{parley.port}", parley.pid, plan, work, log,
                    duration=args.fanout_duration, warmup=args.warmup,
                    extra=("--senders", str(args.fanout_senders)))
        slow = metric_value(Rest(parley.port).metrics(), "parley_slow_consumers_total")
        notes_tail = problems(parley)
    finally:
        parley.stop()
    relay = shared.get("relay", {}).get((args.relay_pairs, 0.0))
    floor_relay = relay[0].get("relayed_msgs_per_s") if relay else None
    ack = r.get("ack_ms", {})
    return [Row(scenario=f"fan-out, 1 session × {n}, {r.get('senders')} senders", metric="deliveries/s",
                floor=floor_relay, parley=r.get("deliveries_per_s"), cpu_parley=r.get("server_us_per_delivery"),
                notes=(f"floor = floor relay {args.relay_pairs}p frames/s; sent {r.get('acked_per_s')} msg/s; "
                       f"ack p99 {ack.get('p99')} ms; held {r.get('held')}/{n}; slow consumers {slow}"
                       + errors_note(r.get("errors")) + notes_tail
                       + (f"; FATAL {r['fatal']}" if r.get("fatal") else "")))]


def scenario_idle(args, work: Path, log: Path, shared: dict) -> list[Row]:
    n = args.idle_conns - args.idle_conns % 2
    users = [f"i{i:05d}" for i in range(n)]
    floor = start_floor(work / "floor-idle")
    try:
        f = loadgen("idle", f"ws://{HOST}:{floor.port}", floor.pid, {"conns": [[u, None] for u in users]},
                    work, log, duration=args.idle_hold, warmup=args.warmup, raw=True)
    finally:
        floor.stop()
    parley = start_parley(work / "parley-idle", heartbeat=args.idle_heartbeat)
    try:
        keys = [f"i{k:05d}" for k in range(n // 2)]
        ids = Rest(parley.port).create_sessions(
            [{"payer": f"i{2 * k:05d}", "provider": f"i{2 * k + 1:05d}"} for k in range(n // 2)])
        plan = {"users": tokens_for(users), "conns": [[u, ids[i // 2]] for i, u in enumerate(users)]}
        assert all(pair_of(u) == keys[i // 2] for i, u in enumerate(users))
        # hello + join for every connection: on a busy machine that can take minutes
        p = loadgen("idle", f"ws://{HOST}:{parley.port}", parley.pid, plan, work, log,
                    duration=args.idle_hold, warmup=args.warmup, setup_s=120 + n / 10)
        notes_tail = problems(parley)
    finally:
        parley.stop()
    scen = f"idle, {n:,} conns ({n // 2:,} sessions, heartbeat {args.idle_heartbeat:g}s)"
    held = f"held {f.get('held')}/{p.get('held')} of {n}; open {f.get('open_per_s')}/{p.get('open_per_s')} conn/s"
    return [Row(scenario=scen, metric="RSS KiB/conn", floor=f.get("rss_kib_per_conn"),
                parley=p.get("rss_kib_per_conn"), target="≤ 25 KiB", digits=1,
                notes=held + errors_note(p.get("errors")) + notes_tail
                + "".join(f"; FATAL {r['fatal']}" for r in (f, p) if r.get("fatal"))),
            Row(scenario=scen, metric="idle CPU % of a core", floor=f.get("server_cpu_pct"),
                parley=p.get("server_cpu_pct"), target="< 5%", digits=1,
                notes=f"over {args.idle_hold:g}s; Parley verified pings {p.get('verified')}")]


def scenario_billing(args, work: Path, log: Path, shared: dict) -> list[Row]:
    n = args.billing_sessions
    parley = start_parley(work / "parley-billing", heartbeat=args.heartbeat, billing_tick=args.billing_tick)
    try:
        users = [f"b{i:05d}{side}" for i in range(n) for side in "ab"]
        t0 = time.monotonic()
        ids = Rest(parley.port).create_sessions(
            [{"payer": f"b{i:05d}a", "provider": f"b{i:05d}b"} for i in range(n)])
        setup_s = time.monotonic() - t0
        # the client starts the sessions once everyone has joined (an active session nobody
        # joins within orphan_timeout would end before a slow set-up finishes)
        plan = {"users": tokens_for(users), "conns": [[u, ids[i // 2]] for i, u in enumerate(users)],
                "start": {"port": parley.port, "sessions": ids}}
        r = loadgen("billing", f"ws://{HOST}:{parley.port}", parley.pid, plan, work, log,
                    duration=args.billing_duration, warmup=args.warmup,
                    extra=("--tick", str(args.billing_tick)))
        notes_tail = problems(parley)
    finally:
        parley.stop()
    cad, tim = r.get("cadence_lateness_ms", {}), r.get("timer_lateness_ms", {})
    scen = f"billing, {n:,} active sessions, tick {args.billing_tick:g}s"
    return [Row(scenario=scen, metric="tick lateness p99 ms", parley=cad.get("p99"), target="≤ 50 ms", digits=1,
                notes=(f"cadence p50 {cad.get('p50')} max {cad.get('max')} ms; server timer p50 {tim.get('p50')} "
                       f"p99 {tim.get('p99')} ms; events {r.get('events')}/{r.get('events_expected')}; "
                       f"held {r.get('held')}/{2 * n}; create {setup_s:.0f}s, start {r.get('start_s')}s; "
                       f"client CPU {r.get('client_cpu_pct')}%, GC max {r.get('client_gc', {}).get('max_ms')} ms"
                       + errors_note(r.get("errors")) + notes_tail
                       + (f"; FATAL {r['fatal']}" if r.get("fatal") else ""))),
            Row(scenario=scen, metric="server CPU % of a core", parley=r.get("server_cpu_pct"), digits=1,
                notes=f"RSS {r.get('server_rss_kib')} KiB")]


SCENARIOS = {"relay": scenario_relay, "storage": scenario_storage, "chat": scenario_chat,
             "fanout": scenario_fanout, "idle": scenario_idle, "billing": scenario_billing}


# ---------------------------------------------------------------- table


def table(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| scenario | metric | floor | Parley | ratio | target | server µs CPU/msg floor / Parley | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        digits = r.get("digits", 0)
        cpu = f"{fmt(r.get('cpu_floor'), 1)} / {fmt(r.get('cpu_parley'), 1)}"
        if r.get("cpu_floor") is None and r.get("cpu_parley") is None:
            cpu = ""
        lines.append(f"| {r.get('scenario', '')} | {r.get('metric', '')} | {fmt(r.get('floor'), digits)} | "
                     f"{fmt(r.get('parley'), digits)} | {fmt(ratio(r.get('parley'), r.get('floor')), 2)} | "
                     f"{r.get('target', '')} | {cpu} | {r.get('notes', '')} |")
    return "\n".join(lines) + "\n"


def prepend_to_readme(text: str) -> None:
    body = README.read_text() if README.exists() else f"# Parley benchmarks\n\n## Results\n\n{RESULTS_MARK}\n"
    if RESULTS_MARK not in body:
        body = body.rstrip() + f"\n\n## Results\n\n{RESULTS_MARK}\n"
    head, tail = body.split(RESULTS_MARK, 1)
    README.write_text(head + RESULTS_MARK + "\n\n" + text + "\n" + tail.lstrip("\n"))


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every scenario small: under ~2 minutes")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {','.join(SCENARIOS)}")
    ap.add_argument("--no-readme", action="store_true", help="print the table only")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, JSON results)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--heartbeat", type=float, default=15.0, help="Parley --heartbeat for load scenarios")
    g = ap.add_argument_group("signaling relay")
    g.add_argument("--relay-pairs", type=int, default=200)
    g.add_argument("--relay-rate", type=float, default=1000.0, help="paced exchanges/s (2 msgs each)")
    g.add_argument("--relay-big-pairs", type=int, default=1000, help="0 skips the large run")
    g.add_argument("--relay-duration", type=float, default=15.0)
    g.add_argument("--relay-procs", type=int, default=1, help="relaybench client processes")
    g.add_argument("--relay-repeat", type=int, default=1, help="runs per configuration (median kept)")
    g = ap.add_argument_group("storage only")
    g.add_argument("--storage-batches", default="1,16,64,256,1024")
    g.add_argument("--storage-saturated-batches", default="64,1024",
                   help="batch bounds run again beside a saturated Trio loop ('' skips)")
    g.add_argument("--storage-writers", type=int, default=1024)
    g.add_argument("--storage-seconds", type=float, default=6.0)
    g.add_argument("--storage-inserts", type=int, default=200_000)
    g = ap.add_argument_group("durable chat")
    g.add_argument("--chat-sessions", type=int, default=200)
    g.add_argument("--chat-duration", type=float, default=15.0)
    g = ap.add_argument_group("fan-out")
    g.add_argument("--fanout-participants", type=int, default=50)
    g.add_argument("--fanout-senders", type=int, default=5)
    g.add_argument("--fanout-duration", type=float, default=10.0)
    g = ap.add_argument_group("idle capacity")
    g.add_argument("--idle-conns", type=int, default=10_000)
    g.add_argument("--idle-hold", type=float, default=20.0, help="seconds measured (≥ one heartbeat)")
    g.add_argument("--idle-heartbeat", type=float, default=15.0, help="Parley --heartbeat (its default)")
    g = ap.add_argument_group("billing at scale")
    g.add_argument("--billing-sessions", type=int, default=2000)
    g.add_argument("--billing-tick", type=float, default=1.0)
    g.add_argument("--billing-duration", type=float, default=15.0)
    args = ap.parse_args(argv)
    if args.quick:
        quick = dict(relay_pairs=50, relay_rate=250.0, relay_big_pairs=0, relay_duration=5.0,
                     storage_batches="1,64,1024", storage_saturated_batches="64", storage_seconds=2.0,
                     storage_writers=512,
                     chat_sessions=50, chat_duration=5.0, fanout_participants=20, fanout_senders=3,
                     fanout_duration=4.0, idle_conns=1000, idle_hold=4.0, idle_heartbeat=2.0,
                     billing_sessions=100, billing_duration=5.0, warmup=1.0)
        for key, value in quick.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (RELAYBENCH, FLOOR_SERVER):
        if not tool.exists():
            print(f"run_all: {tool} is missing. The reference load generator and floor server are "
                  f"expected in ../shared/bench next to the repository.", file=sys.stderr)
            return 2
    nofile = raise_nofile()
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        print(f"run_all: unknown scenario(s) {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    log = work / "clients.log"
    started = datetime.now(timezone.utc)
    print(f"parley bench: work dir {work} (client output in {log}); open-file limit {nofile}", flush=True)
    rows: list[Row] = []
    shared: dict = {}
    for name in SCENARIOS:  # fixed order: relay first (chat and fan-out compare with it)
        if name not in wanted:
            continue
        t0 = time.monotonic()
        print(f"== {name} ...", flush=True)
        try:
            new = SCENARIOS[name](args, work, log, shared)
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
            new = [Row(scenario=name, metric="", notes=f"FAILED: {type(exc).__name__}: {str(exc)[:300]}")]
        rows += new
        print(table(new, f"({name}: {time.monotonic() - t0:.0f}s)"), flush=True)
    command = "make bench" + (" BENCH_ARGS=--quick" if args.quick else "")
    if argv is not None or len(sys.argv) > 1:
        command = "bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = f"### {started:%Y-%m-%d %H:%M} UTC · {os.cpu_count()} cores · `{command}`"
    text = table(rows, header)
    print("\n" + text)
    if not args.no_readme:
        prepend_to_readme(text)
        print(f"prepended to {README}")
    if not args.keep:
        subprocess.run(["rm", "-rf", "--", str(work)], check=False)
    else:
        print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
