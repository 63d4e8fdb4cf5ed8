"""Schemathesis against /openapi.json of a running server, as an admin and as a user:
no response is a 5xx and every response matches the document (status, content type,
schema). The `st` CLI runs in a child process against the test server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

EXAMPLES = os.environ.get("PARLEY_SCHEMATHESIS_EXAMPLES", "15")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.parametrize("admin", [True, False], ids=["admin", "user"])
async def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(make_server, admin, tmp_path):
    server = await make_server(rest_writes_per_second=100_000.0, rest_write_burst=100_000)
    await server.create_session(payer="alice", provider="bob")
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    token = server.token("alice", admin=admin)
    result = await trio.run_process(
        [str(st), "run", f"{server.base_url}/openapi.json", "--checks", CHECKS, "-H",
         f"Authorization: Bearer {token}", "--max-examples", EXAMPLES, "--seed", "1", "--no-color",
         "--phases", "examples,coverage,fuzzing", "--exclude-path", "/metrics"],  # text, not JSON
        capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path,  # its .schemathesis/ goes there
    )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output[-6000:]
