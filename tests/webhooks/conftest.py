"""Webhook test fixtures: a real receiver on a free port, and endpoints registered over REST."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.conftest import ServerFixture

from .receiver import Receiver

ALL_EVENTS = [
    "session.created", "session.started", "session.ended", "session.cancelled", "billing.limit_near",
    "participant.joined", "participant.left", "participant.dropped",
]


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    return await nursery.start(Receiver().serve)


async def register(server: ServerFixture, receiver: Receiver, path: str, events: list[str] | None = None,
                   **fields: Any) -> dict[str, Any]:
    """POST /api/webhooks for `receiver.url(path)`; the receiver learns its secret."""
    response = await server.http.post(
        "/api/webhooks", json={"url": receiver.url(path), "events": events or ALL_EVENTS, **fields},
        headers=server.auth("admin", admin=True),
    )
    assert response.status_code == 201, response.text
    endpoint = response.json()
    receiver.secrets[path] = endpoint["secret"]
    return endpoint
