"""Nodes reach each other through one Redis stream per node, `parley:inbox:{node}`.

`Outbound` is the sending side: a bounded queue (`OUTBOUND_QUEUE`) that one task
drains, taking everything waiting (at most `BATCH`), and sends as one pipeline
with one `XADD` per destination node, each carrying that node's batch. An item
going to several connections of one node crosses once. Requests from connections
*await* room (TCP pushes back on the client, as with a local mailbox); deliveries
and notices are sent without waiting, and a full queue drops them (counted):
chat comes back by `seq` from storage, signaling is redone by the client.

`Inbox` is the reading side: the one `XREAD` loop of this node, handing each
envelope to `handle` without awaiting anybody's mailbox. Streams are capped
(`MAXLEN ~ STREAM_MAXLEN`); a fresh node starts on an empty inbox.

What Redis may lose here (a restart, a failover) is only latency: a lost request
times out for its client, who retries; a lost chat delivery is filled from storage
by the receiving connection; nothing acknowledged lives only in a stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import coredis
import orjson
import trio

from . import codec, metrics

log = logging.getLogger("parley.cluster")

INBOX_KEY = "parley:inbox:"
OUTBOUND_QUEUE = 4096
BATCH = 512
STREAM_MAXLEN = 100_000
READ_BLOCK_MS = 1000
READ_COUNT = 256
RETRY = 0.5  # seconds before a failed XADD / XREAD is tried again


def inbox_key(node: str) -> str:
    return INBOX_KEY + node


@dataclass(frozen=True, slots=True)
class _Out:
    node: str
    kind: str  # s: to a session · d: deliver to connections · r: a reply
    body: Any  # for "d": (conn id, item); else the envelope's JSON-able payload


class Outbound:
    def __init__(self, redis: coredis.Redis[bytes], here: str) -> None:
        self.redis = redis
        self.here = here
        self._send, self._receive = trio.open_memory_channel[_Out](OUTBOUND_QUEUE)

    async def to_session(self, node: str, session_id: str, message: Any, hops: int = 0) -> None:
        await self._send.send(_Out(node, "s", [session_id, hops, codec.to_plain(message, self.here)]))

    def to_session_nowait(self, node: str, session_id: str, message: Any) -> bool:
        return self._put(_Out(node, "s", [session_id, 0, codec.to_plain(message, self.here)]))

    def deliver_nowait(self, node: str, conn_id: str, item: Any) -> bool:
        return self._put(_Out(node, "d", (conn_id, item)))

    def reply_nowait(self, node: str, to: Any, result: Any) -> bool:
        return self._put(_Out(node, "r", [codec.to_plain(to, self.here), codec.to_plain(result, self.here)]))

    def _put(self, out: _Out) -> bool:
        try:
            self._send.send_nowait(out)
        except trio.WouldBlock:
            metrics.DROPPED.inc()
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._send_batch(batch)

    async def _send_batch(self, batch: list[_Out]) -> None:
        per_node: dict[str, list[Any]] = {}
        shared: dict[tuple[str, int], list[Any]] = {}  # (node, id(item)) → its "d" envelope
        for out in batch:
            envelopes = per_node.setdefault(out.node, [])
            if out.kind == "d":
                conn_id, item = out.body
                envelope = shared.get((out.node, id(item)))
                if envelope is None:
                    envelope = ["d", [conn_id], codec.to_plain(item)]
                    shared[(out.node, id(item))] = envelope
                    envelopes.append(envelope)
                else:
                    envelope[1].append(conn_id)
            else:
                envelopes.append([out.kind, *out.body])
            metrics.FORWARDED.labels(out.kind).inc()
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for node, envelopes in per_node.items():
                        pipe.xadd(
                            inbox_key(node), {"b": orjson.dumps(envelopes)},
                            trim_strategy=coredis.PureToken.MAXLEN, threshold=STREAM_MAXLEN,
                            trim_operator=coredis.PureToken.APPROXIMATELY,
                        )
                return
            except (coredis.exceptions.RedisError, OSError) as exc:
                log.warning("cross-node send failed, retrying: %s", exc)
                await trio.sleep(RETRY)


class Inbox:
    """This node's one reader. `handle(kind, payload)` must not block on other actors."""

    def __init__(self, redis: coredis.Redis[bytes], here: str, handle: Callable[[list[Any]], Awaitable[None]]) -> None:
        self.redis = redis
        self.key = inbox_key(here)
        self.handle = handle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.redis.delete([self.key])  # a new incarnation owes nothing to an old one
        last = b"0-0"
        task_status.started()
        while True:
            try:
                found = await self.redis.xread({self.key: last}, count=READ_COUNT, block=READ_BLOCK_MS)
            except (coredis.exceptions.RedisError, OSError) as exc:
                log.warning("inbox read failed, retrying: %s", exc)
                await trio.sleep(RETRY)
                continue
            for entry in (found or {}).get(self.key.encode(), ()):
                last = entry.identifier
                for envelope in orjson.loads(entry.field_values[b"b"]):
                    metrics.RECEIVED.labels(envelope[0]).inc()
                    await self.handle(envelope)
