"""Parley's command line.

    python run.py [serve] [--host H] [--port P] [--data-dir D] [--dev] ...
    python run.py token USER [--admin] [--ttl SECONDS] [--data-dir D]

Every `serve` flag has a PARLEY_* environment variable (flags win).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from pathlib import Path

import trio

from actors.cluster.errors import ClusterRefused
from domain.errors import StorageUnavailable
from domain.settings import Settings
from gateway.origins import parse_allowed


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PARLEY_{name}", default)


def _env_bool(name: str) -> bool:
    return (_env(name) or "").lower() in ("1", "true", "yes", "on")


def _urls(value: str | None) -> tuple[str, ...]:
    return tuple(u.strip() for u in (value or "").split(",") if u.strip())


class RedactTokens(logging.Filter):
    """No log line carries a query-string token (PRODUCT.md section 8), whoever logs it."""

    PATTERN = re.compile(r"(token=)[^&\s'\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self.PATTERN.sub(r"\1[redacted]", message), None
        return True


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="run.py", description="Parley: signaling, chat and billing for paid calls.")
    sub = parser.add_subparsers(dest="command")

    def add_data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default=_env("DATA_DIR", str(defaults.data_dir)),
                       help="database and generated secret (PARLEY_DATA_DIR; default ./data)")

    serve = sub.add_parser("serve", help="run the server (the default)")
    for p in (parser, serve):
        p.add_argument("--host", default=_env("HOST", defaults.host), help="PARLEY_HOST (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=int(_env("PORT", str(defaults.port))),
                       help="PARLEY_PORT; 0 picks a free port (default 8080)")
        add_data_dir(p)
        p.add_argument("--database-url", default=_env("DATABASE_URL"),
                       help="postgresql://… to keep everything in PostgreSQL instead of SQLite in the data dir"
                            " (PARLEY_DATABASE_URL)")
        p.add_argument("--dev", action="store_true", default=_env_bool("DEV"),
                       help="development mode: the demo page may mint tokens (PARLEY_DEV=1)")
        p.add_argument("--heartbeat", type=float, default=float(_env("HEARTBEAT", str(defaults.heartbeat))),
                       help="seconds between WebSocket pings (PARLEY_HEARTBEAT)")
        p.add_argument("--orphan-timeout", type=float,
                       default=float(_env("ORPHAN_TIMEOUT", str(defaults.orphan_timeout))),
                       help="end an active session nobody joined for this long (PARLEY_ORPHAN_TIMEOUT)")
        p.add_argument("--billing-tick", type=float,
                       default=float(_env("BILLING_TICK", str(defaults.billing_tick))),
                       help="seconds between billing events and checkpoints (PARLEY_BILLING_TICK)")
        p.add_argument("--storage-batch", type=int,
                       default=int(_env("STORAGE_BATCH", str(defaults.storage_batch))),
                       help="most writes per transaction (PARLEY_STORAGE_BATCH)")
        p.add_argument("--frames-per-second", type=float,
                       default=float(_env("FRAMES_PER_SECOND", str(defaults.frames_per_second))),
                       help="sustained frames a connection may send per second (PARLEY_FRAMES_PER_SECOND)")
        p.add_argument("--max-connections-per-user", type=int,
                       default=int(_env("MAX_CONNECTIONS_PER_USER", str(defaults.max_connections_per_user))),
                       help="open WebSockets per user (PARLEY_MAX_CONNECTIONS_PER_USER)")
        p.add_argument("--max-connections-per-address", type=int,
                       default=int(_env("MAX_CONNECTIONS_PER_ADDRESS", str(defaults.max_connections_per_address))),
                       help="open TCP connections per client IP, 0 for no limit (PARLEY_MAX_CONNECTIONS_PER_ADDRESS)")
        p.add_argument("--max-connections", type=int,
                       default=int(_env("MAX_CONNECTIONS", str(defaults.max_connections))),
                       help="open TCP connections in all; 0: the open-file limit less a reserve (PARLEY_MAX_CONNECTIONS)")
        p.add_argument("--keep-alive-timeout", type=float,
                       default=float(_env("KEEP_ALIVE_TIMEOUT", str(defaults.http_keep_alive_timeout))),
                       help="seconds an idle HTTP keep-alive connection stays open (PARLEY_KEEP_ALIVE_TIMEOUT)")
        p.add_argument("--rest-writes-per-second", type=float,
                       default=float(_env("REST_WRITES_PER_SECOND", str(defaults.rest_writes_per_second))),
                       help="sustained REST writes per non-admin user (PARLEY_REST_WRITES_PER_SECOND)")
        p.add_argument("--allowed-origins", default=_env("ALLOWED_ORIGINS", ""),
                       help="browser origins allowed besides the server's own, comma-separated; "
                            "entries may end in :* (PARLEY_ALLOWED_ORIGINS)")
        p.add_argument("--turn-ttl", type=int, default=int(_env("TURN_TTL", str(defaults.turn_ttl))),
                       help="seconds TURN credentials stay valid (PARLEY_TURN_TTL)")
        p.add_argument("--allow-private-webhooks", action="store_true", default=_env_bool("ALLOW_PRIVATE_WEBHOOKS"),
                       help="webhook endpoints may be on loopback/private addresses (PARLEY_ALLOW_PRIVATE_WEBHOOKS=1)")
        p.add_argument("--log-level", default=_env("LOG_LEVEL", defaults.log_level))
        p.add_argument("--node-id", default=_env("NODE_ID"),
                       help="cluster mode: this node's id, unique among live nodes (PARLEY_NODE_ID; default generated)")
        p.add_argument("--lease-ttl", type=float, default=float(_env("LEASE_TTL", str(defaults.lease_ttl))),
                       help="cluster mode: seconds a node's lease outlives its last renewal (PARLEY_LEASE_TTL)")

    token = sub.add_parser("token", help="print a token signed with the server's secret")
    token.add_argument("user")
    token.add_argument("--admin", action="store_true")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    add_data_dir(token)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir),
        secret=_env("SECRET") or None,
        dev=args.dev,
        heartbeat=args.heartbeat,
        orphan_timeout=args.orphan_timeout,
        billing_tick=args.billing_tick,
        storage_batch=args.storage_batch,
        turn_secret=_env("TURN_SECRET") or None,
        turn_urls=_urls(_env("TURN_URLS")),
        stun_urls=_urls(_env("STUN_URLS")),
        turn_ttl=args.turn_ttl,
        allow_private_webhooks=args.allow_private_webhooks,
        frames_per_second=args.frames_per_second,
        frame_burst=max(1, int(args.frames_per_second * 4)),
        max_connections_per_user=args.max_connections_per_user,
        max_connections_per_address=args.max_connections_per_address,
        max_connections=args.max_connections,
        http_keep_alive_timeout=args.keep_alive_timeout,
        rest_writes_per_second=args.rest_writes_per_second,
        rest_write_burst=max(1, int(args.rest_writes_per_second * 4)),
        allowed_origins=parse_allowed(args.allowed_origins),
        redis_url=_env("REDIS_URL") or None,
        node_id=args.node_id or None,
        lease_ttl=args.lease_ttl,
        database_url=args.database_url or None,
        log_level=args.log_level,
    )


async def _serve(settings: Settings) -> None:
    from gateway.server import serve

    shutdown = trio.Event()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logging.getLogger("parley").info("received %s", signal.Signals(signum).name)
                shutdown.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        await serve(settings, shutdown=shutdown)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        from gateway.auth import load_or_create_secret, mint_token

        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
        secret = load_or_create_secret(Path(args.data_dir), _env("SECRET") or None)
        print(mint_token(secret, args.user, admin=args.admin, ttl=args.ttl))
        return 0
    settings = settings_from(args)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactTokens())
    from gateway.listener import raise_open_file_limit

    before, after = raise_open_file_limit()
    log = logging.getLogger("parley")
    if after != before:
        log.info("open-file limit raised from %d to %d (the hard limit)", before, after)
    else:
        log.info("open-file limit: %d", after)
    if settings.redis_url and not settings.database_url:
        logging.getLogger("parley").error(
            "PARLEY_REDIS_URL (cluster mode) needs PARLEY_DATABASE_URL=postgresql://… shared by every node"
        )
        return 2
    if settings.database_url and not settings.database_url.startswith(("postgresql://", "postgres://")):
        logging.getLogger("parley").error("PARLEY_DATABASE_URL must be a postgresql:// URL")
        return 2
    tune_garbage_collector(log)
    failed: list[BaseException] = []
    try:
        trio.run(_serve, settings)
    except* (StorageUnavailable, ClusterRefused) as group:  # the database or the cluster refused at start
        failed.extend(_leaves(group))
    for reason in failed:
        logging.getLogger("parley").error("cannot start: %s", reason)
    return 1 if failed else 0


# Young generations big enough that what a request or a frame allocates dies young, instead
# of reaching the old generation and paying for full collections: with CPython's defaults
# (700, 10, 10) a server holding a few thousand connections spent about a quarter of its CPU
# in the collector, in pauses of up to a second (bench/README.md, performance pass 2). Full
# collections still run by CPython's own rule (when the old generation grew by a quarter), so
# cyclic garbage from closed connections is still collected.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_garbage_collector(log: logging.Logger) -> None:
    """Before serving: everything loaded at start-up leaves the collector's scans for good
    (`gc.freeze`), and the young generations get `GC_THRESHOLDS`."""
    import gc

    import gateway.server  # noqa: F401  (load the whole server before freezing)

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info("garbage collector: %d start-up objects frozen, thresholds %s", gc.get_freeze_count(), GC_THRESHOLDS)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [leaf for e in group.exceptions for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]


if __name__ == "__main__":
    sys.exit(main())
