"""Storage fixtures: `store` runs a test once on SQLite and once on a real PostgreSQL.

The PostgreSQL server is started once per test run (`initdb` + `pg_ctl`, as an
unprivileged user, on a free port, with its socket in its own temporary directory)
and each test gets a fresh database in it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from storage.actor import Backend
from storage.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from storage.sqlite_backend import SqliteBackend
from tests.conftest import require_system

PG_USER = "parleytest"  # PostgreSQL refuses to run as root


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    return Path(require_system("pg_ctl", "the PostgreSQL backend's tests run a real server")).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    port: int
    directory: Path

    def url(self, database: str) -> str:
        return f"postgresql://parley@127.0.0.1:{self.port}/{database}"

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url("postgres"), autocommit=True)

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _postgres_bin()
    prefix: list[str] = []
    directory = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                           check=True, capture_output=True)
        shutil.chown(directory, PG_USER, PG_USER)
        prefix = ["runuser", "-u", PG_USER, "--"]
    data = directory / "data"
    subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "parley", "--auth=trust",
                    "-E", "UTF8", "--no-sync", "--no-instructions"], check=True, capture_output=True)
    port = _free_port()
    options = (f"-p {port} -k {directory} -c listen_addresses=127.0.0.1"
               " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    started = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
                              "-l", str(directory / "server.log"), "-w", "-t", "60", "start"], capture_output=True)
    if started.returncode != 0:
        log = (directory / "server.log").read_text(errors="replace") if (directory / "server.log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {started.stderr.decode(errors='replace')}\n{log}")
    try:
        yield PostgresServer(port=port, directory=directory)
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


class Store:
    """One test's database, and what tests need to look inside it."""

    kind: str

    def backend(self) -> Backend:
        raise NotImplementedError

    def query(self, sql: str) -> list[tuple]:
        raise NotImplementedError

    def tables(self) -> set[str]:
        raise NotImplementedError

    def schema(self) -> list[tuple]:
        raise NotImplementedError

    def version(self) -> int:
        raise NotImplementedError

    def set_version(self, version: int) -> None:
        raise NotImplementedError

    def migrate_to(self, version: int) -> None:
        """Bring an empty database to an old schema version, as an old server left it."""
        raise NotImplementedError

    def kill(self, conn: Any) -> None:
        """Break one of the storage actor's connections under it, as a failing database does."""
        raise NotImplementedError

    def count(self, table: str) -> int:
        return self.query(f"SELECT COUNT(*) FROM {table}")[0][0]


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def backend(self) -> Backend:
        return SqliteBackend(self.path)

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute(sql).fetchall()

    def tables(self) -> set[str]:
        return {row[0] for row in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def schema(self) -> list[tuple]:
        return sorted(self.query("SELECT type, name, sql FROM sqlite_master"))

    def version(self) -> int:
        return self.query("PRAGMA user_version")[0][0]

    def set_version(self, version: int) -> None:
        self.query(f"PRAGMA user_version = {version}")

    def migrate_to(self, version: int) -> None:
        with sqlite3.connect(self.path, isolation_level=None) as conn:
            for migration in SQLITE_MIGRATIONS[:version]:
                migration(sqlite_utils.Database(conn))
            conn.execute(f"PRAGMA user_version = {version}")

    def kill(self, conn: Any) -> None:
        conn.close()  # its next statement fails: "Cannot operate on a closed database"


class PostgresStore(Store):
    kind = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url

    def backend(self) -> Backend:
        from storage.postgres_backend import PostgresBackend

        return PostgresBackend(self.url)

    def query(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def tables(self) -> set[str]:
        return {row[0] for row in self.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    def schema(self) -> list[tuple]:
        return sorted(self.query(
            "SELECT table_name, column_name, data_type, column_default FROM information_schema.columns"
            " WHERE table_schema = 'public'"
        ) + self.query("SELECT tablename, indexname, indexdef, '' FROM pg_indexes WHERE schemaname = 'public'"))

    def version(self) -> int:
        return self.query("SELECT version FROM schema_version")[0][0]

    def set_version(self, version: int) -> None:
        self.query("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        self.query("DELETE FROM schema_version")
        self.query(f"INSERT INTO schema_version VALUES ({version})")

    def migrate_to(self, version: int) -> None:
        for migration in POSTGRES_MIGRATIONS[:version]:
            self.query(migration)
        self.set_version(version)

    def kill(self, conn: Any) -> None:
        self.query(f"SELECT pg_terminate_backend({conn.info.backend_pid})")  # as a server restart does


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return SqliteStore(tmp_path / "parley.sqlite3")
    return PostgresStore(request.getfixturevalue("postgres_url"))
