"""PostgreSQL only: nodes migrating together, a whole Parley server on PostgreSQL
restarted on the same database, and `run.py` selecting it from PARLEY_DATABASE_URL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import trio

from storage.postgres_backend import PostgresBackend
from storage.schema import SCHEMA_VERSION
from tests.conftest import SECRET, start_server, test_settings
from tests.storage.conftest import PostgresStore

ROOT = Path(__file__).resolve().parents[2]


def test_nodes_starting_together_migrate_once(postgres_url: str):
    store = PostgresStore(postgres_url)
    nodes = 6
    barrier = threading.Barrier(nodes)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait(10)
            PostgresBackend(postgres_url).connect(writer=True).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert store.version() == SCHEMA_VERSION
    assert store.query("SELECT COUNT(*) FROM schema_version") == [(1,)]
    assert "sessions" in store.tables()


async def test_a_server_on_postgres_bills_chats_and_reads_back_after_restart(
    nursery: trio.Nursery, tmp_path: Path, postgres_url: str
):
    settings = test_settings(tmp_path, database_url=postgres_url, billing_tick=0.2)
    with trio.fail_after(60):
        server = await start_server(nursery, settings)
        session = await server.create_session("alice", "bob", rate_per_minute=600)
        sid = session["id"]
        await server.start_session(sid)
        sent: list[dict] = []
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            for n in range(10):
                sender, receiver = (alice, bob) if n % 2 == 0 else (bob, alice)
                ack = await sender.request("chat.send", session=sid, client_id=f"m{n}", body=f"hello {n}")
                assert ack["seq"] == n + 1
                got = await receiver.next_event("chat.message")
                assert (got["id"], got["seq"]) == (ack["id"], ack["seq"])
                sent.append(ack)
            resent = await alice.request("chat.send", session=sid, client_id="m0", body="hello 0")
            assert (resent["id"], resent["seq"]) == (sent[0]["id"], 1)  # idempotent: nothing new
            await trio.sleep(0.5)  # billable time: both joined
            ended = await server.http.post(f"/api/sessions/{sid}/end", headers=server.auth("alice"))
            assert ended.status_code == 200, ended.text
            assert ended.json()["state"] == "ended"
        billing = (await server.http.get(f"/api/sessions/{sid}/billing", headers=server.auth("alice"))).json()
        assert billing["final"] is True and billing["billable_ms"] > 0
        assert billing["amount_minor"] == -(-billing["billable_ms"] * 600 // 60000)
        await server.stop()
        await server.http.aclose()
        assert not (settings.data_dir / "parley.sqlite3").exists()  # everything went to PostgreSQL

        again = await start_server(nursery, settings)
        history = (await again.http.get(f"/api/sessions/{sid}/messages", headers=again.auth("bob"))).json()["items"]
        assert [m["seq"] for m in history] == list(range(1, 11))
        assert [(m["id"], m["body"]) for m in history] == [(a["id"], f"hello {n}") for n, a in enumerate(sent)]
        after = (await again.http.get(f"/api/sessions/{sid}/billing", headers=again.auth("bob"))).json()
        assert after == billing  # final: a restart never changes it
        timeline = (await again.http.get(f"/api/sessions/{sid}/timeline", headers=again.auth("bob"))).json()
        assert [e["kind"] for e in timeline["items"]].count("billing_finalized") == 1
        await again.stop()
        await again.http.aclose()


def _run_py_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    return {**env, "PYTHONUNBUFFERED": "1", **variables}


async def test_run_py_serves_on_postgres_with_database_url_alone(tmp_path: Path, postgres_url: str):
    process = await trio.lowlevel.open_process(
        [sys.executable, "run.py", "--port", "0", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env=_run_py_env(PARLEY_DATABASE_URL=postgres_url, PARLEY_SECRET=SECRET),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = b""
    try:
        with trio.fail_after(30):
            while not (match := re.search(rb"listening on http://127\.0\.0\.1:(\d+)", output)):
                chunk = await process.stdout.receive_some()
                assert chunk, f"the server exited before listening: {output.decode(errors='replace')}"
                output += chunk
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{int(match.group(1))}") as http:
                assert (await http.get("/readyz")).status_code == 200
            process.send_signal(signal.SIGTERM)
            while chunk := await process.stdout.receive_some():
                output += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    log = output.decode(errors="replace")
    assert process.returncode == 0, log
    assert "PostgreSQL database" in log and postgres_url.rsplit("/", 1)[1] in log
    assert "@" not in log.split("PostgreSQL database", 1)[1].splitlines()[0]  # no credentials in the log
    assert not (tmp_path / "data" / "parley.sqlite3").exists()
    assert PostgresStore(postgres_url).count("sessions") == 0  # migrated, empty


def test_run_py_refuses_redis_url_without_postgres_a_non_postgres_url_and_an_unreachable_database(tmp_path: Path):
    for variables, code, says in (
        ({"PARLEY_REDIS_URL": "redis://localhost:6379"}, 2, "(cluster mode) needs PARLEY_DATABASE_URL"),
        ({"PARLEY_DATABASE_URL": "mysql://db/parley"}, 2, "must be a postgresql:// URL"),
        ({"PARLEY_DATABASE_URL": "postgresql://parley:hunter2@127.0.0.1:1/parley", "PARLEY_SECRET": SECRET}, 1,
         "cannot start: storage unavailable"),
    ):
        refused = subprocess.run(
            [sys.executable, "run.py", "--port", "0", "--data-dir", str(tmp_path / "data")],
            cwd=ROOT, env=_run_py_env(**variables), capture_output=True, text=True, timeout=30,
        )
        assert refused.returncode == code, refused.stderr
        assert says in refused.stderr
        assert "hunter2" not in refused.stderr
        assert "Traceback" not in refused.stderr
