"""`RemoteDelivery`: the `Delivery` port in a cluster.

A connection on this node (`node` None or ours) goes to the PostOffice as in one
process; any other goes to its node's inbox, without waiting (actors/cluster/inbox.py:
a full queue drops it, as a full outbox would close a slow consumer). A reply to a
WebSocket request on another node is made into its `ok`/`error` frame here and
delivered like any frame; a reply to a REST caller on another node crosses as a
value and is handed to that node's PostOffice.
"""

from __future__ import annotations

from domain import metrics
from domain.errors import ParleyError
from protocol import replies, wire
from protocol.replies import Reply

from ..ports import ConnectionRef, Outgoing, ReplyTo, ToCaller, ToConnection
from ..post_office import PostOffice
from .inbox import Outbound


class RemoteDelivery:
    def __init__(self, post_office: PostOffice, outbound: Outbound, here: str) -> None:
        self.post_office = post_office
        self.outbound = outbound
        self.here = here

    def _local(self, node: str | None) -> bool:
        return node is None or node == self.here

    def deliver(self, conn: ConnectionRef, item: Outgoing) -> None:
        if self._local(conn.node):
            self.post_office.deliver(conn, item)
        else:
            assert conn.node is not None
            self.outbound.deliver_nowait(conn.node, conn.id, item)

    def last_alive(self, conn: ConnectionRef) -> int | None:
        return self.post_office.last_alive(conn) if self._local(conn.node) else None

    def reply(self, to: ReplyTo, result: Reply | ParleyError) -> None:
        match to:
            case ToConnection(conn=conn, ref=ref) if not self._local(conn.node):
                if isinstance(result, ParleyError):
                    metrics.ERRORS.labels(result.code).inc()
                    self.deliver(conn, wire.error(ref, result.code, result.message, **result.extra))
                elif ref is not None:
                    self.deliver(conn, replies.ok_frame(ref, result))
            case ToCaller(node=node) if not self._local(node):
                assert node is not None
                self.outbound.reply_nowait(node, to, result)
            case _:
                self.post_office.reply(to, result)
