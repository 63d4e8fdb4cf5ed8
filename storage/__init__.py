"""The only code that touches a database.

`actor.py` is the storage actor (one writer task, group commit; reads beside it),
`messages.py` the requests it takes, `schema.py` the versioned schema, and
`sqlite_backend.py` the SQLite implementation of every request. A PostgreSQL
backend would implement the same `Backend` protocol.
"""
