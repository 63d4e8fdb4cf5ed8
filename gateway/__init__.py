"""The edges of Parley: the TCP listener, the WebSocket wire format, auth and the REST app."""
