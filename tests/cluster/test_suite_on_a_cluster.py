"""The single-node chat, signaling, REST and protocol tests again, on a two-node cluster: the `server` fixture
is switched here to node a, and every session it creates is claimed by node b first, so each
of their WebSocket and REST requests crosses nodes (through Redis) to the owner and back."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import pytest

from actors.directory import call_session
from actors.session import Flush
from tests import test_chat, test_chat_limits, test_chat_races, test_rest, test_signaling, test_ws_protocol
from tests.conftest import ServerFixture

# what differs on purpose: in a cluster, admins also see the session's `owner_node` (PRODUCT.md section 10)
DIFFERENT_IN_A_CLUSTER = {"test_create_and_get"}

for _module in (test_chat, test_signaling, test_rest, test_ws_protocol, test_chat_races, test_chat_limits):
    for _name, _test in vars(_module).items():
        if (_name.startswith("test_") and _name not in DIFFERENT_IN_A_CLUSTER
                and "server" in inspect.signature(_test).parameters):
            globals()[_name] = _test


@dataclass
class CrossNodeServer(ServerFixture):
    owner: ServerFixture | None = None

    async def create_session(self, payer: str = "alice", provider: str = "bob", **fields: Any) -> dict[str, Any]:
        session = await super().create_session(payer, provider, **fields)
        assert self.owner is not None
        owner = self.owner.running
        await call_session(owner.context.directory, owner.post_office, session["id"], lambda r: Flush(reply=r))
        got = await self.http.get(f"/api/sessions/{session['id']}", headers=self.auth("admin", admin=True))
        assert got.json()["owner_node"] == "b"
        return session


@pytest.fixture
async def server(make_node):
    owner = await make_node("b")
    front = await make_node("a")
    fixture = CrossNodeServer(
        running=front.running, settings=front.settings, shutdown=front.shutdown, http=front.http,
        stopped=front.stopped, owner=owner,
    )
    yield fixture
    await owner.http.aclose()
    await front.http.aclose()
