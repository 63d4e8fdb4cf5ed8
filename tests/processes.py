"""`python run.py serve` as a real child process, for tests that kill or restart the server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")


class ServerProcess:
    def __init__(self, process: trio.Process, host: str, port: int) -> None:
        self.process = process
        self.base_url = f"http://{host}:{port}"
        self.ws_url = f"ws://{host}:{port}/ws"


async def spawn_server(
    nursery: trio.Nursery, data_dir: Path, *args: str, secret: str, log_level: str = "INFO",
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start the server on a free port, wait for its `listening on` line, keep draining its log."""
    env = {**os.environ, "PARLEY_SECRET": secret, "PARLEY_LOG_LEVEL": log_level, **(env or {})}
    process = await trio.lowlevel.open_process(
        [sys.executable, "run.py", "serve", "--port", "0", "--data-dir", str(data_dir), *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    buffer = b""
    try:
        with trio.fail_after(30):
            while (match := LISTENING.search(buffer.decode(errors="replace"))) is None:
                chunk = await process.stderr.receive_some()
                assert chunk, f"the server exited before listening:\n{buffer.decode(errors='replace')}"
                buffer += chunk
    except BaseException:
        process.kill()  # never leave a server behind that the caller has no handle of
        raise

    async def drain() -> None:  # a full pipe would stall the server's logging
        async for _ in process.stderr:
            pass

    nursery.start_soon(drain)
    return ServerProcess(process, match.group(1), int(match.group(2)))
