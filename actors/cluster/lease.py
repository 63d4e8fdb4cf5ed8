"""This node's lease in Redis, and which nodes are alive.

A node is alive while its key `parley:node:{id}` exists: set with `PX ttl` at
start (refused if a live node already uses the id) and renewed every `ttl/3`.
The node trusts its own lease only until `sent + ttl * TRUST` of the last renewal
that Redis confirmed (`sent`: when the request left, so Redis's own expiry is
later still): past that, `valid` is False, session writes are refused before
they reach storage, claims are refused and /readyz is 503, *before* the key can
have expired and another node taken over. The renewal keeps trying; if the key
was gone meanwhile it is set again (the sessions taken over meanwhile are fenced
by their epoch, whatever this node thinks).

Every node is also listed in the set `parley:nodes`, which the sweeper reads to
find the nodes whose key has expired.
"""

from __future__ import annotations

import logging
import math
import secrets

import coredis
import trio

from . import metrics

log = logging.getLogger("parley.cluster")

NODE_KEY = "parley:node:"
NODES = "parley:nodes"
TRUST = 0.8  # of the ttl, counted from when the confirmed renewal was sent

_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) redis.call('SADD', KEYS[2], ARGV[3]) return 2 end
return 0
"""


class LeaseTaken(Exception):
    """Another live process holds this node id."""


def node_key(node: str) -> str:
    return NODE_KEY + node


class NodeLease:
    def __init__(self, redis: coredis.Redis[bytes], node: str, ttl: float) -> None:
        self.redis = redis
        self.node = node
        self.ttl = ttl
        self._token = secrets.token_hex(8)
        self._valid_until = -math.inf
        self._lapsed = False  # what the log last said
        self._failing = False

    @property
    def valid(self) -> bool:
        return trio.current_time() < self._valid_until

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def acquire(self) -> None:
        sent = trio.current_time()
        if not await self.redis.set(node_key(self.node), self._token, px=self.ttl_ms,
                                    condition=coredis.PureToken.NX):
            raise LeaseTaken(f"node id {self.node!r} is in use by a live node")
        self._valid_until = sent + self.ttl * TRUST
        await self.redis.sadd(NODES, [self.node])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every ttl/3 until cancelled."""
        task_status.started()
        interval = self.ttl / 3
        while True:
            await trio.sleep(interval)
            sent = trio.current_time()
            answer = None
            with trio.move_on_after(interval):
                try:
                    answer = await self.redis.eval(
                        _RENEW, keys=[node_key(self.node), NODES], args=[self._token, self.ttl_ms, self.node]
                    )
                    self._failing = False
                except (coredis.exceptions.RedisError, OSError) as exc:
                    if not self._failing:
                        log.warning("node %s: lease renewal failed (retrying every %.2fs): %s",
                                    self.node, interval, exc)
                    self._failing = True
            if answer == 0:
                raise LeaseTaken(f"node id {self.node!r} was taken by another process")
            if answer in (1, 2):
                self._valid_until = max(self._valid_until, sent + self.ttl * TRUST)
                if answer == 2:
                    log.warning("node %s: lease had expired; set again", self.node)
            if not self.valid and not self._lapsed:
                metrics.LEASE_LOST.inc()
                log.error("node %s: lease not renewed in time: refusing session writes until it is", self.node)
            elif self.valid and self._lapsed:
                log.warning("node %s: lease renewed again", self.node)
            self._lapsed = not self.valid

    async def release(self) -> None:
        """Graceful shutdown: others may take over at once."""
        await self.redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end "
            "redis.call('SREM', KEYS[2], ARGV[2]) return 1",
            keys=[node_key(self.node), NODES], args=[self._token, self.node],
        )
        self._valid_until = -math.inf

    async def live_nodes(self) -> tuple[set[str], set[str]]:
        """(alive, dead) among the nodes listed in `parley:nodes`."""
        listed = sorted(n.decode() for n in await self.redis.smembers(NODES))
        if not listed:
            return set(), set()
        async with self.redis.pipeline(transaction=False) as pipe:
            checks = [pipe.exists([node_key(n)]) for n in listed]
        alive = {n for n, check in zip(listed, checks) if await check}
        return alive, set(listed) - alive

    async def forget(self, node: str) -> None:
        await self.redis.srem(NODES, [node])
