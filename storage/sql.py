"""Every storage request in SQL that SQLite and PostgreSQL both speak. Synchronous: runs in
the storage actor's worker threads.

`SqlBackend` implements the `Backend` protocol once: the request handlers, the row
mapping, transactions and savepoints. A driver subclass supplies how to connect, how to
run a statement (SQL here uses `?` placeholders), the few words the dialects spell
differently, and `driver_errors()`: the one place where its driver's exceptions become
domain errors. Every public method runs inside it, so the storage actor sees only
`StorageUnavailable` (the database failed: the batch is rolled back) or another
`ParleyError` (this one request was refused).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson

from domain import session as lifecycle
from domain.billing import amount_minor
from domain.chat import ChatMessage, Marks
from domain.errors import Conflict, Fenced, Forbidden, NotFound, ParleyError
from domain.session import SessionRecord
from domain.timeline import BILLING_GAP, TimelineEntry

from . import messages as m
from . import webhook_messages as w
from .webhooks_sql import WebhookSql

Connection = Any  # the driver's connection; one thread uses it at a time
Row = Sequence[Any]

SESSION_COLUMNS = (
    "id, payer, provider, guests, rate_per_minute, currency, max_amount_minor, state,"
    " created_at, started_at, ended_at, end_reason, metadata, created_by, cursor, owner_node"
)
MESSAGE_COLUMNS = "id, session_id, seq, client_id, sender, body, created_at, edited_at, deleted"
INSERT_MESSAGE = (
    "INSERT INTO messages (id, session_id, seq, client_id, sender, body, created_at, edited_at, deleted)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, FALSE) ON CONFLICT (session_id, sender, client_id) DO NOTHING"
)
NUMBER_MESSAGES = "UPDATE sessions SET last_seq = last_seq + ? WHERE id = ? RETURNING last_seq"
BUMP_LAST_SEQ = "UPDATE sessions SET last_seq = last_seq + ? WHERE id = ?"
BUMP_FENCED_LAST_SEQ = "UPDATE sessions SET last_seq = last_seq + ? WHERE id = ? AND owner_epoch = ?"
LAST_SEQ_CHUNKS = (256, 64, 16, 4, 1)  # ids per `SELECT … IN (…)`: a few statement texts, all cached

P = ParamSpec("P")
T = TypeVar("T")
B = TypeVar("B", bound="SqlBackend")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def session_from_row(row: Row) -> SessionRecord:
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
        owner_node=row[15],
    )


def message_from_row(row: Row) -> ChatMessage:
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


def _session_of(request: m.WriteRequest) -> str | None:
    """The session a fenced write belongs to (None: an empty timeline append writes nothing)."""
    match request:
        case m.AppendTimeline(entries=entries):
            return entries[0].session_id if entries else None
        case m.CheckpointBilling(billing=billing):
            return billing.session_id
        case m.InsertMessage(message=message):
            return message.session_id
    return request.session_id  # type: ignore[union-attr]


@functools.lru_cache(maxsize=None)
def _last_seq_sql(size: int) -> str:
    return f"SELECT id, last_seq FROM sessions WHERE id IN ({', '.join('?' * size)})"


class Regroup(ParleyError):
    """`insert_messages` cannot answer its run by itself (a message already stored, a session
    refused): the storage actor replays the batch one request at a time, which answers it."""


def _mapped(method: Callable[Concatenate[B, P], T]) -> Callable[Concatenate[B, P], T]:
    """Run a public backend method inside its driver's error mapping."""

    @functools.wraps(method)
    def wrapper(self: B, *args: P.args, **kwargs: P.kwargs) -> T:
        with self.driver_errors():
            return method(self, *args, **kwargs)

    return wrapper


class SqlBackend(WebhookSql):
    """The requests, in portable SQL. Holds no state besides its settings (and the webhook
    outbox's commit signal)."""

    BEGIN = "BEGIN"
    GREATEST = "GREATEST"  # the two-argument maximum (SQLite calls it MAX)

    # ---------------------------------------------------------------- the driver's part

    def driver_errors(self) -> AbstractContextManager[None]:
        """Turn the driver's exceptions into `StorageUnavailable` / `Internal`."""
        raise NotImplementedError

    def _connect(self, *, writer: bool) -> Connection:
        raise NotImplementedError

    def _execute(self, conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns a cursor (`fetchone`, `fetchall`)."""
        raise NotImplementedError

    def _executemany(self, conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement for each row; returns how many rows it changed in all."""
        raise NotImplementedError

    def _in_transaction(self, conn: Connection) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- connections, transactions

    @_mapped
    def connect(self, *, writer: bool) -> Connection:
        """A new connection; the writer's first one also migrates the schema."""
        return self._connect(writer=writer)

    @_mapped
    def close(self, conn: Connection) -> None:
        conn.close()

    @_mapped
    def begin(self, conn: Connection) -> None:
        self._execute(conn, self.BEGIN)

    @_mapped
    def commit(self, conn: Connection) -> None:
        self._execute(conn, "COMMIT")
        self.webhook_commits.committed()  # webhooks: wake the delivery actor

    @_mapped
    def rollback(self, conn: Connection) -> None:
        self.webhook_commits.rolled_back()  # webhooks
        if self._in_transaction(conn):
            self._execute(conn, "ROLLBACK")

    @_mapped
    def savepoint(self, conn: Connection) -> None:
        self._execute(conn, "SAVEPOINT request")

    @_mapped
    def rollback_to(self, conn: Connection) -> None:
        self._execute(conn, "ROLLBACK TO SAVEPOINT request")

    @_mapped
    def release(self, conn: Connection) -> None:
        self._execute(conn, "RELEASE SAVEPOINT request")

    # ---------------------------------------------------------------- writes

    @_mapped
    def write(self, conn: Connection, request: m.WriteRequest) -> Any:
        epoch = getattr(request, "epoch", None)
        fenced_session = _session_of(request) if epoch is not None else None
        if fenced_session is not None:
            self._fence(conn, fenced_session, epoch)
        result = self._write(conn, request)
        self._outbox(conn, request, result)  # webhooks: this change's events, in its transaction
        return result

    @_mapped
    def insert_messages(
        self, conn: Connection, requests: Sequence[m.InsertMessage], *, few_statements: bool = False
    ) -> list[tuple[ChatMessage, bool]]:
        """A run of chat inserts, answered as `write` answers each of them in turn, in a few
        statements whatever its length: one executemany bumping each session's `last_seq` once
        by its count of messages (which is also the session's fencing check, and takes its row
        lock as `_insert_message` does), the bumped values read back, one executemany storing
        every row. A `client_id` sent twice in the run is answered as the first one's duplicate.

        Raises `Regroup` (and leaves the transaction to be rolled back) when that is not the
        whole answer: an unknown or fenced session, a message already stored, one session's
        writes with different epochs; or `Internal` when the database refuses a row. The storage
        actor then replays the batch request by request (`write`, each under a savepoint), which
        refuses only the refused ones, each with its own error (`Fenced`, `NotFound`, ...)."""
        plan: dict[str, list[Any]] = {}  # session id -> [messages in the run, epoch, next seq]
        first: dict[tuple[str, str, str], int] = {}  # (session, sender, client_id) -> its first index
        again: dict[int, int] = {}  # index of a repeat -> index of its first
        messages = [request.message for request in requests]
        for index, (request, message) in enumerate(zip(requests, messages)):
            session_id = message.session_id
            entry = plan.get(session_id)
            if entry is None:
                entry = plan[session_id] = [0, request.epoch, 0]
            elif entry[1] != request.epoch:
                raise Regroup(f"writes of session {session_id} carry different epochs")
            seen = first.setdefault((session_id, message.sender, message.client_id), index)
            if seen != index:
                again[index] = seen
            else:
                entry[0] += 1
        # One bump per session (in id order, so two writers lock rows in the same order), then
        # the bumped values read back: the run's first seq of a session is last_seq - count + 1.
        ordered = sorted(plan)
        plain = [(plan[sid][0], sid) for sid in ordered if plan[sid][1] is None]
        fenced = [(plan[sid][0], sid, plan[sid][1]) for sid in ordered if plan[sid][1] is not None]
        if plain and self._bump_last_seqs(conn, plain, fenced=False, few=few_statements) != len(plain):
            raise Regroup("a session of this run is unknown")
        if fenced and self._bump_last_seqs(conn, fenced, fenced=True, few=few_statements) != len(fenced):
            raise Regroup("a session of this run has a newer owner")
        for session_id, last_seq in self._last_seqs(conn, ordered, few=few_statements):
            entry = plan[session_id]
            entry[2] = last_seq - entry[0] + 1
        rows: list[tuple[Any, ...]] = []
        results: list[tuple[ChatMessage, bool]] = []
        for index, message in enumerate(messages):
            if again and index in again:
                original = results[again[index]][0]
                if original.edited_at is not None or original.deleted:  # as the stored row reads
                    original = dataclasses.replace(original, edited_at=None, deleted=False)
                results.append((original, True))
                continue
            entry = plan[message.session_id]
            seq = entry[2]
            entry[2] = seq + 1
            rows.append((message.id, message.session_id, seq, message.client_id, message.sender, message.body,
                         message.created_at))
            results.append((message if message.seq == seq else dataclasses.replace(message, seq=seq), False))
        if self._insert_message_rows(conn, rows, few=few_statements) != len(rows):
            raise Regroup("a message of this run is already stored")
        # Webhooks: a chat insert reports no event (`WebhookSql._events_of`; pinned by
        # tests/storage/test_group_commit.py), so no `_outbox` per message. An insert that did
        # report one would be written here, in the run's transaction, as `write` does.
        return results

    # A run's three statements. Here each is an executemany (or a few `IN (…)` reads); with
    # `few=True` a driver may send each as one statement (`sqlite_backend.py`: over a JSON array).

    def _bump_last_seqs(self, conn: Connection, rows: list[tuple[Any, ...]], *, fenced: bool,
                        few: bool = False) -> int:
        """Add each `(count, session id[, epoch])` to that session's `last_seq` (with `epoch`:
        only while it still owns the session). Returns how many sessions were bumped."""
        return self._executemany(conn, BUMP_FENCED_LAST_SEQ if fenced else BUMP_LAST_SEQ, rows)

    def _insert_message_rows(self, conn: Connection, rows: list[tuple[Any, ...]], *, few: bool = False) -> int:
        """Store each `(id, session_id, seq, client_id, sender, body, created_at)` row unless its
        client id is already stored. Returns how many were stored."""
        return self._executemany(conn, INSERT_MESSAGE, rows)

    def _last_seqs(self, conn: Connection, session_ids: list[str], *, few: bool = False) -> list[Row]:
        """`(id, last_seq)` of each of these sessions, in any order."""
        rows: list[Row] = []
        start = 0
        while start < len(session_ids):
            left = len(session_ids) - start
            size = next(c for c in LAST_SEQ_CHUNKS if c <= left)
            chunk = session_ids[start:start + size]
            rows.extend(self._execute(conn, _last_seq_sql(size), chunk).fetchall())
            start += size
        return rows

    def _write(self, conn: Connection, request: m.WriteRequest) -> Any:
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
                self._execute(
                    conn,
                    "INSERT INTO idempotency (user_id, route, key, status, body)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (request.user, request.route, request.key, request.status, request.body),
                )
                return None
            case m.ReconcileAfterRestart(now=now):
                return self._reconcile(conn, now)
            case m.ClaimSession(session_id=session_id, node=node):
                row = self._execute(
                    conn,
                    "UPDATE sessions SET owner_epoch = owner_epoch + 1, owner_node = ? WHERE id = ?"
                    " RETURNING owner_epoch",
                    (node, session_id),
                ).fetchone()
                if row is None:
                    raise NotFound(f"no session {session_id}")
                return row[0]
            case m.ReleaseSession(session_id=session_id, owner_epoch=epoch):
                self._execute(
                    conn,
                    "UPDATE sessions SET owner_node = NULL WHERE id = ? AND owner_epoch = ?",
                    (session_id, epoch),
                )
                return None
            case m.AgreeSetting(key=key, value=value):
                self._execute(
                    conn, "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value)
                )
                return self._execute(conn, "SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]
            case m.ProbeWrite(at=at):
                self._execute(
                    conn,
                    "INSERT INTO meta (key, value) VALUES ('probe', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(at),),
                )
                return None
            case w.CreateEndpoint() | w.UpdateEndpoint() | w.DeleteEndpoint() | w.ClaimDelivery() | w.RecordAttempt() \
                    | w.RetryDelivery():
                return self._webhook_write(conn, request)
        raise TypeError(f"unknown write request {request!r}")

    def _fence(self, conn: Connection, session_id: str, epoch: int) -> None:
        """Refuse a write of an owner that is no longer the session's owner. The no-op update
        takes the session row's lock until commit, so a claim waits for this write's batch,
        and a write waiting behind a committed claim sees the new epoch (and is refused)."""
        row = self._execute(
            conn, "UPDATE sessions SET owner_epoch = owner_epoch WHERE id = ? AND owner_epoch = ? RETURNING id",
            (session_id, epoch),
        ).fetchone()
        if row is None:
            raise Fenced(f"session {session_id} has a newer owner than epoch {epoch}")

    def _create_session(self, conn: Connection, request: m.CreateSession) -> tuple[SessionRecord, bool]:
        session = request.session
        route = "POST /api/sessions"
        if request.idempotency_key is not None:
            row = self._execute(
                conn,
                "SELECT body FROM idempotency WHERE user_id = ? AND route = ? AND key = ?",
                (session.created_by, route, request.idempotency_key),
            ).fetchone()
            if row is not None:
                return self._get_session(conn, bytes(row[0]).decode()), True
        (cursor,) = self._execute(
            conn,
            "INSERT INTO sessions (id, payer, provider, guests, rate_per_minute, currency,"
            " max_amount_minor, state, created_at, metadata, created_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING cursor",
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
        ).fetchone()
        roles = {session.payer: "payer", session.provider: "provider"}
        for guest in session.guests:
            roles.setdefault(guest, "guest")
        self._executemany(
            conn,
            "INSERT INTO participants (user_id, cursor, session_id, role) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            [(user, cursor, session.id, role) for user, role in roles.items()],
        )
        self._execute(
            conn,
            "INSERT INTO billing (session_id, rate_per_minute, currency, segments, billable_ms,"
            " amount_minor) VALUES (?, ?, ?, '[]', 0, 0)",
            (session.id, session.rate_per_minute, session.currency),
        )
        if request.idempotency_key is not None:
            self._execute(
                conn,
                "INSERT INTO idempotency (user_id, route, key, status, body) VALUES (?, ?, ?, ?, ?)",
                (session.created_by, route, request.idempotency_key, 201, session.id.encode()),
            )
        self._append_timeline(conn, (request.timeline,))
        return session, False

    def _transition(self, conn: Connection, request: m.TransitionSession) -> SessionRecord:
        current = self._get_session(conn, request.session_id)
        changed = lifecycle.apply_transition(
            current, request.name, at_ms=request.at, end_reason=request.end_reason
        )
        self._execute(
            conn,
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

    def _save_billing(self, conn: Connection, billing: m.BillingState) -> None:
        billable = billing.billable_ms
        self._execute(
            conn,
            "UPDATE billing SET segments = ?, billable_ms = ?, amount_minor = ?, open = ?,"
            " checkpoint_at = ?, final = ? WHERE session_id = ? AND NOT final",
            (
                _json([list(s) for s in billing.segments]),
                billable,
                amount_minor(billable, billing.rate_per_minute),
                billing.open,
                billing.checkpoint_at,
                billing.final,
                billing.session_id,
            ),
        )

    def _append_timeline(self, conn: Connection, entries: tuple[TimelineEntry, ...]) -> None:
        if entries:
            self._executemany(
                conn,
                "INSERT INTO timeline (session_id, at, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
                [(e.session_id, e.at, e.kind, e.actor, _json(e.detail)) for e in entries],
            )

    def _insert_message(self, conn: Connection, message: ChatMessage) -> tuple[ChatMessage, bool]:
        # The session row numbers its messages: bumping `last_seq` takes the row's write lock
        # until commit, so concurrent writers (other connections, other nodes) queue up behind
        # it and seqs stay gapless, whatever the session actor's idea of the last one (it goes
        # stale after a write that timed out for its caller but committed).
        numbered = self._execute(conn, NUMBER_MESSAGES, (1, message.session_id)).fetchone()
        if numbered is None:
            raise NotFound(f"no session {message.session_id}")
        inserted = self._execute(
            conn,
            INSERT_MESSAGE + " RETURNING seq",
            (
                message.id,
                message.session_id,
                numbered[0],
                message.client_id,
                message.sender,
                message.body,
                message.created_at,
            ),
        ).fetchone()
        if inserted is not None:
            return dataclasses.replace(message, seq=inserted[0]), False
        # A known (session, sender, client_id): give the number back, answer the original.
        self._execute(
            conn, "UPDATE sessions SET last_seq = last_seq - 1 WHERE id = ?", (message.session_id,)
        )
        original = self._execute(
            conn,
            f"SELECT {MESSAGE_COLUMNS} FROM messages"
            " WHERE session_id = ? AND sender = ? AND client_id = ?",
            (message.session_id, message.sender, message.client_id),
        ).fetchone()
        return message_from_row(original), True

    def _edit_message(self, conn: Connection, request: m.EditMessage) -> ChatMessage:
        current = self._get_message(conn, request.session_id, request.message_id)
        if current.sender != request.editor:
            raise Forbidden("only the sender may edit a message")
        if current.deleted:
            raise Conflict("the message was deleted", state="deleted")
        self._execute(
            conn,
            "UPDATE messages SET body = ?, edited_at = ? WHERE id = ?",
            (request.body, request.at, current.id),
        )
        return self._get_message(conn, request.session_id, request.message_id)

    def _delete_message(self, conn: Connection, request: m.DeleteMessage) -> ChatMessage:
        current = self._get_message(conn, request.session_id, request.message_id)
        if current.sender != request.by and not request.as_admin:
            raise Forbidden("only the sender or an admin may delete a message")
        self._execute(
            conn,
            "UPDATE messages SET body = NULL, deleted = TRUE, edited_at = COALESCE(edited_at, ?)"
            " WHERE id = ?",
            (request.at, current.id),
        )
        return self._get_message(conn, request.session_id, request.message_id)

    def _raise_mark(self, conn: Connection, request: m.RaiseMark) -> Marks:
        read = request.seq if request.kind == "read" else 0
        self._execute(
            conn,
            "INSERT INTO marks (session_id, user_id, delivered_seq, read_seq) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (session_id, user_id) DO UPDATE SET"
            f" delivered_seq = {self.GREATEST}(marks.delivered_seq, excluded.delivered_seq),"
            f" read_seq = {self.GREATEST}(marks.read_seq, excluded.read_seq)",
            (request.session_id, request.user, request.seq, read),
        )
        return self._get_marks(conn, request.session_id, request.user)

    def _reconcile(self, conn: Connection, now: int) -> tuple[str, ...]:
        """After a restart: segments stop at their last checkpoint; the gap is on the timeline."""
        rows = self._execute(
            conn,
            "SELECT b.session_id, b.checkpoint_at FROM billing b JOIN sessions s"
            " ON s.id = b.session_id WHERE s.state = 'active' AND b.open",
        ).fetchall()
        for session_id, checkpoint_at in rows:
            self._execute(conn, "UPDATE billing SET open = FALSE WHERE session_id = ?", (session_id,))
            # a clock stepped back while the server was down must not put the gap before
            # what the session already stored: its instants never go backwards
            resumed = now if checkpoint_at is None else max(now, checkpoint_at)
            detail: dict[str, Any] = {"from": checkpoint_at, "to": resumed, "reason": "server restart"}
            if resumed != now:
                detail["clock_behind_ms"] = resumed - now
            self._append_timeline(
                conn,
                (TimelineEntry(session_id=session_id, at=resumed, kind=BILLING_GAP, actor="server", detail=detail),),
            )
        active = self._execute(conn, "SELECT id FROM sessions WHERE state = 'active'").fetchall()
        return tuple(row[0] for row in active)

    # ---------------------------------------------------------------- reads

    @_mapped
    def read(self, conn: Connection, request: m.ReadRequest) -> Any:
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
                return self._last_seq(conn, session_id), self._get_marks(conn, session_id, user)
            case m.LoadSession(session_id=session_id):
                return self._load_session(conn, session_id)
            case m.GetBilling(session_id=session_id):
                return self._get_billing(conn, session_id)
            case m.GetTimeline(session_id=session_id, limit=limit):
                rows = self._execute(
                    conn,
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
                row = self._execute(
                    conn,
                    "SELECT status, body FROM idempotency WHERE user_id = ? AND route = ? AND key = ?",
                    (user, route, key),
                ).fetchone()
                return None if row is None else (row[0], bytes(row[1]))
            case m.ListActiveOwners():
                rows = self._execute(conn, "SELECT id, owner_node FROM sessions WHERE state = 'active'").fetchall()
                return tuple((r[0], r[1]) for r in rows)
            case m.ProbeRead():
                self._execute(conn, "SELECT 1").fetchone()
                return None
            case w.ListEndpoints() | w.GetEndpoint() | w.ListDeliveries() | w.DueDeliveries():
                return self._webhook_read(conn, request)
        raise TypeError(f"unknown read request {request!r}")

    def _get_session(self, conn: Connection, session_id: str) -> SessionRecord:
        row = self._execute(
            conn, f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no session {session_id}")
        return session_from_row(row)

    def _list_sessions(
        self, conn: Connection, request: m.ListSessions
    ) -> tuple[tuple[SessionRecord, ...], int | None]:
        clauses: list[str] = []
        params: list[Any] = []
        if request.user is not None:
            source = (
                f"SELECT {', '.join('s.' + c.strip() for c in SESSION_COLUMNS.split(','))}"
                " FROM participants p JOIN sessions s ON s.cursor = p.cursor WHERE p.user_id = ?"
            )
            params.append(request.user)
            prefix = "s."
        else:
            source = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE 1 = 1"
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
        rows = self._execute(conn, sql, params).fetchall()
        page = rows[: request.limit]
        next_cursor = page[-1][14] if len(rows) > request.limit else None
        return tuple(session_from_row(r) for r in page), next_cursor

    def _get_messages(self, conn: Connection, request: m.GetMessages) -> tuple[ChatMessage, ...]:
        if request.before_seq is not None:
            lower = request.after_seq if request.after_seq is not None else 0
            rows = self._execute(
                conn,
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = ?"
                " AND seq < ? AND seq > ? ORDER BY seq DESC LIMIT ?",
                (request.session_id, request.before_seq, lower, request.limit),
            ).fetchall()
            rows.reverse()
        else:
            rows = self._execute(
                conn,
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = ?"
                " AND seq > ? ORDER BY seq LIMIT ?",
                (request.session_id, request.after_seq or 0, request.limit),
            ).fetchall()
        return tuple(message_from_row(r) for r in rows)

    def _get_message(self, conn: Connection, session_id: str, message_id: str) -> ChatMessage:
        row = self._execute(
            conn,
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ? AND session_id = ?",
            (message_id, session_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no message {message_id} in session {session_id}")
        return message_from_row(row)

    def _last_seq(self, conn: Connection, session_id: str) -> int:
        row = self._execute(
            conn, "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id = ?", (session_id,)
        ).fetchone()
        return row[0]

    def _load_session(self, conn: Connection, session_id: str) -> m.SessionSnapshot:
        session = self._get_session(conn, session_id)
        rows = self._execute(
            conn, "SELECT user_id, delivered_seq, read_seq FROM marks WHERE session_id = ?", (session_id,)
        ).fetchall()
        return m.SessionSnapshot(
            session=session,
            last_seq=self._last_seq(conn, session_id),
            billing=self._get_billing(conn, session_id) if session.state == lifecycle.ACTIVE else None,
            marks=tuple((r[0], Marks(delivered_seq=r[1], read_seq=r[2])) for r in rows),
        )

    def _get_marks(self, conn: Connection, session_id: str, user: str) -> Marks:
        row = self._execute(
            conn,
            "SELECT delivered_seq, read_seq FROM marks WHERE session_id = ? AND user_id = ?",
            (session_id, user),
        ).fetchone()
        return Marks() if row is None else Marks(delivered_seq=row[0], read_seq=row[1])

    def _get_billing(self, conn: Connection, session_id: str) -> m.BillingState | None:
        row = self._execute(
            conn,
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

