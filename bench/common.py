"""Shared pieces of Parley's benchmarks: servers as subprocesses, REST set-up, tokens, /proc.

Nothing here imports the server: benchmarks talk to it over 127.0.0.1 like any client,
except `storage_bench.py`, which drives the storage actor in-process on purpose.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SHARED_BENCH = (REPO / ".." / "shared" / "bench").resolve()
RELAYBENCH = SHARED_BENCH / "relaybench.py"
FLOOR_SERVER = SHARED_BENCH / "relay_trio.py"
HOST = "127.0.0.1"  # every benchmark talks to this address only
SECRET = "parley-bench-secret-not-for-production"
TOKEN_TTL = 6 * 3600
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- /proc


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_kib(pid: int, field: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def raise_nofile(wanted: int = 1 << 20) -> int:
    """Raise this process's open-file limit as far as allowed; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentiles(samples: list[float]) -> dict:
    """Nearest-rank percentiles of seconds, reported in milliseconds."""
    s = sorted(samples)
    n = len(s)
    if not n:
        return {"n": 0}

    def q(p: float) -> float:
        return round(1000.0 * s[min(n - 1, max(0, int(p * n + 0.999999) - 1))], 3)

    return {"n": n, "p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "max": round(1000.0 * s[-1], 3)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- tokens


def mint(user: str, *, admin: bool = False) -> str:
    """A token Parley accepts when it runs with PARLEY_SECRET=SECRET (the claims of gateway/auth.py)."""
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + TOKEN_TTL, "role": "admin" if admin else "user"}
    return jwt.encode(claims, SECRET, algorithm="HS256")


# ---------------------------------------------------------------- servers


class Server:
    """A server subprocess whose log goes to a file; `stop` sends SIGTERM, then kills."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=REPO,
        )
        self.pid = self.proc.pid
        self.port = 0

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            found = regex.search(text)
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not start (exit {self.proc.poll()}); log tail:\n{tail}")

    def log_problems(self) -> dict[str, int]:
        """Counts of worrying lines in the server log (for the notes column)."""
        text = self.log_path.read_text(errors="replace")
        return {
            "tracebacks": text.count("Traceback"),
            "errors": len(re.findall(r" ERROR ", text)),
            "crashed": text.count("crashed"),
        }

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_parley(data_dir: Path, *, heartbeat: float = 15.0, billing_tick: float = 5.0,
                 storage_batch: int | None = None, extra: tuple[str, ...] = ()) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PARLEY_SECRET=SECRET)
    for name in ("PARLEY_PORT", "PARLEY_HOST", "PARLEY_DATA_DIR", "PARLEY_REDIS_URL", "PARLEY_DATABASE_URL"):
        env.pop(name, None)
    argv = [sys.executable, str(REPO / "run.py"), "serve", "--host", HOST, "--port", "0",
            "--data-dir", str(data_dir), "--heartbeat", str(heartbeat),
            "--billing-tick", str(billing_tick), "--log-level", "INFO",
            # every load generator connects from this one loopback address
            "--max-connections-per-address", "0", *extra]
    if storage_batch is not None:
        argv += ["--storage-batch", str(storage_batch)]
    server = Server("parley", argv, data_dir / "server.log", env)
    match = server.wait_for_line(r"listening on http://[\d.]+:(\d+)")
    server.port = int(match.group(1))
    return server


def start_floor(work_dir: Path) -> Server:
    if not FLOOR_SERVER.exists():
        raise SystemExit(
            f"the floor server is missing: expected {FLOOR_SERVER}\n"
            "(run_all.py looks for the shared reference tools in ../shared/bench next to the repo)"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, str(FLOOR_SERVER), "--host", HOST, "--port", str(port)]
    server = Server("floor", argv, work_dir / "floor.log")
    server.wait_for_line(r"relay_trio listening")
    server.port = port
    return server


# ---------------------------------------------------------------- REST set-up


class Rest:
    """Admin REST calls over a few keep-alive connections (one per worker thread)."""

    def __init__(self, port: int, workers: int = 8) -> None:
        self.port = port
        self.workers = workers
        self.headers = {"Authorization": "Bearer " + mint("bench-admin", admin=True),
                        "Content-Type": "application/json"}

    def _call(self, conn: http.client.HTTPConnection, method: str, path: str, body: dict | None) -> dict:
        data = json.dumps(body).encode() if body is not None else b""
        for attempt in range(3):
            try:
                conn.request(method, path, body=data, headers=self.headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                if attempt == 2:
                    raise
        if response.status >= 300:
            raise RuntimeError(f"{method} {path} -> {response.status}: {payload[:300]!r}")
        return json.loads(payload)

    def create_sessions(self, specs: list[dict], *, start: bool = False) -> list[str]:
        """Create one session per spec (payer, provider, guests?); optionally start each. → ids."""
        chunks = [specs[i::self.workers] for i in range(self.workers)]

        def work(chunk: list[dict]) -> list[tuple[int, str]]:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
            out = []
            try:
                for spec in chunk:
                    body = {"payer": spec["payer"], "provider": spec["provider"],
                            "rate_per_minute": 60, "currency": "USD", "guests": spec.get("guests", [])}
                    session = self._call(conn, "POST", "/api/sessions", body)
                    if start:
                        self._call(conn, "POST", f"/api/sessions/{session['id']}/start", None)
                    out.append((spec["index"], session["id"]))
            finally:
                conn.close()
            return out

        for i, spec in enumerate(specs):
            spec["index"] = i
        ids: list[str] = [""] * len(specs)
        with ThreadPoolExecutor(self.workers) as pool:
            for chunk_result in pool.map(work, chunks):
                for index, session_id in chunk_result:
                    ids[index] = session_id
        return ids

    def start_sessions(self, ids: list[str]) -> None:
        chunks = [ids[i::self.workers] for i in range(self.workers)]

        def work(chunk: list[str]) -> None:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
            try:
                for session_id in chunk:
                    self._call(conn, "POST", f"/api/sessions/{session_id}/start", None)
            finally:
                conn.close()

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(work, chunks))

    def metrics(self) -> str:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in Prometheus text, e.g. parley_slow_consumers_total."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None
