"""Session handlers for the lifecycle: start, cancel, end (by a user, the orphan rule,
or the budget). Every transition is stored before it is announced."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from domain import metrics, timeline
from domain.billing import Ledger, amount_minor
from domain.errors import Conflict, StorageUnavailable
from domain.session import ACTIVE, CANCELLED, END_ENDED, END_ORPHANED, check_transition
from protocol import wire
from protocol.replies import SessionChanged
from storage import messages as sm

from ..ports import ReplyTo
from . import billing
from .messages import Transition

if TYPE_CHECKING:
    from .actor import SessionActor

log = logging.getLogger("parley.session")

STORAGE_RETRY = 1.0  # seconds before a failed orphan end is tried again


async def transition(s: SessionActor, message: Transition) -> None:
    s.may_see(message.caller)
    session = s.session
    assert session is not None
    now_ms = s.now_ms()
    if message.name == "end":
        await end(s, actor=message.caller.user, reason=END_ENDED, at_ms=now_ms, reply=message.reply)
        return
    check_transition(session, message.name)
    kind = timeline.STARTED if message.name == "start" else timeline.CANCELLED
    changed = await s.storage.write(sm.TransitionSession(
        session_id=s.session_id, name=message.name, at=now_ms,
        timeline=(timeline.TimelineEntry(session_id=s.session_id, at=now_ms, kind=kind, actor=message.caller.user),),
    ))
    s.session = changed
    s.reply(message.reply, SessionChanged(session=changed))
    s.broadcast(wire.event("session", session=wire.record(changed)))
    if changed.state == ACTIVE:
        s.ledger = Ledger(rate_per_minute=changed.rate_per_minute, max_amount_minor=changed.max_amount_minor)
        if not s.members:
            s.orphan_since = trio.current_time()
        await billing.update(s, now_ms)
    elif changed.state == CANCELLED:
        s.members.clear()  # their connections find out on their next request (not_joined)


async def end_if_orphaned(s: SessionActor, now: float) -> None:
    assert s.orphan_since is not None
    if now < s.orphan_since + s.settings.orphan_timeout:
        return
    log.info("session %s: nobody connected for %ss, ending", s.session_id, s.settings.orphan_timeout)
    try:
        await end(s, actor="server", reason=END_ORPHANED, at_ms=s.now_ms())
    except (StorageUnavailable, trio.TooSlowError) as exc:
        log.error("session %s: ending the orphan failed, retrying: %s", s.session_id, exc)
        s.orphan_since = now - s.settings.orphan_timeout + STORAGE_RETRY


async def end(s: SessionActor, *, actor: str, reason: str, at_ms: int, reply: ReplyTo | None = None) -> None:
    session = s.session
    assert session is not None
    if session.state != ACTIVE:
        raise Conflict(f"cannot end a session that is {session.state}", state=session.state)
    ledger = s.ledger or Ledger(rate_per_minute=session.rate_per_minute)
    was_open = ledger.is_open
    # the open segment is cut at `at_ms` in the snapshot; the ledger itself changes only
    # once the end is stored, so a failed write leaves the call billing as before
    final = billing.state(s, at_ms, final=True)
    entries = [timeline.TimelineEntry(
        session_id=s.session_id, at=at_ms, kind=timeline.ENDED, actor=actor, detail={"reason": reason},
    )]
    if was_open:
        entries.insert(0, timeline.TimelineEntry(
            session_id=s.session_id, at=at_ms, kind=timeline.BILLING_STOPPED, actor=actor, detail={"reason": reason},
        ))
    entries.append(timeline.TimelineEntry(
        session_id=s.session_id, at=at_ms, kind=timeline.BILLING_FINALIZED, actor="server",
        detail={
            "billable_ms": final.billable_ms,
            "amount_minor": amount_minor(final.billable_ms, session.rate_per_minute),
            "currency": session.currency,
        },
    ))
    changed = await s.storage.write(sm.TransitionSession(
        session_id=s.session_id, name="end", at=at_ms, end_reason=reason, final_billing=final, timeline=tuple(entries),
    ))
    # persisted: from here on the session is ended, whatever happens next
    ledger.close(at_ms)
    s.ledger = ledger
    if was_open:
        metrics.BILLING_ACTIVE.dec()
    s.session = changed
    s.billing_final = True
    s.orphan_since = None
    assert s.timer is not None
    s.timer.cancel()
    s.reply(reply, SessionChanged(session=changed))
    s.broadcast(wire.event("session", session=wire.record(changed)))
    s.broadcast(billing.billing_frame(s, at_ms, final=True), users=(session.payer, session.provider))
    s.members.clear()  # their connections find out on their next request (not_joined)
