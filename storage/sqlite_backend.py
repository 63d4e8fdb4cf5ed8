"""SQLite implementation of every storage request. Synchronous: runs in worker threads.

The storage actor owns one writer connection (all writes, batched into one
transaction each) and one reader connection (WAL lets reads go on beside a
long write batch). Each connection is used by one thread at a time.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from domain import session as lifecycle
from domain.billing import amount_minor
from domain.chat import ChatMessage, Marks
from domain.errors import Conflict, Forbidden, NotFound
from domain.session import SessionRecord
from domain.timeline import BILLING_GAP, TimelineEntry

from . import messages as m
from .schema import migrate

_SESSION_COLUMNS = (
    "id, payer, provider, guests, rate_per_minute, currency, max_amount_minor, state,"
    " created_at, started_at, ended_at, end_reason, metadata, created_by, cursor"
)
_MESSAGE_COLUMNS = "id, session_id, seq, client_id, sender, body, created_at, edited_at, deleted"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _session_from_row(row: tuple) -> SessionRecord:
    return SessionRecord(
        id=row[0],
        payer=row[1],
        provider=row[2],
        guests=tuple(orjson.loads(row[3] or "[]")),
        rate_per_minute=row[4],
        currency=row[5],
        max_amount_minor=row[6],
        state=row[7],
        created_at=row[8],
        started_at=row[9],
        ended_at=row[10],
        end_reason=row[11],
        metadata=orjson.loads(row[12] or "{}"),
        created_by=row[13] or "",
    )


def _message_from_row(row: tuple) -> ChatMessage:
    return ChatMessage(
        id=row[0],
        session_id=row[1],
        seq=row[2],
        client_id=row[3],
        sender=row[4],
        body=row[5],
        created_at=row[6],
        edited_at=row[7],
        deleted=bool(row[8]),
    )


class SqliteBackend:
    """Opens connections and answers requests. Holds no state besides its settings."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self.synchronous = synchronous

    # ---------------------------------------------------------------- connections

    def connect(self, *, writer: bool) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        if writer:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            migrate(conn)
        return conn

    # ---------------------------------------------------------------- writes

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def write(self, conn: sqlite3.Connection, request: m.WriteRequest) -> Any:
        match request:
            case m.CreateSession():
                return self._create_session(conn, request)
            case m.TransitionSession():
                return self._transition(conn, request)
            case m.AppendTimeline(entries=entries):
                self._append_timeline(conn, entries)
                return None
            case m.CheckpointBilling(billing=billing, timeline=timeline):
                self._save_billing(conn, billing)
                self._append_timeline(conn, timeline)
                return None
            case m.InsertMessage(message=message):
                return self._insert_message(conn, message)
            case m.EditMessage():
                return self._edit_message(conn, request)
            case m.DeleteMessage():
                return self._delete_message(conn, request)
            case m.RaiseMark():
                return self._raise_mark(conn, request)
            case m.SaveIdempotentReply():
                conn.execute(
                    "INSERT OR IGNORE INTO idempotency (user_id, route, key, status, body)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (request.user, request.route, request.key, request.status, request.body),
                )
                return None
            case m.ReconcileAfterRestart(now=now):
                return self._reconcile(conn, now)
            case m.ProbeWrite(at=at):
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (str(at),)
                )
                return None
        raise TypeError(f"unknown write request {request!r}")

    def _create_session(self, conn: sqlite3.Connection, request: m.CreateSession) -> Any:
        session = request.session
        route = "POST /api/sessions"
        if request.idempotency_key is not None:
            row = conn.execute(
                "SELECT body FROM idempotency WHERE user_id = ? AND route = ? AND key = ?",
                (session.created_by, route, request.idempotency_key),
            ).fetchone()
            if row is not None:
                return self._get_session(conn, row[0].decode()), True
        cursor = conn.execute(
            "INSERT INTO sessions (id, payer, provider, guests, rate_per_minute, currency,"
            " max_amount_minor, state, created_at, metadata, created_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session.id,
                session.payer,
                session.provider,
                _json(list(session.guests)),
                session.rate_per_minute,
                session.currency,
                session.max_amount_minor,
                session.state,
                session.created_at,
                _json(session.metadata),
                session.created_by,
            ),
        ).lastrowid
        roles = {session.payer: "payer", session.provider: "provider"}
        for guest in session.guests:
            roles.setdefault(guest, "guest")
        conn.executemany(
            "INSERT OR IGNORE INTO participants (user_id, cursor, session_id, role)"
            " VALUES (?, ?, ?, ?)",
            [(user, cursor, session.id, role) for user, role in roles.items()],
        )
        conn.execute(
            "INSERT INTO billing (session_id, rate_per_minute, currency, segments, billable_ms,"
            " amount_minor) VALUES (?, ?, ?, '[]', 0, 0)",
            (session.id, session.rate_per_minute, session.currency),
        )
        if request.idempotency_key is not None:
            conn.execute(
                "INSERT INTO idempotency (user_id, route, key, status, body) VALUES (?, ?, ?, ?, ?)",
                (session.created_by, route, request.idempotency_key, 201, session.id.encode()),
            )
        self._append_timeline(conn, (request.timeline,))
        return session, False

    def _transition(self, conn: sqlite3.Connection, request: m.TransitionSession) -> SessionRecord:
        current = self._get_session(conn, request.session_id)
        changed = lifecycle.apply_transition(
            current, request.name, at_ms=request.at, end_reason=request.end_reason
        )
        conn.execute(
            "UPDATE sessions SET state = ?, started_at = ?, ended_at = ?, end_reason = ?"
            " WHERE id = ? AND state = ?",
            (
                changed.state,
                changed.started_at,
                changed.ended_at,
                changed.end_reason,
                changed.id,
                current.state,
            ),
        )
        if request.final_billing is not None:
            self._save_billing(conn, request.final_billing)
        self._append_timeline(conn, request.timeline)
        return changed

    def _save_billing(self, conn: sqlite3.Connection, billing: m.BillingState) -> None:
        billable = billing.billable_ms
        conn.execute(
            "UPDATE billing SET segments = ?, billable_ms = ?, amount_minor = ?, open = ?,"
            " checkpoint_at = ?, final = ? WHERE session_id = ? AND final = 0",
            (
                _json([list(s) for s in billing.segments]),
                billable,
                amount_minor(billable, billing.rate_per_minute),
                int(billing.open),
                billing.checkpoint_at,
                int(billing.final),
                billing.session_id,
            ),
        )

    def _append_timeline(
        self, conn: sqlite3.Connection, entries: tuple[TimelineEntry, ...]
    ) -> None:
        if entries:
            conn.executemany(
                "INSERT INTO timeline (session_id, at, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
                [(e.session_id, e.at, e.kind, e.actor, _json(e.detail)) for e in entries],
            )

    def _insert_message(
        self, conn: sqlite3.Connection, message: ChatMessage
    ) -> tuple[ChatMessage, bool]:
        # One statement: the database numbers the message (the writer serializes inserts, so
        # seqs are gapless even if the session actor's idea of the last one went stale after a
        # write that timed out for its caller but committed), and a known
        # (session, sender, client_id) inserts nothing and returns no row.
        row = conn.execute(
            "INSERT OR IGNORE INTO messages"
            " (id, session_id, seq, client_id, sender, body, created_at, edited_at, deleted)"
            " SELECT ?, ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ?, NULL, 0"
            " FROM messages WHERE session_id = ? RETURNING seq",
            (
                message.id,
                message.session_id,
                message.client_id,
                message.sender,
                message.body,
                message.created_at,
                message.session_id,
            ),
        ).fetchone()
        if row is not None:
            return dataclasses.replace(message, seq=row[0]), False
        original = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE session_id = ? AND sender = ? AND client_id = ?",
            (message.session_id, message.sender, message.client_id),
        ).fetchone()
        if original is None:  # ignored for another reason (an id collision): refuse it
            raise sqlite3.IntegrityError("message not inserted")
        return _message_from_row(original), True

    def _edit_message(self, conn: sqlite3.Connection, request: m.EditMessage) -> ChatMessage:
        current = self._get_message(conn, request.session_id, request.message_id)
        if current.sender != request.editor:
            raise Forbidden("only the sender may edit a message")
        if current.deleted:
            raise Conflict("the message was deleted", state="deleted")
        conn.execute(
            "UPDATE messages SET body = ?, edited_at = ? WHERE id = ?",
            (request.body, request.at, current.id),
        )
        return self._get_message(conn, request.session_id, request.message_id)

    def _delete_message(self, conn: sqlite3.Connection, request: m.DeleteMessage) -> ChatMessage:
        current = self._get_message(conn, request.session_id, request.message_id)
        if current.sender != request.by and not request.as_admin:
            raise Forbidden("only the sender or an admin may delete a message")
        conn.execute(
            "UPDATE messages SET body = NULL, deleted = 1, edited_at = COALESCE(edited_at, ?)"
            " WHERE id = ?",
            (request.at, current.id),
        )
        return self._get_message(conn, request.session_id, request.message_id)

    def _raise_mark(self, conn: sqlite3.Connection, request: m.RaiseMark) -> Marks:
        read = request.seq if request.kind == "read" else 0
        conn.execute(
            "INSERT INTO marks (session_id, user_id, delivered_seq, read_seq) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (session_id, user_id) DO UPDATE SET"
            " delivered_seq = MAX(delivered_seq, excluded.delivered_seq),"
            " read_seq = MAX(read_seq, excluded.read_seq)",
            (request.session_id, request.user, request.seq, read),
        )
        return self._get_marks(conn, request.session_id, request.user)

    def _reconcile(self, conn: sqlite3.Connection, now: int) -> tuple[str, ...]:
        """After a restart: segments stop at their last checkpoint; the gap is on the timeline."""
        rows = conn.execute(
            "SELECT b.session_id, b.checkpoint_at FROM billing b JOIN sessions s"
            " ON s.id = b.session_id WHERE s.state = 'active' AND b.open = 1"
        ).fetchall()
        for session_id, checkpoint_at in rows:
            conn.execute("UPDATE billing SET open = 0 WHERE session_id = ?", (session_id,))
            self._append_timeline(
                conn,
                (
                    TimelineEntry(
                        session_id=session_id,
                        at=now,
                        kind=BILLING_GAP,
                        actor="server",
                        detail={"from": checkpoint_at, "to": now, "reason": "server restart"},
                    ),
                ),
            )
        active = conn.execute("SELECT id FROM sessions WHERE state = 'active'").fetchall()
        return tuple(row[0] for row in active)

    # ---------------------------------------------------------------- reads

    def read(self, conn: sqlite3.Connection, request: m.ReadRequest) -> Any:
        match request:
            case m.GetSession(session_id=session_id):
                return self._get_session(conn, session_id)
            case m.ListSessions():
                return self._list_sessions(conn, request)
            case m.GetMessages():
                return self._get_messages(conn, request)
            case m.GetMessage(session_id=session_id, message_id=message_id):
                return self._get_message(conn, session_id, message_id)
            case m.GetChatState(session_id=session_id, user=user):
                row = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id = ?",
                    (session_id,),
                ).fetchone()
                return row[0], self._get_marks(conn, session_id, user)
            case m.GetBilling(session_id=session_id):
                return self._get_billing(conn, session_id)
            case m.GetTimeline(session_id=session_id, limit=limit):
                rows = conn.execute(
                    "SELECT session_id, at, kind, actor, detail FROM timeline"
                    " WHERE session_id = ? ORDER BY id LIMIT ?",
                    (session_id, limit),
                ).fetchall()
                return tuple(
                    TimelineEntry(
                        session_id=r[0], at=r[1], kind=r[2], actor=r[3], detail=orjson.loads(r[4])
                    )
                    for r in rows
                )
            case m.GetIdempotentReply(user=user, route=route, key=key):
                row = conn.execute(
                    "SELECT status, body FROM idempotency WHERE user_id = ? AND route = ? AND key = ?",
                    (user, route, key),
                ).fetchone()
                return None if row is None else (row[0], bytes(row[1]))
            case m.ProbeRead():
                conn.execute("SELECT 1").fetchone()
                return None
        raise TypeError(f"unknown read request {request!r}")

    def _get_session(self, conn: sqlite3.Connection, session_id: str) -> SessionRecord:
        row = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no session {session_id}")
        return _session_from_row(row)

    def _list_sessions(self, conn: sqlite3.Connection, request: m.ListSessions) -> Any:
        clauses, params = [], []
        if request.user is not None:
            source = (
                f"SELECT {', '.join('s.' + c.strip() for c in _SESSION_COLUMNS.split(','))}"
                " FROM participants p JOIN sessions s ON s.cursor = p.cursor WHERE p.user_id = ?"
            )
            params.append(request.user)
            prefix = "s."
        else:
            source = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE 1 = 1"
            prefix = ""
        if request.state is not None:
            clauses.append(f"{prefix}state = ?")
            params.append(request.state)
        if request.cursor is not None:
            clauses.append(f"{prefix}cursor < ?")
            params.append(request.cursor)
        sql = source + "".join(f" AND {c}" for c in clauses)
        sql += f" ORDER BY {prefix}cursor DESC LIMIT ?"
        params.append(request.limit + 1)
        rows = conn.execute(sql, params).fetchall()
        page = rows[: request.limit]
        next_cursor = page[-1][14] if len(rows) > request.limit else None
        return tuple(_session_from_row(r) for r in page), next_cursor

    def _get_messages(self, conn: sqlite3.Connection, request: m.GetMessages) -> Any:
        if request.before_seq is not None:
            lower = request.after_seq if request.after_seq is not None else 0
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ?"
                " AND seq < ? AND seq > ? ORDER BY seq DESC LIMIT ?",
                (request.session_id, request.before_seq, lower, request.limit),
            ).fetchall()
            rows.reverse()
        else:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ?"
                " AND seq > ? ORDER BY seq LIMIT ?",
                (request.session_id, request.after_seq or 0, request.limit),
            ).fetchall()
        return tuple(_message_from_row(r) for r in rows)

    def _get_message(self, conn: sqlite3.Connection, session_id: str, message_id: str) -> ChatMessage:
        row = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ? AND session_id = ?",
            (message_id, session_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no message {message_id} in session {session_id}")
        return _message_from_row(row)

    def _get_marks(self, conn: sqlite3.Connection, session_id: str, user: str) -> Marks:
        row = conn.execute(
            "SELECT delivered_seq, read_seq FROM marks WHERE session_id = ? AND user_id = ?",
            (session_id, user),
        ).fetchone()
        return Marks() if row is None else Marks(delivered_seq=row[0], read_seq=row[1])

    def _get_billing(self, conn: sqlite3.Connection, session_id: str) -> m.BillingState | None:
        row = conn.execute(
            "SELECT rate_per_minute, currency, segments, open, checkpoint_at, final FROM billing"
            " WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            return None
        return m.BillingState(
            session_id=session_id,
            rate_per_minute=row[0],
            currency=row[1],
            segments=tuple((s, e) for s, e in orjson.loads(row[2] or "[]")),
            open=bool(row[3]),
            checkpoint_at=row[4],
            final=bool(row[5]),
        )
