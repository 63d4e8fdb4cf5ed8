"""The sweeper: one per node, every `ttl * SWEEP_FRACTION` seconds.

1. Reads which nodes are alive (their lease key exists). A node seen alive before
   and gone now has died: its inbox is deleted, every session owned here drops the
   members connected through it at their last reported alive instant
   (`MembersLost`), and the directory joins this node's own connections again at
   the new owner of any session the dead node owned.
2. Takes over: every active session (PostgreSQL, the durable truth) whose owner
   is not alive — dead, or nobody after a graceful release — is claimed in Redis;
   the winner of that compare-and-set starts its actor, which bumps the epoch and
   resumes from the last checkpoint (billing starts again once both are back).

So a session is taken over at most `ttl` (the dead lease running out) plus one
sweep interval plus one claim after its owner died; docs/cluster.md has the bound.
"""

from __future__ import annotations

import logging

import coredis
import trio

from domain.errors import ParleyError
from storage import messages as sm
from storage.actor import StorageHandle

from ..session import MembersLost
from ..supervise import SupervisorHandle
from .directory import ClusterDirectory
from .inbox import inbox_key
from .lease import NodeLease
from .ownership import RedisOwnership

log = logging.getLogger("parley.cluster")

SWEEP_FRACTION = 0.25
FORGET_AFTER = 60.0  # seconds a dead node stays listed (so every node sees it die)


class Sweeper:
    def __init__(
        self, *, lease: NodeLease, ownership: RedisOwnership, directory: ClusterDirectory,
        supervisor: SupervisorHandle, storage: StorageHandle,
    ) -> None:
        self.lease = lease
        self.here = lease.node
        self.ownership = ownership
        self.directory = directory
        self.supervisor = supervisor
        self.storage = storage
        self._known_alive: set[str] = set()
        self._dead_since: dict[str, float] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.sweep()
            except (coredis.exceptions.RedisError, OSError, ParleyError, trio.TooSlowError) as exc:
                log.warning("node %s: sweep failed: %s", self.here, exc)
            await trio.sleep(self.lease.ttl * SWEEP_FRACTION)

    async def sweep(self) -> None:
        alive, dead = await self.lease.live_nodes()
        if self.lease.valid:
            alive.add(self.here)
        self.directory.alive = alive
        died = self._known_alive - alive
        self._known_alive = alive
        if died:
            await self._died(died)
        now = trio.current_time()
        for node in dead:
            if now - self._dead_since.setdefault(node, now) > FORGET_AFTER:
                await self.lease.forget(node)
                del self._dead_since[node]
        if self.lease.valid:
            await self._take_over(alive)

    async def _died(self, died: set[str]) -> None:
        log.warning("node %s: lease of %s expired", self.here, ", ".join(sorted(died)))
        await self.lease.redis.delete([inbox_key(node) for node in died])
        self.directory.nodes_died(died)
        for handle in self.directory.live_local():
            for node in died:
                handle.send_nowait(MembersLost(node=node))

    async def _take_over(self, alive: set[str]) -> None:
        for session_id, owner in await self.storage.read(sm.ListActiveOwners()):
            if session_id in self.ownership.claims or (owner in alive and owner != self.here):
                continue
            status, _ = await self.ownership.claim_in_redis(session_id)
            if status in ("claimed", "mine"):
                await self.directory.local_handle(session_id)  # its actor claims the epoch and loads
