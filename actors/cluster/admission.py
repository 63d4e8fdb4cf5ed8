"""Connections per user, counted cluster-wide (PRODUCT.md section 8 holds in a cluster too).

Each user has a Redis hash `parley:conns:{user}`: node → that node's open
connections of the user. Admitting one is a Lua script that sums the hash and
adds one for this node only if the total is below the limit, so two nodes
admitting at once cannot both pass the last slot. Closing subtracts it again.
The script counts only nodes whose lease is alive and deletes the others' counts
as it goes: a node that died took its connections with it.

The local count in the PostOffice stays as it was; this one comes first. If
Redis cannot answer, the connection is admitted on the local count alone (and
logged): a Redis outage loosens the cluster-wide limit for its duration, it does
not lock users out. A Redis restart forgets the counts: until those connections
close and reopen, the limit counts only the newer ones.
"""

from __future__ import annotations

import logging

import coredis
import trio

from .lease import NODE_KEY

log = logging.getLogger("parley.cluster")

CONNS = "parley:conns:"
TIMEOUT = 2.0  # seconds: then the local count decides

_ADMIT = """
local counts = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #counts, 2 do
  if counts[i] == ARGV[1] or redis.call('EXISTS', ARGV[3] .. counts[i]) == 1 then
    total = total + tonumber(counts[i + 1])
  else
    redis.call('HDEL', KEYS[1], counts[i])
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""
_LEAVE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""


class ClusterAdmission:
    def __init__(self, redis: coredis.Redis[bytes], node: str, max_per_user: int) -> None:
        self.redis = redis
        self.node = node
        self.max_per_user = max_per_user

    async def admit(self, user: str) -> bool:
        """Count one more connection of `user` here; False when the cluster has the most allowed."""
        with trio.move_on_after(TIMEOUT):
            try:
                return bool(await self.redis.eval(
                    _ADMIT, keys=[CONNS + user], args=[self.node, self.max_per_user, NODE_KEY],
                ))
            except (coredis.exceptions.RedisError, OSError) as exc:
                log.warning("connection limit: Redis did not answer (%s); counting this node only", exc)
                return True
        log.warning("connection limit: Redis did not answer in time; counting this node only")
        return True

    async def leave(self, user: str) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT):
            try:
                await self.redis.eval(_LEAVE, keys=[CONNS + user], args=[self.node])
            except (coredis.exceptions.RedisError, OSError) as exc:
                log.warning("connection limit: a close was not counted: %s", exc)
