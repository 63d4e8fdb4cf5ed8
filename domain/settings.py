"""Every setting of the server, with its default. Read by run.py from flags and PARLEY_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    secret: str | None = None  # None: generated once and kept in data_dir/secret
    dev: bool = False  # development mode: GET /api/dev/token mints tokens for the demo page
    heartbeat: float = 15.0  # seconds between WebSocket pings; two missed intervals close
    hello_timeout: float = 10.0
    orphan_timeout: float = 120.0
    billing_tick: float = 5.0
    typing_timeout: float = 6.0
    shutdown_grace: float = 5.0
    # limits (PRODUCT.md section 8)
    max_frame_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024
    max_connections_per_user: int = 16
    frames_per_second: float = 50.0  # per connection, token bucket
    frame_burst: int = 200
    outbox_frames: int = 256  # per connection; full → closed 1008 as a slow consumer
    ping_frames_per_second: float = 5.0  # WebSocket ping control frames a client may send
    ping_frame_burst: int = 20
    rest_writes_per_second: float = 10.0  # per non-admin user: POST/PATCH/DELETE under /api
    rest_write_burst: int = 40
    max_connections_per_address: int = 128  # TCP connections per client IP; 0: no limit
    max_connections: int = 0  # TCP connections in all; 0: as many as the open-file limit allows
    http_keep_alive_timeout: float = 5.0  # idle HTTP keep-alive connections are closed after this
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own (empty: dev defaults)
    # storage
    storage_batch: int = 256  # most writes committed in one transaction
    sqlite_synchronous: str = "FULL"
    # TURN (coturn REST-API scheme)
    turn_secret: str | None = None
    turn_urls: tuple[str, ...] = ()
    stun_urls: tuple[str, ...] = ()
    turn_ttl: int = 3600
    # webhooks: endpoints on loopback/private/link-local/metadata addresses (also allowed in dev mode)
    allow_private_webhooks: bool = False
    # cluster: redis_url (with a postgresql database_url) makes this process one node of a cluster
    redis_url: str | None = None
    node_id: str | None = None  # None: generated at start (host name and a random suffix)
    lease_ttl: float = 2.0  # seconds a node's lease lives unrenewed; renewed every third of it
    database_url: str | None = None  # postgresql://…: alone, one node on PostgreSQL instead of SQLite
    log_level: str = "INFO"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "parley.sqlite3"
