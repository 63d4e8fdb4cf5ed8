"""The webhook delivery actor: sends the outbox (PRODUCT.md section 11).

One loop owns what is in flight; delivery tasks report back to it by message. It looks
at storage for due deliveries — woken right after a commit that wrote some (the outbox's
`CommitSignal`), after each delivery it finished, and at the earliest retry instant, or
every `POLL_INTERVAL` otherwise — and starts one task per delivery it has room for: at most `MAX_IN_FLIGHT` in all and
`PER_ENDPOINT_IN_FLIGHT` per endpoint, so a slow endpoint fills only its own slots and
never delays another. It never waits on a delivery task. Storage hands out only the
oldest pending delivery of each (endpoint, session), so one session's events go out in
order and a failing one holds back only the events of its own session.

A delivery task POSTs the event, signed per Standard Webhooks (`webhook-id` is the
event's id, the same on every retry), under a `REQUEST_TIMEOUT_S` deadline on Trio's
clock, and records the outcome: 2xx delivered; 410 failed and the endpoint disabled;
anything else, a timeout or a network error: due again after an exponential backoff
with jitter (domain/webhooks.py), until 24 h have passed since the event, then failed.
A crash (or SIGKILL) mid-delivery leaves it pending: it is sent again, same `webhook-id`.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from domain import metrics
from domain import webhooks as wh
from domain.errors import StorageUnavailable, Unprocessable
from storage import webhook_messages as w
from storage.actor import StorageHandle

from .clock import WallClock

log = logging.getLogger("parley.webhooks")

DUE_BATCH = 256  # deliveries read per look
MAX_IN_FLIGHT = 64  # POSTs under way in all
PER_ENDPOINT_IN_FLIGHT = 4  # POSTs under way per endpoint
POLL_INTERVAL = 5.0  # seconds between looks when nothing woke the loop
WAKE_BUFFER = MAX_IN_FLIGHT + 1  # every task's one `_Done`, plus one coalesced wake-up
STORAGE_RETRY = 1.0  # seconds before looking again after storage failed
# a claimed delivery is not due again for this long: the POST's deadline, then room to
# record its outcome; a sender that died meanwhile leaves it to be sent again after it
CLAIM_MS = round((wh.REQUEST_TIMEOUT_S + 2) * 1000)
RESPONSE_BODY_BYTES = 64 * 1024  # read (and ignored) from a response, at most
ERROR_CHARS = 500  # of an error kept in the delivery log
USER_AGENT = "Parley-Webhooks/0.1"


async def check_url(url: str, *, allow_private: bool) -> None:
    """Unprocessable unless `url` is http(s) with a host whose every address is public
    (resolved with Trio's getaddrinfo), or `allow_private` is on."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise Unprocessable(f"url: not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise Unprocessable("url: must be an http:// or https:// URL with a host")
    if allow_private:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = await trio.socket.getaddrinfo(parsed.host, port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise Unprocessable(f"url: cannot resolve {parsed.host}: {exc}") from None
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if not wh.address_allowed(address):
            raise Unprocessable(
                f"url: {parsed.host} resolves to {address}, a loopback, private, link-local or metadata address"
                " (allowed only with --allow-private-webhooks or in development mode)"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outcome:
    http_status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _Done:
    """A delivery task finished (whatever its outcome): its slots are free again."""

    delivery_id: int
    endpoint_id: str


class WebhookHandle:
    """What the server holds: wake the loop, stop the actor."""

    def __init__(self, scope: trio.CancelScope, wake: Callable[[], None]) -> None:
        self._scope = scope
        self.wake = wake

    def stop(self) -> None:
        """Cancel: deliveries under way stay pending and go out again after a restart."""
        self._scope.cancel()


class WebhookActor:
    def __init__(
        self,
        storage: StorageHandle,
        clock: WallClock,
        *,
        commits: object | None = None,  # storage's CommitSignal (storage/webhooks_sql.py)
        allow_private: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.commits = commits
        self.allow_private = allow_private
        self.transport = transport
        self.rng = rng or random.Random()
        self.poll_interval = poll_interval
        # the loop's own: a delivery leaves them only when the loop reads its `_Done`, so a
        # look that read a row while its delivery was finishing still finds it in flight
        self._in_flight: set[int] = set()
        self._per_endpoint: collections.Counter[str] = collections.Counter()
        self._wake_send: trio.MemorySendChannel[_Done | None] | None = None

    def _wake(self) -> None:
        """Look again soon (after a commit that wrote deliveries). Coalesced: anything queued
        already wakes the loop, and the buffer's room is kept for the tasks' `_Done`s."""
        send = self._wake_send
        if send is not None and send.statistics().current_buffer_used == 0:
            try:
                send.send_nowait(None)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    def _settle(self, message: _Done | None) -> None:
        if message is not None:
            self._in_flight.discard(message.delivery_id)
            self._per_endpoint[message.endpoint_id] -= 1
            if not self._per_endpoint[message.endpoint_id]:
                del self._per_endpoint[message.endpoint_id]

    async def run(self, *, task_status: trio.TaskStatus[WebhookHandle] = trio.TASK_STATUS_IGNORED) -> None:
        send, wakeups = trio.open_memory_channel[_Done | None](WAKE_BUFFER)
        self._wake_send = send
        subscribe = getattr(self.commits, "subscribe", None)
        unsubscribe = subscribe(self._wake) if subscribe else None
        try:
            with trio.CancelScope() as scope:
                async with (
                    httpx.AsyncClient(
                        transport=self.transport, timeout=wh.REQUEST_TIMEOUT_S, follow_redirects=False,
                        limits=httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT),
                        trust_env=False,
                    ) as client,
                    trio.open_nursery() as nursery,
                ):
                    task_status.started(WebhookHandle(scope, self._wake))
                    while True:
                        wait = await self._look(client, nursery)
                        with trio.move_on_after(wait):
                            self._settle(await wakeups.receive())
                        while True:  # and whatever else came meanwhile, without waiting
                            try:
                                self._settle(wakeups.receive_nowait())
                            except trio.WouldBlock:
                                break
        finally:
            if unsubscribe is not None:
                unsubscribe()
            self._wake_send = None

    async def _look(self, client: httpx.AsyncClient, nursery: trio.Nursery) -> float:
        """Start what is due and has room; return how long the loop may sleep."""
        now_ms = self.clock.now_ms()
        try:
            batch = await self.storage.read(w.DueDeliveries(
                now=now_ms, limit=DUE_BATCH, per_endpoint=2 * PER_ENDPOINT_IN_FLIGHT,
            ), timeout=30)
        except (StorageUnavailable, trio.TooSlowError) as exc:
            log.error("webhooks: cannot read due deliveries: %s", exc)
            return STORAGE_RETRY
        oldest = batch.oldest_pending_at
        metrics.WEBHOOKS_OLDEST_PENDING.set(0 if oldest is None else max(0, now_ms - oldest) / 1000)
        for delivery in batch.due:
            if delivery.id in self._in_flight:
                continue  # under way, or finished while this read ran (the row may be stale)
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                break
            if self._per_endpoint[delivery.endpoint_id] >= PER_ENDPOINT_IN_FLIGHT:
                continue
            self._in_flight.add(delivery.id)
            self._per_endpoint[delivery.endpoint_id] += 1
            nursery.start_soon(self._deliver, client, delivery, name=f"webhook:{delivery.id}")
        wait = self.poll_interval
        if batch.next_attempt_at is not None:
            wait = min(wait, max(0, batch.next_attempt_at - now_ms) / 1000)
        return wait

    async def _deliver(self, client: httpx.AsyncClient, delivery: wh.DueDelivery) -> None:
        try:
            if not await self._claim(delivery):
                return  # another node (or an earlier look of ours) is sending it
            outcome = await self._post(client, delivery)
            await self._record(delivery, outcome)
        finally:
            if self._wake_send is not None:  # room is kept for it: see WAKE_BUFFER
                self._wake_send.send_nowait(_Done(delivery.id, delivery.endpoint_id))

    async def _claim(self, delivery: wh.DueDelivery) -> bool:
        until = self.clock.now_ms() + CLAIM_MS
        try:
            return await self.storage.write(w.ClaimDelivery(
                delivery_id=delivery.id, due_at=delivery.due_at, until=until,
            ))
        except (StorageUnavailable, trio.TooSlowError) as exc:
            log.error("webhooks: delivery %d: cannot claim it: %s", delivery.id, exc)
            return False

    async def _post(self, client: httpx.AsyncClient, delivery: wh.DueDelivery) -> _Outcome:
        timestamp = self.clock.now_ms() // 1000
        headers = {
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": wh.signature_header(delivery.secrets, delivery.event_id, timestamp, delivery.body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        with trio.move_on_after(wh.REQUEST_TIMEOUT_S):
            try:
                await check_url(delivery.url, allow_private=self.allow_private)  # again: DNS may have changed
                async with client.stream("POST", delivery.url, content=delivery.body, headers=headers) as response:
                    read = 0
                    async for chunk in response.aiter_bytes():
                        read += len(chunk)
                        if read >= RESPONSE_BODY_BYTES:
                            break
                    status = response.status_code
            except Unprocessable as exc:
                return _Outcome(http_status=None, error=exc.message[:ERROR_CHARS])
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                return _Outcome(http_status=None, error=f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
            return _Outcome(http_status=status, error=None if 200 <= status < 300 else f"HTTP {status}")
        return _Outcome(http_status=None, error=f"no answer within {wh.REQUEST_TIMEOUT_S:g} s")

    async def _record(self, delivery: wh.DueDelivery, outcome: _Outcome) -> None:
        now_ms = self.clock.now_ms()
        attempts = delivery.attempts + 1
        status, next_at, disable = wh.PENDING, None, None
        if outcome.http_status is not None and 200 <= outcome.http_status < 300:
            status = wh.DELIVERED
            metrics.WEBHOOKS_SENT.inc()
        elif outcome.http_status == 410:
            status, disable = wh.FAILED, "the endpoint answered 410 Gone"
            metrics.WEBHOOKS_FAILED.inc()
            log.warning("webhooks: endpoint %s answered 410 Gone: disabled", delivery.endpoint_id)
        elif wh.gives_up(delivery.created_at, now_ms):
            status = wh.FAILED
            metrics.WEBHOOKS_FAILED.inc()
            log.warning("webhooks: delivery %d to endpoint %s failed for good after %d attempts: %s",
                        delivery.id, delivery.endpoint_id, attempts, outcome.error)
        else:
            next_at = now_ms + round(wh.retry_delay_s(attempts, self.rng) * 1000)
            metrics.WEBHOOKS_RETRIED.inc()
            log.info("webhooks: delivery %d to endpoint %s failed (%s), attempt %d; next in %.1f s",
                     delivery.id, delivery.endpoint_id, outcome.error, attempts, (next_at - now_ms) / 1000)
        try:
            await self.storage.write(w.RecordAttempt(
                delivery_id=delivery.id, at=now_ms, status=status, http_status=outcome.http_status,
                error=outcome.error, next_attempt_at=next_at, disable_endpoint=disable,
            ))
        except (StorageUnavailable, trio.TooSlowError) as exc:
            # still pending in storage: sent again (same webhook-id), which at-least-once allows
            log.error("webhooks: delivery %d: outcome not recorded: %s", delivery.id, exc)
