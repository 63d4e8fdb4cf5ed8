"""The actor tree.

    supervise.Supervisor           one per process: registry of live session actors,
     │                              connection counts per user; restarts nothing but sessions
     ├── call_session.CallSession  one per live session: membership, signaling, chat, lifecycle
     │    ├── billing_timer        one per session: wakes the session when billing is due
     │    └── backlog pumps        one per catching-up member: the offline queue
     └── (connections)             connection.run: one per WebSocket, in the listener's nursery

Actors own their state and are reached only through bounded channels (their
`Handle`s). See docs/architecture.md for who may wait on whom.
"""
