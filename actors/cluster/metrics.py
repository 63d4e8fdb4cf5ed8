"""Cluster metrics, on the same registry as the rest (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from domain.metrics import REGISTRY

OWNED = Gauge("parley_cluster_owned_sessions", "Sessions this node owns (claimed, actor running)", registry=REGISTRY)
FORWARDED = Counter(
    "parley_cluster_forwarded", "Messages sent to other nodes' inboxes", ["kind"], registry=REGISTRY
)
RECEIVED = Counter("parley_cluster_received", "Messages read from this node's inbox", ["kind"], registry=REGISTRY)
DROPPED = Counter(
    "parley_cluster_dropped", "Cross-node messages dropped because the outbound queue was full", registry=REGISTRY
)
TAKEOVERS = Counter("parley_cluster_takeovers", "Sessions claimed from a node whose lease expired", registry=REGISTRY)
LEASE_LOST = Counter("parley_cluster_lease_lost", "Times this node's lease could not be renewed in time",
                     registry=REGISTRY)
