"""Cluster mode: several nodes over Redis (routing, presence, leases) and PostgreSQL (all durable state).

    node.py       assembly: what serve() gets instead of the single-process parts
    lease.py      this node's lease in Redis, and which nodes are alive
    ownership.py  claiming a session (Redis compare-and-set, then the epoch in PostgreSQL)
    codec.py      session messages, delivery items and replies as bytes between nodes
    inbox.py      one Redis stream per node: the pipelined sender and the one reader
    delivery.py   `RemoteDelivery`: local connections via the PostOffice, others via their node's inbox
    directory.py  the cluster `SessionDirectory`: routes each message to the owning node
    sweeper.py    dead nodes: their members dropped, their sessions taken over

Active only when PARLEY_REDIS_URL is set (with a postgresql PARLEY_DATABASE_URL);
docs/cluster.md has the design and its failure modes.
"""
