"""SQLite: the single-process database, and the only module that imports `sqlite3`.

The storage actor owns one writer connection (all writes, batched into one
transaction each) and one reader connection (WAL lets reads go on beside a
long write batch). Each connection is used by one thread at a time. The
requests themselves are in `sql.py`.

The writer keeps a larger page cache than SQLite's 2 MiB default (a batch of chat
inserts dirties a leaf page per session in each messages index; a cache that
cannot hold them spills to the WAL mid-transaction and reads them back), and
checkpoints the WAL every `WAL_AUTOCHECKPOINT` pages instead of 1,000: each
checkpoint copies pages into the database and fsyncs it, inside a commit, and
pages rewritten between two checkpoints are copied once. Durability is the same
(`synchronous=FULL` fsyncs the WAL at every commit); the WAL grows to about
`WAL_AUTOCHECKPOINT` × 4 KiB between checkpoints.

While the Trio loop is saturated (`few_statements`, see `gil_turns.py`), a run of chat
inserts is sent as three statements over JSON arrays (`json_each`) instead of executemany.
Python's `sqlite3` releases the GIL around every `sqlite3_step` and takes it back after: an
executemany of n rows takes the GIL n times, and beside a saturated loop each take waits for
a turn. One statement is one step, so the writer takes the GIL a few times per batch.
SQLite's JSON parsing makes that form about 10–20 % slower when nothing waits for the GIL,
so it is used only while turns are being given.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import sqlite_utils

from domain.errors import BadRequest, Internal, StorageUnavailable

from .schema import SCHEMA_VERSION, SQLITE_MIGRATIONS
from .sql import SqlBackend

# One statement for a whole run (see the module's docstring). `->>` needs SQLite 3.38, and
# `UPDATE … FROM` 3.33; older libraries keep executemany.
JSON_RUNS = sqlite3.sqlite_version_info >= (3, 38, 0)
BUMP_FROM_JSON = (
    "UPDATE sessions SET last_seq = last_seq + j.value ->> 0 FROM json_each(?) AS j"
    " WHERE sessions.id = j.value ->> 1"
)
BUMP_FENCED_FROM_JSON = BUMP_FROM_JSON + " AND sessions.owner_epoch = j.value ->> 2"
LAST_SEQS_AS_JSON = (
    "SELECT json_group_array(json_array(id, last_seq)) FROM sessions"
    " WHERE id IN (SELECT value FROM json_each(?))"
)
INSERT_FROM_JSON = (
    "INSERT INTO messages (id, session_id, seq, client_id, sender, body, created_at, edited_at, deleted)"
    " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,"
    " NULL, FALSE FROM json_each(?) WHERE TRUE ON CONFLICT (session_id, sender, client_id) DO NOTHING"
)


def _json_array(rows: Sequence[Any]) -> str | None:
    """`rows` as one JSON text for `json_each`, or None when SQLite would not read it back
    exactly: its JSON functions end a string at an escaped NUL (`\\u0000`), which a bound
    parameter keeps (orjson also refuses what no JSON can hold, such as a lone surrogate).
    The test is by substring, so a text holding a literal backslash-u0000 goes the other way
    too: slower, never wrong."""
    try:
        text = orjson.dumps(rows)
    except orjson.JSONEncodeError:
        return None
    if b"\\u0000" in text:
        return None
    return text.decode()

log = logging.getLogger("parley.storage")

WRITER_CACHE_KIB = 64 * 1024  # the writer connection's page cache, at most (SQLite's default: 2 MiB)
WAL_AUTOCHECKPOINT = 10_000  # pages (SQLite's default: 1,000)


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
            SQLITE_MIGRATIONS[number - 1](db)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return SCHEMA_VERSION


class SqliteBackend(SqlBackend):
    """Opens connections and answers requests. Holds no state besides its settings."""

    BEGIN = "BEGIN IMMEDIATE"
    GREATEST = "MAX"

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self.synchronous = synchronous

    @contextmanager
    def driver_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            log.error("the database refused a write: %s", exc)
            raise Internal("the write was refused by the database") from exc
        except sqlite3.Error as exc:  # locked, read-only, disk full, I/O error, closed
            raise StorageUnavailable(f"storage unavailable: {exc}") from exc
        except OverflowError as exc:  # an integer beyond 64 bits, raised while binding it
            raise BadRequest(f"a value the database cannot store: {exc}") from exc

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        if writer:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
            migrate(conn)
        return conn

    def _execute(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return conn.execute(sql, params)

    def _executemany(self, conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return conn.executemany(sql, rows).rowcount

    def _in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def _bump_last_seqs(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], *, fenced: bool,
                        few: bool = False) -> int:
        text = _json_array(rows) if few and JSON_RUNS else None
        if text is None:
            return super()._bump_last_seqs(conn, rows, fenced=fenced)
        return conn.execute(BUMP_FENCED_FROM_JSON if fenced else BUMP_FROM_JSON, (text,)).rowcount

    def _last_seqs(self, conn: sqlite3.Connection, session_ids: list[str], *, few: bool = False) -> list[Any]:
        text = _json_array(session_ids) if few and JSON_RUNS else None
        if text is None:
            return super()._last_seqs(conn, session_ids)
        return orjson.loads(conn.execute(LAST_SEQS_AS_JSON, (text,)).fetchone()[0])  # type: ignore[no-any-return]

    def _insert_message_rows(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], *, few: bool = False) -> int:
        text = _json_array(rows) if few and JSON_RUNS else None
        if text is None:
            return super()._insert_message_rows(conn, rows)
        return conn.execute(INSERT_FROM_JSON, (text,)).rowcount
