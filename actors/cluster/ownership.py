"""Who owns a session: a compare-and-set in Redis, then the epoch bump in PostgreSQL.

`parley:owner:{session}` names the owning node. A node may claim a session when
the key is unset, names itself, or names a node whose lease has expired; the Lua
script checks that and sets it atomically, so of two nodes racing, one wins.
The winner then bumps `sessions.owner_epoch` (storage `ClaimSession`), and its
session actor stamps that epoch on every write. Redis decides quickly who should
own a session; PostgreSQL decides who may write: if Redis forgot (a restart) and
two nodes both claimed, the later epoch wins and the earlier owner is fenced on
its next write.

A session stays owned by the node that claimed it while its actor comes and goes
(an idle session's actor retires; the next message starts one there again, with
a new epoch), until the session is over, the node is fenced out, or it shuts down
(`release_all`). Giving one up is queued to one task (`RELEASE_QUEUE`; full →
dropped: the key then lives until this node's lease does, harmless): `owner_node`
is cleared in PostgreSQL and the Redis key deleted if still ours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import coredis
import trio

from domain.errors import Fenced, NotFound, ParleyError
from domain.timeline import TAKEN_OVER, TimelineEntry
from storage import messages as sm
from storage.actor import StorageHandle

from ..clock import WallClock
from . import metrics
from .lease import NODE_KEY, NodeLease, node_key

log = logging.getLogger("parley.cluster")

OWNER_KEY = "parley:owner:"
RELEASE_QUEUE = 1024

_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'nolease', ''} end
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return {'mine', cur} end
if cur and redis.call('EXISTS', ARGV[2] .. cur) == 1 then return {'taken', cur} end
redis.call('SET', KEYS[1], ARGV[1])
return {'claimed', cur or ''}
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end return 1"


def owner_key(session_id: str) -> str:
    return OWNER_KEY + session_id


class RedisOwnership:
    """The `Ownership` port of session actors (actors/session/fencing.py) in a cluster."""

    def __init__(
        self, redis: coredis.Redis[bytes], lease: NodeLease, storage: StorageHandle, clock: WallClock,
        *, on_owner: Callable[[str, str | None], None] = lambda session_id, owner: None,
    ) -> None:
        self.redis = redis
        self.lease = lease
        self.node = lease.node
        self.storage = storage
        self.clock = clock
        self.on_owner = on_owner  # the directory's hint: who owns a session, as just learned
        self.on_release: Callable[[str], None] = lambda session_id: None  # our actor of it stopped
        self.claims: dict[str, int] = {}  # session id → epoch of its last local actor: the sessions we own
        self._took_from: dict[str, str] = {}  # claimed in Redis from a dead owner, epoch not yet bumped
        self._releases_send, self._releases = trio.open_memory_channel[tuple[str, int]](RELEASE_QUEUE)

    @property
    def writable(self) -> bool:
        return self.lease.valid

    async def claim_in_redis(self, session_id: str) -> tuple[str, str | None]:
        """('claimed' | 'mine' | 'taken' | 'nolease', the owner before / the other owner)."""
        status, other = await self.redis.eval(
            _CLAIM, keys=[owner_key(session_id), node_key(self.node)], args=[self.node, NODE_KEY]
        )
        other_node = other.decode() if other else None
        if status == b"claimed" and other_node:
            self._took_from[session_id] = other_node  # for the claim that follows (a takeover)
        return status.decode(), other_node

    async def claim(self, session_id: str) -> int:
        if not self.lease.valid:
            raise Fenced("this node's lease has lapsed; try again")
        status, other = await self.claim_in_redis(session_id)
        if status == "mine":
            other = self._took_from.get(session_id, other)
            status = "claimed" if other != self.node else status
        if status == "taken":
            self._took_from.pop(session_id, None)
            self.claims.pop(session_id, None)
            metrics.OWNED.set(len(self.claims))
            self.on_owner(session_id, other)
            raise Fenced(f"the session is owned by node {other}; try again")
        if status == "nolease":
            raise Fenced("this node's lease has lapsed; try again")
        try:
            epoch = await self.storage.write(sm.ClaimSession(session_id=session_id, node=self.node))
        except NotFound:
            self._took_from.pop(session_id, None)
            await self.redis.eval(_RELEASE, keys=[owner_key(session_id)], args=[self.node])
            raise
        self.claims[session_id] = epoch
        metrics.OWNED.set(len(self.claims))
        self.on_owner(session_id, self.node)
        if status == "claimed" and other and other != self.node:
            metrics.TAKEOVERS.inc()
            log.warning("node %s took over session %s from node %s (epoch %d)", self.node, session_id, other, epoch)
            await self.storage.write(sm.AppendTimeline(entries=(TimelineEntry(
                session_id=session_id, at=self.clock.now_ms(), kind=TAKEN_OVER, actor="server",
                detail={"from": other, "to": self.node, "epoch": epoch},
            ),), epoch=epoch))
        # Forgotten only now: a claim whose epoch bump or takeover entry failed is retried
        # (the next message, the sweeper) and must still record whom it took the session from.
        self._took_from.pop(session_id, None)
        return epoch

    def stopped(self, session_id: str, epoch: int, *, fenced: bool, finished: bool) -> None:
        if self.claims.get(session_id) != epoch or not (fenced or finished):
            return  # a newer local actor holds it, or it stays ours (idle)
        del self.claims[session_id]
        metrics.OWNED.set(len(self.claims))
        if fenced:
            self.on_release(session_id)  # our connections join it at its new owner
            return
        self._queue_release(session_id, epoch)

    def _queue_release(self, session_id: str, epoch: int) -> None:
        try:
            self._releases_send.send_nowait((session_id, epoch))
        except trio.ClosedResourceError:
            pass  # shutting down: the lease goes next, which frees it all the same
        except trio.WouldBlock:
            log.warning("session %s: release dropped (queue full); it stays ours until the lease ends", session_id)

    def close(self) -> None:
        """No more releases (shutdown): `run` ends once the queued ones are done."""
        self._releases_send.close()

    async def release_all(self) -> None:
        """Graceful shutdown: give up every session we own, so others take them over at once."""
        for session_id, epoch in list(self.claims.items()):
            del self.claims[session_id]
            await self._release(session_id, epoch)
        metrics.OWNED.set(0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for session_id, epoch in self._releases:
            if session_id not in self.claims:  # else claimed again meanwhile
                await self._release(session_id, epoch)

    async def _release(self, session_id: str, epoch: int) -> None:
        try:
            await self.storage.write(sm.ReleaseSession(session_id=session_id, owner_epoch=epoch))
            if session_id not in self.claims:
                await self.redis.eval(_RELEASE, keys=[owner_key(session_id)], args=[self.node])
        except (ParleyError, trio.TooSlowError, coredis.exceptions.RedisError, OSError) as exc:
            log.warning("session %s: release failed: %s", session_id, exc)

    async def restore(self, session_id: str, owner: str) -> None:
        """Tell Redis again who owns a session (it forgot), unless it knows by now."""
        await self.redis.set(owner_key(session_id), owner, condition=coredis.PureToken.NX)

    async def owner_of(self, session_id: str) -> str | None:
        owner = await self.redis.get(owner_key(session_id))
        return owner.decode() if owner else None
