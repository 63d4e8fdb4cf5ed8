"""The wire protocol: sans-IO encode and decode of what crosses the edges."""
