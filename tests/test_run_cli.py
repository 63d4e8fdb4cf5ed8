"""`python run.py` as integrators run it: the token command and the server process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _start(data_dir: Path) -> tuple[trio.Process, int, list[bytes]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "run.py", "--port", "0", "--data-dir", str(data_dir)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = b""
    with trio.fail_after(30):
        while True:
            match = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", output)
            if match:
                break
            chunk = await process.stdout.receive_some()
            assert chunk, f"the server exited before listening: {output.decode(errors='replace')}"
            output += chunk
    return process, int(match.group(1)), [output]


async def _drain(process: trio.Process, into: list[bytes]) -> None:
    while chunk := await process.stdout.receive_some():
        into.append(chunk)


async def test_token_command_and_server_share_the_data_dir_secret(tmp_path):
    data_dir = tmp_path / "data"
    minted = subprocess.run(
        [sys.executable, "run.py", "token", "alice", "--data-dir", str(data_dir)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30,
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.count(".") == 2
    assert (data_dir / "secret").exists()
    admin = subprocess.run(
        [sys.executable, "run.py", "token", "root", "--admin", "--data-dir", str(data_dir)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    process, port, output = await _start(data_dir)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process, output)
            with trio.fail_after(20):
                async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                    await ws.send_message(orjson.dumps({"type": "hello", "token": token}).decode())
                    welcome = orjson.loads(await ws.get_message())
                assert (welcome["type"], welcome["user"]) == ("welcome", "alice")
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    created = await http.post(
                        "/api/sessions", headers={"Authorization": f"Bearer {admin}"},
                        json={"payer": "alice", "provider": "bob", "rate_per_minute": 1, "currency": "USD"},
                    )
                    assert created.status_code == 201, created.text
                    forged = await http.get("/api/sessions", headers={"Authorization": "Bearer " + token[:-2] + "xx"})
                    assert forged.status_code == 401
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, b"".join(output).decode(errors="replace")


async def test_serve_on_port_zero_answers_healthz_and_exits_0_on_sigterm(tmp_path):
    process, port, output = await _start(tmp_path / "data")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process, output)
            with trio.fail_after(20):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    healthz = await http.get("/healthz")
                    assert healthz.status_code == 200 and healthz.json()["status"] == "ok"
                    assert (await http.get("/readyz")).status_code == 200
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    log = b"".join(output).decode(errors="replace")
    assert process.returncode == 0, log
    assert "generated one" in log or "secret" in log  # says where the new secret went
    assert (tmp_path / "data" / "secret").exists()
    assert (tmp_path / "data" / "parley.sqlite3").exists()
