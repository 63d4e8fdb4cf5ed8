"""The only code that touches a database.

`actor.py` is the storage actor (one writer task, group commit; reads beside it),
`messages.py` the requests it takes, `schema.py` the versioned schema, `sql.py`
every request in SQL both databases speak, and `sqlite_backend.py` /
`postgres_backend.py` the drivers behind the actor's `Backend` protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from domain.settings import Settings

    from .actor import Backend


def backend_for(settings: Settings) -> Backend:
    """PostgreSQL when `database_url` is set, else SQLite in the data directory."""
    if settings.database_url:
        from .postgres_backend import PostgresBackend

        return PostgresBackend(settings.database_url)
    from .sqlite_backend import SqliteBackend

    return SqliteBackend(settings.database_path, synchronous=settings.sqlite_synchronous)
