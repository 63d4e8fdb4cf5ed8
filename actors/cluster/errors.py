"""Why a node refuses to start in cluster mode (no Redis import here: run.py catches it)."""

from __future__ import annotations


class ClusterRefused(Exception):
    """A setting the cluster needs is missing or disagrees with the cluster's; the message says which."""
