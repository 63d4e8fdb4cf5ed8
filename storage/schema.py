"""The versioned schema. `PRAGMA user_version` names the last migration applied.

Migrations run in order at start, each in its own transaction; add new ones at
the end of `MIGRATIONS` and never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import sqlite_utils


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


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1_initial,)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration newer than the database. Returns the version reached."""
    db = sqlite_utils.Database(conn)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema v{version} is newer than this server (v{SCHEMA_VERSION})"
        )
    for number in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[number - 1](db)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return SCHEMA_VERSION
