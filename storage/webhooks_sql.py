"""The webhook outbox, in SQL both databases speak: a mixin of `SqlBackend` (storage/sql.py).

`_outbox` runs right after every write request, in the same transaction (and the same
savepoint): it derives the events the request reports — a created, started, ended or
cancelled session, the final bill, joins, leaves, drops, the budget warning — from the
request and its result, and writes one event row plus one delivery row for every enabled
endpoint subscribed to that type. So no caller can forget an event, an event exists only
if its change committed, and a change that committed has its event.

`CommitSignal` tells the delivery actor, right after such a commit, that there is something
to send (thread-safe: the commit runs in the storage actor's writer thread).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
import trio

from domain import timeline as tl
from domain import webhooks as wh
from domain.billing import amount_minor
from domain.errors import NotFound
from domain.session import ACTIVE, CANCELLED, ENDED, SessionRecord

from . import messages as m
from . import webhook_messages as w

Row = Sequence[Any]

ENDPOINT_COLUMNS = (
    "id, url, description, events, secret, previous_secret, previous_secret_until, enabled,"
    " disabled_reason, created_at, updated_at"
)
DELIVERY_COLUMNS = (
    "d.id, d.endpoint_id, ev.id, ev.type, d.session_id, d.status, d.attempts, d.next_attempt_at,"
    " d.last_attempt_at, d.last_status, d.last_error, d.delivered_at, d.created_at"
)
_PARTICIPANT_EVENTS = {
    tl.JOINED: wh.PARTICIPANT_JOINED,
    tl.LEFT: wh.PARTICIPANT_LEFT,
    tl.DROPPED: wh.PARTICIPANT_DROPPED,
}
_TRANSITION_EVENTS = {ACTIVE: wh.SESSION_STARTED, ENDED: wh.SESSION_ENDED, CANCELLED: wh.SESSION_CANCELLED}


class CommitSignal:
    """Wakes subscribers (in their Trio thread) after a commit that wrote deliveries."""

    def __init__(self) -> None:
        self._wrote = False  # touched by the writer thread only
        self._listeners: list[tuple[trio.lowlevel.TrioToken, Callable[[], None]]] = []

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call from Trio: `callback` runs in this Trio run after each such commit (it must not
        block or raise). Returns the unsubscribe function."""
        entry = (trio.lowlevel.current_trio_token(), callback)
        self._listeners.append(entry)
        return lambda: self._listeners.remove(entry)

    def wrote(self) -> None:
        self._wrote = True

    def committed(self) -> None:
        if not self._wrote:
            return
        self._wrote = False
        for token, callback in tuple(self._listeners):
            try:
                token.run_sync_soon(callback)
            except trio.RunFinishedError:
                pass

    def rolled_back(self) -> None:
        self._wrote = False  # a rolled-back savepoint may leave it set: one spurious wake-up


def endpoint_from_row(row: Row) -> wh.Endpoint:
    return wh.Endpoint(
        id=row[0], url=row[1], description=row[2] or "", events=tuple(orjson.loads(row[3])), secret=row[4],
        previous_secret=row[5], previous_secret_until=row[6], enabled=bool(row[7]), disabled_reason=row[8],
        created_at=row[9], updated_at=row[10],
    )


def delivery_from_row(row: Row) -> wh.Delivery:
    return wh.Delivery(
        id=row[0], endpoint_id=row[1], event_id=row[2], event_type=row[3], session_id=row[4], status=row[5],
        attempts=row[6], next_attempt_at=row[7], last_attempt_at=row[8], last_status=row[9], last_error=row[10],
        delivered_at=row[11], created_at=row[12],
    )


class WebhookSql:
    """Mixed into `SqlBackend`: uses its `_execute`, `_executemany`, `_get_session`, `_get_billing`."""

    _execute: Callable[..., Any]
    _executemany: Callable[..., int]
    _get_session: Callable[..., SessionRecord]
    _get_billing: Callable[..., m.BillingState | None]

    @property
    def webhook_commits(self) -> CommitSignal:
        signal = self.__dict__.get("_webhook_commits")
        if signal is None:
            signal = self.__dict__["_webhook_commits"] = CommitSignal()
        return signal

    # ---------------------------------------------------------------- the outbox

    def _outbox(self, conn: Any, request: Any, result: Any) -> None:
        """The events `request` (answered `result`) reports, in its transaction."""
        events = self._events_of(conn, request, result)
        if events:
            self._enqueue(conn, events)

    def _events_of(self, conn: Any, request: Any, result: Any) -> list[wh.Event]:
        match request:
            case m.CreateSession():
                session, replayed = result
                if replayed:
                    return []
                data = {"session_id": session.id, "session": wh.session_data(session)}
                return [wh.event(wh.SESSION_CREATED, session.id, session.created_at, data)]
            case m.TransitionSession():
                return [*self._timeline_events(conn, request.timeline), self._transition_event(conn, request, result)]
            case m.AppendTimeline(entries=entries) | m.CheckpointBilling(timeline=entries):
                return self._timeline_events(conn, entries)
        return []

    def _transition_event(self, conn: Any, request: m.TransitionSession, changed: SessionRecord) -> wh.Event:
        data: dict[str, Any] = {"session_id": changed.id, "session": wh.session_data(changed)}
        if changed.state == ENDED:
            bill = self._get_billing(conn, changed.id)
            billable = bill.billable_ms if bill else 0
            data.update(
                billable_ms=billable, amount_minor=amount_minor(billable, changed.rate_per_minute),
                currency=changed.currency, rate_per_minute=changed.rate_per_minute, end_reason=changed.end_reason,
            )
        return wh.event(_TRANSITION_EVENTS[changed.state], changed.id, request.at, data)

    def _timeline_events(self, conn: Any, entries: tuple[tl.TimelineEntry, ...]) -> list[wh.Event]:
        events = []
        for entry in entries:
            data: dict[str, Any] = {"session_id": entry.session_id}
            if entry.kind in _PARTICIPANT_EVENTS:
                data.update(user=entry.actor, **entry.detail)
                events.append(wh.event(_PARTICIPANT_EVENTS[entry.kind], entry.session_id, entry.at, data))
            elif entry.kind == tl.BILLING_LIMIT_NEAR:
                session = self._get_session(conn, entry.session_id)
                billable = int(entry.detail.get("billable_ms", 0))
                data.update(
                    billable_ms=billable, amount_minor=amount_minor(billable, session.rate_per_minute),
                    max_amount_minor=session.max_amount_minor, currency=session.currency,
                )
                events.append(wh.event(wh.BILLING_LIMIT_NEAR, entry.session_id, entry.at, data))
        return events

    def _enqueue(self, conn: Any, events: list[wh.Event]) -> None:
        rows = self._execute(conn, "SELECT id, events FROM webhook_endpoints WHERE enabled ORDER BY cursor").fetchall()
        subscribed = [(endpoint_id, frozenset(orjson.loads(types))) for endpoint_id, types in rows]
        for event in events:
            targets = [endpoint_id for endpoint_id, types in subscribed if event.type in types]
            if not targets:
                continue
            (seq,) = self._execute(
                conn,
                "INSERT INTO webhook_events (id, type, session_id, created_at, body) VALUES (?, ?, ?, ?, ?)"
                " RETURNING seq",
                (event.id, event.type, event.session_id, event.at, event.body),
            ).fetchone()
            self._executemany(
                conn,
                "INSERT INTO webhook_deliveries (event_seq, endpoint_id, session_id, status, attempts,"
                " next_attempt_at, created_at) VALUES (?, ?, ?, ?, 0, ?, ?)",
                [(seq, endpoint_id, event.session_id, wh.PENDING, event.at, event.at) for endpoint_id in targets],
            )
            self.webhook_commits.wrote()

    # ---------------------------------------------------------------- writes

    def _webhook_write(self, conn: Any, request: w.WebhookWrite) -> Any:
        match request:
            case w.CreateEndpoint(endpoint=e):
                self._execute(
                    conn,
                    f"INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.id, e.url, e.description, orjson.dumps(list(e.events)).decode(), e.secret, e.previous_secret,
                     e.previous_secret_until, e.enabled, e.disabled_reason, e.created_at, e.updated_at),
                )
                return self._get_endpoint(conn, e.id)
            case w.UpdateEndpoint():
                return self._update_endpoint(conn, request)
            case w.DeleteEndpoint(endpoint_id=endpoint_id):
                self._get_endpoint(conn, endpoint_id)
                self._execute(conn, "DELETE FROM webhook_deliveries WHERE endpoint_id = ?", (endpoint_id,))
                self._execute(conn, "DELETE FROM webhook_endpoints WHERE id = ?", (endpoint_id,))
                return None
            case w.RecordAttempt():
                self._record_attempt(conn, request)
                return None
            case w.ClaimDelivery(delivery_id=delivery_id, due_at=due_at, until=until):
                claimed = self._execute(
                    conn,
                    "UPDATE webhook_deliveries SET next_attempt_at = ?"
                    " WHERE id = ? AND status = 'pending' AND next_attempt_at = ? RETURNING id",
                    (until, delivery_id, due_at),
                ).fetchone()
                return claimed is not None
            case w.RetryDelivery(endpoint_id=endpoint_id, delivery_id=delivery_id, at=at):
                row = self._execute(
                    conn,
                    "UPDATE webhook_deliveries SET status = ?, next_attempt_at = ? WHERE id = ? AND endpoint_id = ?"
                    " RETURNING id",
                    (wh.PENDING, at, delivery_id, endpoint_id),
                ).fetchone()
                if row is None:
                    raise NotFound(f"no delivery {delivery_id} for endpoint {endpoint_id}")
                self.webhook_commits.wrote()
                return self._get_delivery(conn, endpoint_id, delivery_id)
        raise TypeError(f"unknown write request {request!r}")

    def _update_endpoint(self, conn: Any, request: w.UpdateEndpoint) -> wh.Endpoint:
        current = self._get_endpoint(conn, request.endpoint_id)
        sets: list[str] = ["updated_at = ?"]
        params: list[Any] = [request.at]
        if request.url is not None:
            sets.append("url = ?")
            params.append(request.url)
        if request.events is not None:
            sets.append("events = ?")
            params.append(orjson.dumps(list(request.events)).decode())
        if request.description is not None:
            sets.append("description = ?")
            params.append(request.description)
        if request.enabled is not None:
            sets.append("enabled = ?")
            params.append(request.enabled)
            sets.append("disabled_reason = ?")
            params.append(None if request.enabled else current.disabled_reason or "disabled by an admin")
            if request.enabled:
                self.webhook_commits.wrote()  # its pending deliveries are due again
        if request.secret is not None:
            sets.extend(["previous_secret = secret", "previous_secret_until = ?", "secret = ?"])
            params.extend([request.previous_secret_until, request.secret])
        self._execute(conn, f"UPDATE webhook_endpoints SET {', '.join(sets)} WHERE id = ?", (*params, current.id))
        return self._get_endpoint(conn, current.id)

    def _record_attempt(self, conn: Any, request: w.RecordAttempt) -> None:
        delivered_at = request.at if request.status == wh.DELIVERED else None
        row = self._execute(
            conn,
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, last_attempt_at = ?,"
            " last_status = ?, last_error = ?, next_attempt_at = ?, delivered_at = COALESCE(?, delivered_at)"
            " WHERE id = ? RETURNING endpoint_id",
            (request.status, request.at, request.http_status, request.error, request.next_attempt_at,
             delivered_at, request.delivery_id),
        ).fetchone()
        if row is not None and request.disable_endpoint is not None:
            self._execute(
                conn,
                "UPDATE webhook_endpoints SET enabled = FALSE, disabled_reason = ?, updated_at = ? WHERE id = ?",
                (request.disable_endpoint, request.at, row[0]),
            )
        if row is not None and request.status != wh.PENDING:
            self.webhook_commits.wrote()  # the next event of its session may go now

    # ---------------------------------------------------------------- reads

    def _webhook_read(self, conn: Any, request: w.WebhookRead) -> Any:
        match request:
            case w.ListEndpoints():
                rows = self._execute(conn, f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints ORDER BY cursor")
                return tuple(endpoint_from_row(r) for r in rows.fetchall())
            case w.GetEndpoint(endpoint_id=endpoint_id):
                return self._get_endpoint(conn, endpoint_id)
            case w.ListDeliveries():
                return self._list_deliveries(conn, request)
            case w.DueDeliveries():
                return self._due(conn, request)
        raise TypeError(f"unknown read request {request!r}")

    def _get_endpoint(self, conn: Any, endpoint_id: str) -> wh.Endpoint:
        row = self._execute(
            conn, f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = ?", (endpoint_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}")
        return endpoint_from_row(row)

    def _get_delivery(self, conn: Any, endpoint_id: str, delivery_id: int) -> wh.Delivery:
        row = self._execute(
            conn,
            f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_events ev ON ev.seq = d.event_seq"
            " WHERE d.id = ? AND d.endpoint_id = ?",
            (delivery_id, endpoint_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no delivery {delivery_id} for endpoint {endpoint_id}")
        return delivery_from_row(row)

    def _list_deliveries(
        self, conn: Any, request: w.ListDeliveries
    ) -> tuple[tuple[wh.Delivery, ...], int | None]:
        self._get_endpoint(conn, request.endpoint_id)
        params: list[Any] = [request.endpoint_id]
        below = ""
        if request.cursor is not None:
            below = " AND d.id < ?"
            params.append(request.cursor)
        rows = self._execute(
            conn,
            f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_events ev ON ev.seq = d.event_seq"
            f" WHERE d.endpoint_id = ?{below} ORDER BY d.id DESC LIMIT ?",
            (*params, request.limit + 1),
        ).fetchall()
        page = rows[: request.limit]
        next_cursor = page[-1][0] if len(rows) > request.limit else None
        return tuple(delivery_from_row(r) for r in page), next_cursor

    def _due(self, conn: Any, request: w.DueDeliveries) -> w.DueBatch:
        rows = self._execute(
            conn,
            "SELECT q.id, q.endpoint_id, q.url, q.secret, q.previous_secret, q.previous_secret_until, ev.id,"
            " q.session_id, ev.body, q.attempts, ev.created_at, q.next_attempt_at FROM ("
            "  SELECT d.id, d.endpoint_id, d.session_id, d.attempts, d.event_seq, d.next_attempt_at, e.url,"
            "   e.secret, e.previous_secret, e.previous_secret_until,"
            "   ROW_NUMBER() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) AS place"
            "  FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id"
            "  WHERE e.enabled AND d.status = 'pending' AND d.next_attempt_at <= ?"
            "   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id"
            "    AND p.session_id = d.session_id AND p.status = 'pending' AND p.id < d.id)"
            " ) q JOIN webhook_events ev ON ev.seq = q.event_seq"
            " WHERE q.place <= ? ORDER BY q.next_attempt_at, q.id LIMIT ?",
            (request.now, request.per_endpoint, request.limit),
        ).fetchall()
        due = tuple(
            wh.DueDelivery(
                id=r[0], endpoint_id=r[1], url=r[2],
                secrets=wh.Endpoint(
                    id=r[1], url=r[2], events=(), secret=r[3], previous_secret=r[4], previous_secret_until=r[5],
                    created_at=0, updated_at=0,
                ).signing_secrets(request.now),
                event_id=r[6], session_id=r[7], body=bytes(r[8]), attempts=r[9], created_at=r[10],
                due_at=r[11],
            )
            for r in rows
        )
        later, oldest = self._execute(
            conn,
            "SELECT MIN(CASE WHEN d.next_attempt_at > ? THEN d.next_attempt_at END), MIN(d.created_at)"
            " FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id"
            " WHERE e.enabled AND d.status = 'pending'",
            (request.now,),
        ).fetchone()
        return w.DueBatch(due=due, next_attempt_at=later, oldest_pending_at=oldest)
