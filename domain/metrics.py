"""Prometheus metrics the actors report; gateway serves them at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("parley_connections", "Open WebSocket connections", registry=REGISTRY)
SESSIONS = Gauge("parley_live_sessions", "Session actors alive", registry=REGISTRY)
BILLING_ACTIVE = Gauge("parley_billing_open", "Sessions billing right now", registry=REGISTRY)
FRAMES_IN = Counter("parley_frames_in", "WebSocket frames received", registry=REGISTRY)
FRAMES_OUT = Counter("parley_frames_out", "WebSocket frames sent", registry=REGISTRY)
ERRORS = Counter("parley_errors", "Error replies and closes", ["code"], registry=REGISTRY)
SLOW_CONSUMERS = Counter(
    "parley_slow_consumers", "Connections closed because their outbox filled", registry=REGISTRY
)
SESSION_CRASHES = Counter("parley_session_crashes", "Session actors that crashed", registry=REGISTRY)
CHAT_MESSAGES = Counter("parley_chat_messages", "Chat messages stored", registry=REGISTRY)
STORAGE_BATCH = Histogram(
    "parley_storage_batch_size",
    "Writes committed per transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
STORAGE_QUEUE = Gauge("parley_storage_queue", "Writes waiting for the storage actor", registry=REGISTRY)
WEBHOOKS_SENT = Counter("parley_webhooks_sent", "Webhook deliveries answered 2xx", registry=REGISTRY)
WEBHOOKS_FAILED = Counter(
    "parley_webhooks_failed", "Webhook deliveries given up (after 24 h of retries, or 410 Gone)", registry=REGISTRY
)
WEBHOOKS_RETRIED = Counter(
    "parley_webhooks_retried", "Webhook attempts that failed and were scheduled again", registry=REGISTRY
)
WEBHOOKS_OLDEST_PENDING = Gauge(
    "parley_webhooks_oldest_pending_seconds", "Age of the oldest pending webhook delivery", registry=REGISTRY
)
