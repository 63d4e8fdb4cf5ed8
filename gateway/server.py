"""The process: builds the actor tree in order and takes it down in reverse.

Start: storage (migrations, reconcile after a restart) → webhook delivery →
billing clock → supervisor (restarts the active sessions) → listener. Stop, on `shutdown.set()`:
  1. stop accepting;
  2. tell every WebSocket the server is going away (close 1001; the heartbeat
     wheel knows every running connection): each connection leaves its
     sessions, which stops billing at that instant;
  3. let every session handle those leaves and checkpoint billing (Flush), then stop
     the sessions and the billing clock;
  4. stop webhook delivery (what is under way stays pending in the outbox);
  5. close storage's channel: it commits what is queued and closes SQLite last.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import trio

from actors.billing_clock import BillingClock
from actors.clock import WallClock
from actors.cluster.node import Node, run_node
from actors.connection import ConnectionContext
from actors.heartbeat import HeartbeatWheel
from actors.post_office import PostOffice
from actors.session import SessionContext
from actors.supervise import Supervisor, SupervisorHandle
from actors.webhooks import WebhookActor, WebhookHandle
from domain.settings import Settings
from storage import backend_for
from storage.actor import Backend, StorageActor, StorageHandle

from .app import create_app
from .auth import TokenVerifier, load_or_create_secret, mint_token
from .listener import Listener, bound_port

log = logging.getLogger("parley.server")

SESSION_FLUSH_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """What `serve` hands back once it listens."""

    port: int
    storage: StorageHandle
    supervisor: SupervisorHandle
    post_office: PostOffice
    context: ConnectionContext
    secret: str
    webhooks: WebhookHandle
    node_id: str | None = None  # cluster mode: this node's id


async def serve(
    settings: Settings,
    *,
    shutdown: trio.Event,
    backend: Backend | None = None,
    clock: WallClock | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run Parley until `shutdown` is set, then stop in order and return."""
    clock = clock or WallClock()
    secret = load_or_create_secret(settings.data_dir, settings.secret)
    backend = backend or backend_for(settings)
    storage_actor = StorageActor(backend, max_batch=settings.storage_batch)
    async with trio.open_nursery() as storage_nursery:
        storage: StorageHandle = await storage_nursery.start(storage_actor.run)
        post_office = PostOffice(max_connections_per_user=settings.max_connections_per_user)
        # one node alone, or one node of a cluster (actors/cluster/node.py)
        node: Node = await storage_nursery.start(functools.partial(
            run_node, settings, storage=storage, post_office=post_office, clock=clock, secret=secret,
        ))
        active = node.resume
        if active:
            log.info("resuming %d active sessions", len(active))
        webhooks: WebhookHandle = await storage_nursery.start(WebhookActor(
            storage, clock, commits=getattr(backend, "webhook_commits", None),
            allow_private=settings.dev or settings.allow_private_webhooks,
        ).run)
        async with trio.open_nursery() as session_nursery:
            # one billing clock wakes every session of this process; it stops with them
            billing_clock: BillingClock = await session_nursery.start(BillingClock(storage).run)
            supervisor = Supervisor(
                SessionContext(storage=storage, settings=settings, clock=clock, delivery=node.delivery,
                               ownership=node.ownership, billing_clock=billing_clock),
                calls=post_office,
            )
            supervisor_handle = await session_nursery.start(functools.partial(supervisor.run, resume=active))
            directory = await node.attach(supervisor_handle)
            heartbeat = HeartbeatWheel(settings.heartbeat)  # every connection's liveness, one task
            await session_nursery.start(heartbeat.run)
            context = ConnectionContext(
                settings=settings, storage=node.storage, directory=directory, post_office=post_office, clock=clock,
                authenticate=TokenVerifier(secret), shutting_down=trio.Event(), heartbeat=heartbeat,
                admission=node.admission,
            )
            app = create_app(context, mint=functools.partial(mint_token, secret))
            listener = Listener(app=app, context=context)
            listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
            port = bound_port(listeners)
            async with trio.open_nursery() as edge_nursery:
                accepting = await edge_nursery.start(
                    functools.partial(listener.serve, listeners, handler_nursery=edge_nursery)
                )
                log.info("listening on http://%s:%d", settings.host, port)
                task_status.started(Running(
                    port=port, storage=storage, supervisor=supervisor_handle, post_office=post_office,
                    context=context, secret=secret, webhooks=webhooks, node_id=node.node_id,
                ))
                await shutdown.wait()
                log.info("shutting down: closing connections")
                accepting.cancel()
                for sock_listener in listeners:
                    await sock_listener.aclose()
                context.shutting_down.set()
                heartbeat.shut_down()  # every running connection closes 1001 and leaves its sessions
                edge_nursery.cancel_scope.deadline = trio.current_time() + settings.shutdown_grace
            log.info("checkpointing sessions")
            await supervisor_handle.flush_sessions(SESSION_FLUSH_TIMEOUT)
            session_nursery.cancel_scope.cancel()
        webhooks.stop()  # after the sessions: what they committed last stays in the outbox
        log.info("flushing storage")
        await node.stop()
        await storage.aclose()
    log.info("stopped")
