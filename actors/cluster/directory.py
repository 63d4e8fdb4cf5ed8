"""The cluster `SessionDirectory`: every message goes to the session's owning node.

A lookup hands out a `RoutedHandle`, an address rather than a mailbox: each send
asks the directory where the session lives now. Owned here (or owned by nobody,
or by a node whose lease expired) → the local supervisor, whose new actor claims
it; owned by a live node → that node's inbox. So a handle never goes stale when
ownership moves, and a connection keeps its joins across a takeover: the
directory remembers which local connection joined which session, and when the
owner dies it joins them again at the new owner (`rejoin`), which sends each its
`ChatCursor` (the offline queue fills whatever was missed) and tells the others
it is back (`presence`), so billing resumes once payer and provider are both in.

Messages arriving from other nodes (`arrive`) are handed to local actors without
waiting: a full mailbox answers the request with an error its client retries.
A message for a session that moved is forwarded, at most `MAX_HOPS` times.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import coredis
import trio

from domain.errors import Fenced, NotFound, ParleyError, StorageUnavailable
from storage import messages as sm
from storage.actor import StorageHandle

from ..ports import ConnectionRef
from ..post_office import PostOffice
from ..session import JoinSession, LeaveSession, SessionGone, SessionHandle, SessionMessage
from ..supervise import SupervisorHandle
from .delivery import RemoteDelivery
from .inbox import Outbound
from .lease import node_key
from .ownership import RedisOwnership

log = logging.getLogger("parley.cluster")

MAX_HOPS = 2
LOCAL_ATTEMPTS = 3
REJOIN_ATTEMPTS = 20
REJOIN_RETRY = 0.25  # seconds between attempts while a takeover settles
REJOIN_TIMEOUT = 5.0
REJOIN_QUEUE = 1024


class RoutedHandle(SessionHandle):
    """A session's address in the cluster; `send` routes at each call."""

    __slots__ = ("_directory",)

    reads_liveness: ClassVar[bool] = False  # the owner may be another node: it hears `MemberAlive`

    def __init__(self, session_id: str, directory: ClusterDirectory) -> None:
        super().__init__(session_id, None)  # type: ignore[arg-type]
        self._directory = directory

    @property
    def retired(self) -> bool:
        return False

    async def send(self, message: SessionMessage) -> None:
        await self._directory.route(self.session_id, message)

    def send_nowait(self, message: SessionMessage) -> bool:
        return self._directory.route_nowait(self.session_id, message)


class ClusterDirectory:
    def __init__(
        self, *, here: str, redis: coredis.Redis[bytes], supervisor: SupervisorHandle, ownership: RedisOwnership,
        outbound: Outbound, post_office: PostOffice, delivery: RemoteDelivery, storage: StorageHandle,
    ) -> None:
        self.here = here
        self.redis = redis
        self.supervisor = supervisor
        self.ownership = ownership
        self.outbound = outbound
        self.post_office = post_office
        self.delivery = delivery
        self.storage = storage
        self.alive: set[str] = {here}  # kept by the sweeper
        self._owners: dict[str, str] = {}  # session → owning node, as last learned (not us)
        self._local: dict[str, SessionHandle] = {}  # session → its local actor's handle
        self._members: dict[str, dict[str, ConnectionRef]] = {}  # session → user → local connection
        self._rejoin_send, self._rejoin = trio.open_memory_channel[str](REJOIN_QUEUE)
        ownership.on_owner = self.learned_owner
        ownership.on_release = self.fenced_out

    async def lookup(self, session_id: str) -> SessionHandle:
        return RoutedHandle(session_id, self)

    def learned_owner(self, session_id: str, owner: str | None) -> None:
        """Who owns a session, as just learned. If it moved away from the node our connections
        joined it at, they join it again at the new one (the old one's membership is gone)."""
        previous = self._owners.get(session_id)
        if owner is None or owner == self.here:
            self._owners.pop(session_id, None)
        else:
            self._owners[session_id] = owner
        if previous is not None and previous != owner:
            self._queue_rejoin(session_id)

    # ------------------------------------------------------------ routing

    async def owner(self, session_id: str) -> str | None:
        """The live node owning the session; None: nobody alive does (claim it here)."""
        if session_id in self.ownership.claims:
            return self.here
        owner = self._owners.get(session_id)
        if owner is None or owner not in self.alive:
            owner = await self.ownership.owner_of(session_id)
            if owner is None:
                owner = await self._owner_in_storage(session_id)
            if owner is not None and owner != self.here and not await self._is_alive(owner):
                owner = None
            self.learned_owner(session_id, owner)
        return owner

    async def _is_alive(self, node: str) -> bool:
        return node in self.alive or bool(await self.redis.exists([node_key(node)]))

    async def _owner_in_storage(self, session_id: str) -> str | None:
        """Redis forgot (a restart): PostgreSQL still names the owner. If it is alive, Redis is
        told again, so routing goes back to it instead of a second node claiming the session."""
        try:
            owner = (await self.storage.read(sm.GetSession(session_id=session_id))).owner_node
        except NotFound:
            return None
        if owner is None or owner == self.here or not await self._is_alive(owner):
            return None
        await self.ownership.restore(session_id, owner)
        return owner

    def _track(self, session_id: str, message: SessionMessage) -> None:
        match message:
            case JoinSession(conn=conn) if conn.node is None:
                self._members.setdefault(session_id, {})[conn.user] = conn
            case LeaveSession(conn=conn) if conn.node is None:
                members = self._members.get(session_id, {})
                if conn.user in members and members[conn.user].id == conn.id:
                    del members[conn.user]
                    if not members:
                        del self._members[session_id]
                        self._owners.pop(session_id, None)  # a cache: looked up again when needed

    async def route(self, session_id: str, message: SessionMessage, hops: int = 0) -> None:
        self._track(session_id, message)
        owner = await self.owner(session_id)
        if owner is None or owner == self.here:
            await self._to_local(session_id, message)
        else:
            await self.outbound.to_session(owner, session_id, message, hops)

    def live_local(self) -> list[SessionHandle]:
        """Handles of the session actors running here (forgetting those that retired)."""
        for session_id in [s for s, h in self._local.items() if h.retired]:
            del self._local[session_id]
        return list(self._local.values())

    def route_nowait(self, session_id: str, message: SessionMessage) -> bool:
        """For notices: only where the owner is known without asking Redis."""
        handle = self._local.get(session_id)
        if session_id in self.ownership.claims and handle is not None:
            return handle.send_nowait(message)
        owner = self._owners.get(session_id)
        if owner is not None and owner in self.alive:
            return self.outbound.to_session_nowait(owner, session_id, message)
        return False

    async def local_handle(self, session_id: str) -> SessionHandle:
        handle = self._local.get(session_id)
        if handle is None or handle.retired:
            handle = self._local[session_id] = await self.supervisor.lookup(session_id)
        return handle

    async def _to_local(self, session_id: str, message: SessionMessage) -> None:
        for _ in range(LOCAL_ATTEMPTS):
            handle = await self.local_handle(session_id)
            try:
                await handle.send(message)
                return
            except SessionGone:
                self._local.pop(session_id, None)
        raise StorageUnavailable("the session is restarting; try again")

    async def arrive(self, session_id: str, message: SessionMessage, hops: int) -> None:
        """A message from another node's inbox: never waits on a session's mailbox."""
        owner = await self.owner(session_id)
        if owner is not None and owner != self.here:
            if hops < MAX_HOPS:
                await self.outbound.to_session(owner, session_id, message, hops + 1)
            else:
                self._refuse(message, StorageUnavailable("the session is moving; try again"))
            return
        for _ in range(LOCAL_ATTEMPTS):
            handle = await self.local_handle(session_id)
            if handle.send_nowait(message):
                return
            if not handle.retired:
                self._refuse(message, StorageUnavailable("the session is busy; try again"))
                return
            self._local.pop(session_id, None)
        self._refuse(message, StorageUnavailable("the session is restarting; try again"))

    def _refuse(self, message: SessionMessage, error: ParleyError) -> None:
        reply = getattr(message, "reply", None)
        if reply is not None:
            self.delivery.reply(reply, error)

    # ------------------------------------------------------------ takeover

    def nodes_died(self, dead: set[str]) -> None:
        """The sweeper saw these nodes' leases expire: join our connections again elsewhere."""
        for session_id, owner in list(self._owners.items()):
            if owner in dead:
                del self._owners[session_id]
                self._queue_rejoin(session_id)

    def fenced_out(self, session_id: str) -> None:
        """Our actor of the session was fenced (a newer owner exists): our connections join it there."""
        self._local.pop(session_id, None)
        self._queue_rejoin(session_id)

    def _queue_rejoin(self, session_id: str) -> None:
        if session_id not in self._members:
            return
        try:
            self._rejoin_send.send_nowait(session_id)
        except trio.WouldBlock:
            log.warning("session %s: rejoin queue full; its clients must join again", session_id)

    async def run_rejoins(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for session_id in self._rejoin:
            for conn in list(self._members.get(session_id, {}).values()):
                await self._rejoin_one(session_id, conn)

    async def _rejoin_one(self, session_id: str, conn: ConnectionRef) -> None:
        for _ in range(REJOIN_ATTEMPTS):
            if self._members.get(session_id, {}).get(conn.user) != conn or not self.post_office.is_open(conn.id):
                return  # it left, closed or was replaced meanwhile
            with self.post_office.call() as (reply_to, answer):
                try:
                    with trio.fail_after(REJOIN_TIMEOUT):
                        await self.route(session_id, JoinSession(conn=conn, reply=reply_to))
                        (await answer.receive()).unwrap()
                    log.info("session %s: %s joined again at its new owner", session_id, conn.user)
                    return
                except (Fenced, StorageUnavailable, trio.TooSlowError):
                    pass  # the takeover is still settling
                except ParleyError as exc:  # ended meanwhile, or no longer allowed: nothing to rejoin
                    log.info("session %s: %s not joined again: %s", session_id, conn.user, exc.message)
                    return
            await trio.sleep(REJOIN_RETRY)
        log.warning("session %s: could not join %s again; the client must", session_id, conn.user)

