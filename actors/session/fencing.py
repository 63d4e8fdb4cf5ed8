"""A session actor's view of storage in cluster mode: every write carries its owner epoch.

`SessionStorage` stamps the actor's `epoch` on each durable write of its session
(the requests with an `epoch` field), so the database refuses it (`Fenced`) once
another node has claimed the session. The first refusal is remembered: the actor
loop sees `fenced` after the message it was handling and stops at once. With no
epoch (one node) requests pass through unchanged.

`Ownership` is the port a cluster gives session actors: claim the session before
loading it (a Redis compare-and-set, then the epoch bump in PostgreSQL), and hear
when the actor ends (an idle session stays owned by its node, to start there again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import outcome
from prometheus_client import Counter

from domain.errors import Fenced, StorageUnavailable
from domain.metrics import REGISTRY
from storage import messages as sm
from storage.actor import DEFAULT_TIMEOUT, StorageHandle

R = TypeVar("R")

FENCED_WRITES = Counter(
    "parley_fenced_writes", "Session writes refused because another node owns the session now", registry=REGISTRY
)


class Ownership(Protocol):
    node: str

    @property
    def writable(self) -> bool:
        """False while this node's lease has lapsed: session writes are refused before storage."""
        ...

    async def claim(self, session_id: str) -> int:
        """Make this node the session's owner; → its new epoch. Raises `Fenced` when another
        live node owns it (the caller retries there), `NotFound` for an unknown session."""
        ...

    def stopped(self, session_id: str, epoch: int, *, fenced: bool, finished: bool) -> None:
        """The actor holding `epoch` has stopped (never blocks): because a newer owner exists
        (`fenced`), because its session is over or unknown (`finished`), or it retired idle."""
        ...


class SessionStorage:
    def __init__(self, storage: StorageHandle, ownership: Ownership | None = None) -> None:
        self._storage = storage
        self._ownership = ownership
        self.epoch: int | None = None
        self.fenced = False

    def stamp(self, request: Any) -> Any:
        """`request` as this session writes it (with its epoch), for a write sent by another task."""
        return self._stamp(request)

    def refused(self, error: Exception) -> None:
        """A write sent by another task (the billing clock) came back with `error`."""
        if isinstance(error, Fenced):
            FENCED_WRITES.inc()
            self.fenced = True

    def _stamp(self, request: Any) -> Any:
        if self.epoch is not None and getattr(request, "epoch", 0) is None:
            if self._ownership is not None and not self._ownership.writable:
                raise StorageUnavailable("this node's lease has lapsed; try again")
            return dataclasses.replace(request, epoch=self.epoch)
        return request

    async def write(self, request: sm.Write[R], *, timeout: float = DEFAULT_TIMEOUT) -> R:
        try:
            return await self._storage.write(self._stamp(request), timeout=timeout)
        except Fenced:
            FENCED_WRITES.inc()
            self.fenced = True
            raise

    async def write_many(
        self, requests: Sequence[sm.Write[R]], *, timeout: float = DEFAULT_TIMEOUT
    ) -> list[outcome.Outcome[R]]:
        results = await self._storage.write_many([self._stamp(r) for r in requests], timeout=timeout)
        refused = sum(isinstance(r, outcome.Error) and isinstance(r.error, Fenced) for r in results)
        if refused:
            FENCED_WRITES.inc(refused)
            self.fenced = True
        return results

    async def read(self, request: sm.Read[R], *, timeout: float = DEFAULT_TIMEOUT) -> R:
        return await self._storage.read(request, timeout=timeout)
