"""The versioned schema, for each database.

SQLite keeps the last migration applied in `PRAGMA user_version`, PostgreSQL in
`schema_version`; each backend runs the migrations it lacks at start, in order,
each in its own transaction. Both lists have the same length and the same
meaning at each version. Add new ones at the end and never edit one that has
shipped.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from .webhooks_schema import POSTGRES_V3_WEBHOOKS, sqlite_v3_webhooks


def _v1_initial(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["sessions"].create(
        {
            "cursor": int,  # rowid: insertion order, the list cursor
            "id": str,
            "payer": str,
            "provider": str,
            "guests": str,  # JSON array
            "rate_per_minute": int,
            "currency": str,
            "max_amount_minor": int,
            "state": str,
            "created_at": int,
            "started_at": int,
            "ended_at": int,
            "end_reason": str,
            "metadata": str,  # JSON object
            "created_by": str,
        },
        pk="cursor",
        not_null={"id", "payer", "provider", "rate_per_minute", "currency", "state", "created_at"},
    )
    db["sessions"].create_index(["id"], unique=True)
    db["sessions"].create_index(["state", "cursor"])
    db.execute(
        "CREATE TABLE participants (user_id TEXT NOT NULL, cursor INTEGER NOT NULL,"
        " session_id TEXT NOT NULL, role TEXT NOT NULL,"
        " PRIMARY KEY (user_id, cursor, session_id)) WITHOUT ROWID"
    )
    db["messages"].create(
        {
            "id": str,
            "session_id": str,
            "seq": int,
            "client_id": str,
            "sender": str,
            "body": str,
            "created_at": int,
            "edited_at": int,
            "deleted": int,
        },
        pk="id",
        not_null={"session_id", "seq", "client_id", "sender", "created_at"},
        defaults={"deleted": 0},
    )
    db["messages"].create_index(["session_id", "seq"], unique=True)
    db["messages"].create_index(["session_id", "sender", "client_id"], unique=True)
    db.execute(
        "CREATE TABLE marks (session_id TEXT NOT NULL, user_id TEXT NOT NULL,"
        " delivered_seq INTEGER NOT NULL DEFAULT 0, read_seq INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (session_id, user_id)) WITHOUT ROWID"
    )
    db["billing"].create(
        {
            "session_id": str,
            "rate_per_minute": int,
            "currency": str,
            "segments": str,  # JSON [[start_ms, end_ms], ...]
            "billable_ms": int,
            "amount_minor": int,
            "open": int,
            "checkpoint_at": int,
            "final": int,
        },
        pk="session_id",
        defaults={"open": 0, "final": 0},
    )
    db["timeline"].create(
        {"id": int, "session_id": str, "at": int, "kind": str, "actor": str, "detail": str},
        pk="id",
        not_null={"session_id", "at", "kind", "actor"},
    )
    db["timeline"].create_index(["session_id", "id"])
    db.execute(
        "CREATE TABLE idempotency (user_id TEXT NOT NULL, route TEXT NOT NULL, key TEXT NOT NULL,"
        " status INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (user_id, route, key))"
        " WITHOUT ROWID"
    )


def _v2_numbering_and_epoch(db: sqlite_utils.Database) -> None:
    # `last_seq` numbers a session's messages (its row lock serializes concurrent writers);
    # `owner_epoch` will fence writes from a node that lost ownership (cluster mode).
    db.execute("ALTER TABLE sessions ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE sessions ADD COLUMN owner_epoch INTEGER NOT NULL DEFAULT 0")
    db.execute(
        "UPDATE sessions SET last_seq ="
        " (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE messages.session_id = sessions.id)"
    )


def _v3_owner_node(db: sqlite_utils.Database) -> None:
    # cluster mode: the node that last claimed the session (NULL once it gave it up)
    db.execute("ALTER TABLE sessions ADD COLUMN owner_node TEXT")


SQLITE_MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _v1_initial,
    _v2_numbering_and_epoch,
    sqlite_v3_webhooks,  # storage/webhooks_schema.py
    _v3_owner_node,
)

# PostgreSQL: the same tables, in its own types (epoch milliseconds need bigint).
POSTGRES_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key text PRIMARY KEY, value text);
    CREATE TABLE sessions (
        cursor bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        payer text NOT NULL,
        provider text NOT NULL,
        guests text,
        rate_per_minute bigint NOT NULL,
        currency text NOT NULL,
        max_amount_minor bigint,
        state text NOT NULL,
        created_at bigint NOT NULL,
        started_at bigint,
        ended_at bigint,
        end_reason text,
        metadata text,
        created_by text
    );
    CREATE INDEX sessions_state_cursor ON sessions (state, cursor);
    CREATE TABLE participants (
        user_id text NOT NULL, cursor bigint NOT NULL, session_id text NOT NULL, role text NOT NULL,
        PRIMARY KEY (user_id, cursor, session_id)
    );
    CREATE TABLE messages (
        id text PRIMARY KEY,
        session_id text NOT NULL,
        seq bigint NOT NULL,
        client_id text NOT NULL,
        sender text NOT NULL,
        body text,
        created_at bigint NOT NULL,
        edited_at bigint,
        deleted boolean NOT NULL DEFAULT FALSE,
        UNIQUE (session_id, seq),
        UNIQUE (session_id, sender, client_id)
    );
    CREATE TABLE marks (
        session_id text NOT NULL, user_id text NOT NULL,
        delivered_seq bigint NOT NULL DEFAULT 0, read_seq bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, user_id)
    );
    CREATE TABLE billing (
        session_id text PRIMARY KEY,
        rate_per_minute bigint,
        currency text,
        segments text,
        billable_ms bigint,
        amount_minor bigint,
        open boolean NOT NULL DEFAULT FALSE,
        checkpoint_at bigint,
        final boolean NOT NULL DEFAULT FALSE
    );
    CREATE TABLE timeline (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session_id text NOT NULL,
        at bigint NOT NULL,
        kind text NOT NULL,
        actor text NOT NULL,
        detail text
    );
    CREATE INDEX timeline_session_id ON timeline (session_id, id);
    CREATE TABLE idempotency (
        user_id text NOT NULL, route text NOT NULL, key text NOT NULL,
        status integer NOT NULL, body bytea NOT NULL,
        PRIMARY KEY (user_id, route, key)
    )
    """,
    """
    ALTER TABLE sessions ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN owner_epoch bigint NOT NULL DEFAULT 0;
    UPDATE sessions SET last_seq =
        (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE messages.session_id = sessions.id)
    """,
    POSTGRES_V3_WEBHOOKS,  # storage/webhooks_schema.py
    """
    ALTER TABLE sessions ADD COLUMN owner_node text
    """,
)

SCHEMA_VERSION = len(SQLITE_MIGRATIONS)
assert len(POSTGRES_MIGRATIONS) == SCHEMA_VERSION
