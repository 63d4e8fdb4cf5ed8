"""Session handlers for billing: the ledger follows presence, ticks push `billing`
events and checkpoint, the budget warns and ends (PRODUCT.md section 4).

Amounts depend only on presence instants, never on when a tick fires. A
checkpoint never holds time past the last instant the payer and the provider
were each known alive (their last pong or frame, as their connections report
it), so a crash right after a silent drop bills no ghost time; the price is that
a crash may under-count up to one tick plus one heartbeat interval.

Wake-ups come from the process's billing clock (actors/billing_clock.py). A tick's
checkpoint is handed to that clock and written with those of every session due in
the same bucket (one group commit); the session goes on at once and hears back only
when the write failed (`CheckpointFailed`: retried `STORAGE_RETRY` later). Writes
that carry timeline entries (presence changes, the warning, the end) and the
shutdown flush are still awaited here, after taking back a tick checkpoint still
waiting in the clock, so checkpoints land in the order they were taken.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from domain import metrics, timeline
from domain.billing import Ledger, amount_minor
from domain.errors import Fenced, StorageUnavailable
from domain.session import ACTIVE, END_LIMIT_REACHED
from protocol import wire
from protocol.replies import LiveBilling
from storage import messages as sm

from .messages import GetLiveBilling

if TYPE_CHECKING:
    from .actor import SessionActor

log = logging.getLogger("parley.session")

STORAGE_RETRY = 1.0  # seconds before a failed checkpoint is tried again


class EndSession(Protocol):
    def __call__(self, s: SessionActor, *, actor: str, reason: str, at_ms: int) -> Awaitable[None]: ...


def _both_present(s: SessionActor) -> bool:
    session = s.session
    assert session is not None
    return session.state == ACTIVE and session.payer in s.members and session.provider in s.members


def _known_alive_ms(s: SessionActor, now_ms: int) -> int:
    """How far a checkpoint may bill: no later than the payer and provider were known alive."""
    session = s.session
    assert session is not None
    cut = now_ms
    for user in (session.payer, session.provider):
        member = s.members.get(user)
        if member is not None:
            at_ms = s.ctx.delivery.last_alive(member.conn)  # this process: read from the connection
            if at_ms is not None:  # (else its `MemberAlive` notices are what the session has)
                member.alive_ms = max(member.alive_ms, min(now_ms, s.to_session_ms(at_ms)))
            cut = min(cut, member.alive_ms)
    return cut


def state(s: SessionActor, now_ms: int, *, final: bool = False, checkpoint: bool = False) -> sm.BillingState:
    session = s.session
    assert session is not None
    ledger = s.ledger or Ledger(rate_per_minute=session.rate_per_minute)
    cut = _known_alive_ms(s, now_ms) if checkpoint and ledger.is_open else now_ms
    return sm.BillingState(
        session_id=s.session_id,
        rate_per_minute=session.rate_per_minute,
        currency=session.currency,
        segments=tuple(ledger.snapshot_segments(cut)),
        open=ledger.is_open and not final,
        checkpoint_at=now_ms,
        final=final,
    )


def billing_frame(s: SessionActor, now_ms: int, *, final: bool = False, **extra: Any) -> str:
    session = s.session
    assert session is not None
    ledger = s.ledger or Ledger(rate_per_minute=session.rate_per_minute)
    billable = ledger.billable_ms(now_ms)
    return wire.event(
        "billing", session=s.session_id, billable_ms=billable,
        amount_minor=amount_minor(billable, session.rate_per_minute),
        currency=session.currency, final=final, **extra,
    )


def _push(s: SessionActor, now_ms: int, **extra: Any) -> None:
    session = s.session
    assert session is not None
    s.broadcast(billing_frame(s, now_ms, **extra), users=(session.payer, session.provider))


async def record_presence(s: SessionActor, at_ms: int, **kwargs: Any) -> None:
    """Timeline and billing checkpoint of a join or leave that was already answered `ok`:
    a storage failure here is logged, not answered a second time with the same ref (a
    refusal because another node owns the session now makes the actor give it up after
    this message, see `SessionActor._serve`)."""
    try:
        await update(s, at_ms, **kwargs)
    except (StorageUnavailable, Fenced, trio.TooSlowError) as exc:
        log.error("session %s: presence change not recorded: %s", s.session_id, exc)


async def update(s: SessionActor, at_ms: int, *, extra: tuple[timeline.TimelineEntry, ...] = ()) -> None:
    """Open or close the billable segment after a presence or state change; checkpoint it."""
    ledger = s.ledger
    entries = list(extra)
    changed = False
    if ledger is not None and not s.billing_final:
        present = _both_present(s)
        if present and not ledger.is_open:
            ledger.open(at_ms)
            metrics.BILLING_ACTIVE.inc()
            entries.append(timeline.TimelineEntry(
                session_id=s.session_id, at=at_ms, kind=timeline.BILLING_STARTED, actor="server",
            ))
            s.next_tick_ms = at_ms + int(s.settings.billing_tick * 1000)
            changed = True
        elif not present and ledger.is_open:
            ledger.close(at_ms)
            metrics.BILLING_ACTIVE.dec()
            entries.append(timeline.TimelineEntry(
                session_id=s.session_id, at=at_ms, kind=timeline.BILLING_STOPPED, actor="server",
                detail={"billable_ms": ledger.closed_ms},
            ))
            s.next_tick_ms = None
            changed = True
    if changed:
        _push(s, at_ms)
        reschedule(s)  # from the ledger in memory, even if the write fails
        _take_back(s)
        await s.storage.write(sm.CheckpointBilling(
            billing=state(s, s.now_ms(), checkpoint=True), timeline=tuple(entries),
        ))
        s.checkpoint_owed = False
    elif entries:
        await s.storage.write(sm.AppendTimeline(entries=tuple(entries)))


def reschedule(s: SessionActor, *, not_before: float = -math.inf) -> None:
    ledger, timer = s.ledger, s.timer
    assert timer is not None
    if ledger is None or not ledger.is_open or s.billing_final:
        timer.cancel()
        return
    due = [t for t in (s.next_tick_ms, ledger.warning_at(), ledger.limit_at()) if t is not None]
    at = max(not_before, trio.current_time() + max(0, min(due) - s.now_ms()) / 1000)
    if s.checkpoint_owed:
        at = min(at, max(not_before, trio.current_time() + STORAGE_RETRY))
    timer.reschedule(at)


async def due(s: SessionActor, *, end: EndSession) -> None:
    """The timer fired: end at the budget, warn before it, tick. `end` is lifecycle's."""
    try:
        await _due_now(s, end)
    except (StorageUnavailable, trio.TooSlowError) as exc:
        # the ledger in memory is right; try the write again soon, not in a busy loop
        log.error("session %s: billing checkpoint failed, retrying: %s", s.session_id, exc)
        reschedule(s, not_before=trio.current_time() + STORAGE_RETRY)
        return
    reschedule(s)


async def _due_now(s: SessionActor, end: EndSession) -> None:
    ledger = s.ledger
    if ledger is None or not ledger.is_open or s.billing_final:
        return
    now_ms = s.now_ms()
    limit_at = ledger.limit_at()
    if limit_at is not None and now_ms >= limit_at:
        await end(s, actor="server", reason=END_LIMIT_REACHED, at_ms=limit_at)
        return
    warning_at = ledger.warning_at()
    if warning_at is not None and now_ms >= warning_at:
        ledger.warned = True
        _push(s, now_ms, warning="limit_near")
        await s.storage.write(sm.AppendTimeline(entries=(timeline.TimelineEntry(
            session_id=s.session_id, at=now_ms, kind=timeline.BILLING_LIMIT_NEAR, actor="server",
            detail={"billable_ms": ledger.billable_ms(now_ms)},
        ),)))
    tick = s.next_tick_ms is not None and now_ms >= s.next_tick_ms
    if tick:
        assert s.next_tick_ms is not None
        tick_ms = int(s.settings.billing_tick * 1000)
        while s.next_tick_ms <= now_ms:
            s.next_tick_ms += tick_ms
        _push(s, now_ms)
    if tick or s.checkpoint_owed:
        # handed to the billing clock, which writes the checkpoints of every session due
        # with this one in one group commit; a failure comes back as CheckpointFailed
        assert s.timer is not None
        s.timer.checkpoint(s.storage.stamp(  # type: ignore[attr-defined]
            sm.CheckpointBilling(billing=state(s, now_ms, checkpoint=True))
        ))
        s.checkpoint_owed = False


def checkpoint_failed(s: SessionActor, error: Exception) -> None:
    """A tick checkpoint the clock wrote failed: fenced, give up; otherwise write the bill
    again `STORAGE_RETRY` from now (the ledger in memory is right)."""
    s.storage.refused(error)  # type: ignore[attr-defined]
    if isinstance(error, Fenced) or s.billing_final:
        return
    log.error("session %s: billing checkpoint failed, retrying: %s", s.session_id, error)
    s.checkpoint_owed = True
    reschedule(s)


def _take_back(s: SessionActor) -> None:
    """The session writes its bill itself: a tick checkpoint still waiting in the clock is
    older, and must not land after this one."""
    if s.timer is not None:
        s.timer.discard_checkpoint()


async def checkpoint(s: SessionActor) -> None:
    """Store the running bill now (graceful shutdown's flush)."""
    if s.ledger is not None and s.ledger.is_open and not s.billing_final:
        _take_back(s)
        await s.storage.write(sm.CheckpointBilling(billing=state(s, s.now_ms(), checkpoint=True)))
        s.checkpoint_owed = False


def live(s: SessionActor, message: GetLiveBilling) -> None:
    s.may_see(message.caller)
    current = state(s, s.now_ms(), final=s.billing_final)
    s.reply(message.reply, LiveBilling(
        session_id=s.session_id, rate_per_minute=current.rate_per_minute, currency=current.currency,
        segments=current.segments, final=current.final,
    ))
