"""The webhook tables (schema v3), for each database: endpoints, the outbox of events, and
one delivery row per (event, endpoint) with its attempts. `storage/schema.py` lists them."""

from __future__ import annotations

import sqlite_utils

_INDEXES = """
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
    CREATE INDEX webhook_deliveries_queue ON webhook_deliveries (endpoint_id, session_id, status, id);
    CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, id);
"""


def sqlite_v3_webhooks(db: sqlite_utils.Database) -> None:
    for statement in (
        """CREATE TABLE webhook_endpoints (
            cursor INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            url TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            events TEXT NOT NULL,
            secret TEXT NOT NULL,
            previous_secret TEXT,
            previous_secret_until INTEGER,
            enabled INTEGER NOT NULL DEFAULT 1,
            disabled_reason TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )""",
        """CREATE TABLE webhook_events (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            session_id TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            body BLOB NOT NULL
        )""",
        """CREATE TABLE webhook_deliveries (
            id INTEGER PRIMARY KEY,
            event_seq INTEGER NOT NULL,
            endpoint_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at INTEGER,
            last_attempt_at INTEGER,
            last_status INTEGER,
            last_error TEXT,
            delivered_at INTEGER,
            created_at INTEGER NOT NULL
        )""",
        *[s for s in _INDEXES.split(";") if s.strip()],
    ):
        db.execute(statement)


POSTGRES_V3_WEBHOOKS = """
    CREATE TABLE webhook_endpoints (
        cursor bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        url text NOT NULL,
        description text NOT NULL DEFAULT '',
        events text NOT NULL,
        secret text NOT NULL,
        previous_secret text,
        previous_secret_until bigint,
        enabled boolean NOT NULL DEFAULT TRUE,
        disabled_reason text,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL
    );
    CREATE TABLE webhook_events (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        type text NOT NULL,
        session_id text NOT NULL,
        created_at bigint NOT NULL,
        body bytea NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_seq bigint NOT NULL REFERENCES webhook_events (seq),
        endpoint_id text NOT NULL,
        session_id text NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at bigint,
        last_attempt_at bigint,
        last_status integer,
        last_error text,
        delivered_at bigint,
        created_at bigint NOT NULL
    );
""" + _INDEXES
