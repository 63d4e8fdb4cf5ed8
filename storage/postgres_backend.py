"""PostgreSQL (`PARLEY_DATABASE_URL=postgresql://…`), and the only module that imports psycopg.

psycopg 3's synchronous API, from the storage actor's worker threads (its async API
runs on asyncio, not Trio). Like SQLite, the actor holds one writer connection and
one reader connection; both are in autocommit mode, so a read is one statement's
snapshot and the actor's BEGIN … COMMIT frames each write batch (READ COMMITTED).
Chat numbering takes the session row's lock (`sql.py`), so writers on other
connections, or other nodes, cannot interleave a `seq`. The requests themselves
are in `sql.py`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from domain.errors import BadRequest, Internal, StorageUnavailable

from .schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION
from .sql import SqlBackend

log = logging.getLogger("parley.storage")

MIGRATION_LOCK = "parley.schema"  # pg_advisory_xact_lock(hashtext(…)) key: one migrator at a time
CONNECT_TIMEOUT = 10  # seconds, unless the URL says otherwise


def migrate(conn: psycopg.Connection) -> int:
    """Apply every migration newer than the database, in one transaction under an advisory
    lock: nodes starting together wait for the first, then find nothing left to do."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        version = 0 if row is None else row[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema v{version} is newer than this server (v{SCHEMA_VERSION})"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(POSTGRES_MIGRATIONS[number - 1])
        if version < SCHEMA_VERSION:
            conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
            log.info("database schema migrated from v%d to v%d", version, SCHEMA_VERSION)
    return SCHEMA_VERSION


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    return sql.replace("?", "%s")  # the shared SQL has no literal `?` or `%`


def describe(url: str) -> str:
    """Where a URL points, without its password: for log lines."""
    params = conninfo_to_dict(url)
    return f"{params.get('dbname', '?')} on {params.get('host', 'localhost')}:{params.get('port', 5432)}"


class PostgresBackend(SqlBackend):
    """Opens connections and answers requests. Holds no state besides its settings."""

    def __init__(self, url: str) -> None:
        self.url = url

    @contextmanager
    def driver_errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.IntegrityError as exc:
            log.error("the database refused a write: %s", exc)
            raise Internal("the write was refused by the database") from exc
        except psycopg.DataError as exc:  # a NUL character in text, an integer beyond 64 bits
            raise BadRequest(f"a value the database cannot store: {exc}") from exc
        except psycopg.Error as exc:  # unreachable, restarted, read-only, disk full, deadlock, ...
            raise StorageUnavailable(f"storage unavailable: {exc}") from exc

    def _connect(self, *, writer: bool) -> psycopg.Connection:
        given = conninfo_to_dict(self.url)
        defaults: dict[str, str | int] = {"connect_timeout": CONNECT_TIMEOUT, "application_name": "parley"}
        conninfo = make_conninfo(self.url, **{k: v for k, v in defaults.items() if k not in given})
        conn = psycopg.connect(conninfo, autocommit=True)
        if writer:
            try:
                version = migrate(conn)
            except BaseException:
                conn.close()
                raise
            log.info("storage: PostgreSQL database %s, schema v%d", describe(self.url), version)
        return conn

    def _execute(self, conn: psycopg.Connection, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        return conn.execute(_placeholders(sql), params or None)

    def _executemany(self, conn: psycopg.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        with conn.cursor() as cursor:
            cursor.executemany(_placeholders(sql), rows)
            return cursor.rowcount

    def _in_transaction(self, conn: psycopg.Connection) -> bool:
        status = conn.info.transaction_status
        return status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
