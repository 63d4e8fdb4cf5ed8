"""What `serve()` runs beside storage: one node alone, or one node of a cluster.

`run_node` is started in serve()'s storage nursery and hands back a `Node`: the
sessions to resume, the `Delivery` and `Ownership` for session actors, the
storage handle the edges use (its readiness includes the lease in a cluster),
`attach(supervisor)` → the `SessionDirectory`, and `stop()` (after the sessions
have stopped, before storage closes).

Alone (no PARLEY_REDIS_URL): exactly the single-process parts: reconcile after a
restart, the PostOffice, the supervisor as directory. In a cluster: the secret
is checked against the cluster's, the lease acquired, and the cross-node parts
started in the node's own nursery: lease renewal, the outbound sender, the
release queue, then (on attach) the inbox reader, the rejoins and the sweeper.
Sessions are not resumed at start: the sweeper takes over whatever nobody owns.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from domain.settings import Settings
from storage import messages as sm
from storage.actor import StorageHandle

from ..clock import WallClock
from ..connection import Admission
from ..directory import SessionDirectory
from ..ports import ConnectionRef, Delivery
from ..post_office import PostOffice
from ..session.fencing import Ownership
from ..supervise import SupervisorHandle
from .errors import ClusterRefused

log = logging.getLogger("parley.cluster")

SECRET_SETTING = "cluster.secret_sha256"
HEARTBEAT_SETTING = "cluster.heartbeat"  # members on other nodes are judged silent by it
STOP_TIMEOUT = 3.0
READY_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    node_id: str | None
    resume: tuple[str, ...]
    delivery: Delivery
    ownership: Ownership | None
    storage: StorageHandle
    attach: Callable[[SupervisorHandle], Awaitable[SessionDirectory]]
    stop: Callable[[], Awaitable[None]]
    admission: Admission | None = None


def generated_node_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


async def run_node(
    settings: Settings, *, storage: StorageHandle, post_office: PostOffice, clock: WallClock, secret: str,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    stop, stopped = trio.Event(), trio.Event()

    async def request_stop() -> None:
        stop.set()
        await stopped.wait()

    try:
        if settings.redis_url:
            await _run_cluster(settings, storage, post_office, clock, secret, stop, request_stop, task_status)
            return
        active = await storage.write(sm.ReconcileAfterRestart(now=clock.now_ms()))

        async def attach(supervisor: SupervisorHandle) -> SessionDirectory:
            return supervisor

        task_status.started(Node(
            node_id=None, resume=active, delivery=post_office, ownership=None, storage=storage, attach=attach,
            stop=request_stop,
        ))
        await stop.wait()
    finally:
        stopped.set()


class _ReadyStorage(StorageHandle):
    """The storage handle the edges use, whose readiness also needs Redis and the lease."""

    def __init__(self, inner: StorageHandle, ready: Callable[[], Awaitable[bool]]) -> None:
        self.__dict__.update(inner.__dict__)
        self._ready = ready

    async def check_ready(self, now_ms: int) -> bool:
        return await self._ready() and await super().check_ready(now_ms)


async def _run_cluster(
    settings: Settings, storage: StorageHandle, post_office: PostOffice, clock: WallClock, secret: str,
    stop: trio.Event, request_stop: Callable[[], Awaitable[None]], task_status: trio.TaskStatus[Node],
) -> None:
    import coredis

    from .admission import ClusterAdmission
    from .delivery import RemoteDelivery
    from .directory import ClusterDirectory
    from .inbox import Inbox, Outbound
    from .lease import LeaseTaken, NodeLease
    from .ownership import RedisOwnership
    from .sweeper import Sweeper

    if not settings.secret:
        raise ClusterRefused("cluster mode needs PARLEY_SECRET, the same on every node")
    digest = hashlib.sha256(settings.secret.encode()).hexdigest()
    if await storage.write(sm.AgreeSetting(key=SECRET_SETTING, value=digest)) != digest:
        raise ClusterRefused("PARLEY_SECRET differs from the one this cluster was started with")
    heartbeat = repr(float(settings.heartbeat))
    agreed = await storage.write(sm.AgreeSetting(key=HEARTBEAT_SETTING, value=heartbeat))
    if agreed != heartbeat:
        raise ClusterRefused(f"--heartbeat {heartbeat} differs from the cluster's {agreed} (every node must use the"
                             " same; to change it, stop every node and delete the meta row 'cluster.heartbeat')")
    node_id = settings.node_id or generated_node_id()
    redis: coredis.Redis[bytes] = coredis.Redis.from_url(settings.redis_url, connect_timeout=5)
    async with redis:
        lease = NodeLease(redis, node_id, settings.lease_ttl)
        try:
            await lease.acquire()
        except LeaseTaken as exc:
            raise ClusterRefused(str(exc)) from None
        except (coredis.exceptions.RedisError, OSError) as exc:
            raise ClusterRefused(f"cannot reach Redis: {exc}") from None
        log.info("cluster node %s: lease held (ttl %ss)", node_id, settings.lease_ttl)
        outbound = Outbound(redis, node_id)
        delivery = RemoteDelivery(post_office, outbound, node_id)
        ownership = RedisOwnership(redis, lease, storage, clock)
        admission = ClusterAdmission(redis, node_id, settings.max_connections_per_user)

        async def ready() -> bool:
            if not lease.valid:
                return False
            with trio.move_on_after(READY_TIMEOUT):
                try:
                    await redis.ping()
                    return True
                except (coredis.exceptions.RedisError, OSError):
                    return False
            return False

        async with trio.open_nursery() as nursery:
            await nursery.start(lease.run)
            await nursery.start(outbound.run)
            releases_done = trio.Event()

            async def releases() -> None:
                try:
                    await ownership.run()
                finally:
                    releases_done.set()

            nursery.start_soon(releases)

            async def attach(supervisor: SupervisorHandle) -> SessionDirectory:
                directory = ClusterDirectory(
                    here=node_id, redis=redis, supervisor=supervisor, ownership=ownership, outbound=outbound,
                    post_office=post_office, delivery=delivery, storage=storage,
                )

                async def on_envelope(envelope: list[Any]) -> None:
                    await _arrived(envelope, directory, post_office)

                await nursery.start(Inbox(redis, node_id, on_envelope).run)
                await nursery.start(directory.run_rejoins)
                await nursery.start(Sweeper(
                    lease=lease, ownership=ownership, directory=directory, supervisor=supervisor, storage=storage,
                ).run)
                return directory

            task_status.started(Node(
                node_id=node_id, resume=(), delivery=delivery, ownership=ownership,
                storage=_ReadyStorage(storage, ready), attach=attach, stop=request_stop, admission=admission,
            ))
            await stop.wait()
            # the sessions have stopped: their releases go out, then the lease (others take over at once)
            with trio.move_on_after(STOP_TIMEOUT):
                ownership.close()
                await releases_done.wait()
                await ownership.release_all()
                await lease.release()
            nursery.cancel_scope.cancel()
    log.info("cluster node %s: left the cluster", node_id)


async def _arrived(envelope: list[Any], directory: Any, post_office: PostOffice) -> None:
    """One message from another node. One that does not decode (a node of another version)
    is logged and dropped: it must not take this node's inbox down with it."""
    from . import codec

    try:
        decoded = [envelope[0], *(codec.from_plain(part) for part in envelope[1:])]
    except (KeyError, TypeError, ValueError) as exc:
        log.error("inbox: dropped a message that does not decode (%s: %s)", type(exc).__name__, exc)
        return
    match decoded[0]:
        case "d":  # ["d", [conn ids], item]
            for conn_id in decoded[1]:
                post_office.deliver(ConnectionRef(id=conn_id, user=""), decoded[2])
        case "r":  # ["r", reply-to, result]
            post_office.reply(decoded[1], decoded[2])
        case "s":  # ["s", session id, hops, message]
            await directory.arrive(decoded[1], decoded[3], decoded[2])
        case _:
            log.warning("inbox: dropped unknown envelope %r", envelope[0])
