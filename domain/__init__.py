"""Sans-IO core of Parley: records, rules and arithmetic shared by every actor.

Nothing here awaits, opens a socket or touches a database; the actors in
`actors/`, the edges in `gateway/` and the database code in `storage/` build on it.
"""
