"""The actor tree, and the seams between its actors.

    supervise.Supervisor           one per process: registry of live session actors (the local
     │                              session directory); restarts active sessions, then escalates
     ├── billing_clock.BillingClock one per process: a timer wheel that wakes sessions when billing is due
     ├── session.SessionActor      one per live session: presence, signaling, chat, lifecycle, billing
     ├── webhooks.WebhookActor     one per process: sends the outbox
     └── (connections)             connection.serve: one per WebSocket, in the listener's nursery;
                                   its writer also streams the offline queue (offline_queue.py)

Actors own their state and talk in plain values (ports.py): sessions reach connections
through the `Delivery` port (post_office.py in one process, cluster/ across nodes), and
everybody finds sessions through the `SessionDirectory` port (directory.py). See
docs/architecture.md for who may wait on whom.
"""
