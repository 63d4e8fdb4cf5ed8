"""Parley adapter for the shared load generator (../shared/bench/relaybench.py).

    relaybench.py load --adapter bench/parley_adapter.py:ParleyAdapter \
        --adapter-opt map=/tmp/x/relay-map.json --url ws://127.0.0.1:PORT --pairs 200

relaybench names its peers `<run tag>w<worker>p<pair>a|b` (load mode) or `<run tag>i<n>`
(idle mode); the run tag is random, so the adapter drops it: user `w0p0007a` is the payer
and `w0p0007b` the provider of pair `w0p0007`'s session (`i00006`/`i00007` share `i00003`).
Sessions and tokens are made before the load (`run_all.py` writes the map file):

    {"users": {"w0p0007a": "<JWT>", ...}, "sessions": {"w0p0007": "<session id>", ...}}

A connection sends `hello` with its token, awaits `welcome`, joins its pair's session and
awaits the join's `ok`; then A's offers and B's answers are `signal` frames to the peer.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlsplit

RELAY, CONTROL, ERROR = 0, 1, 2  # the kinds relaybench.parse() must return
HANDSHAKE_FRAMES = 50  # frames read while waiting for welcome / the join's ok

_PAIR_PEER = re.compile(r"(w\d+p\d+)([ab])$")
_IDLE_PEER = re.compile(r"i(\d+)$")
_loads = json.loads


def user_of(peer_id: str) -> str:
    """relaybench peer id (with or without its run tag) → Parley user."""
    found = _PAIR_PEER.search(peer_id)
    if found:
        return found.group(1) + found.group(2)
    found = _IDLE_PEER.search(peer_id)
    if found:
        return "i" + found.group(1)
    raise ValueError(f"parley adapter: cannot map peer id {peer_id!r} to a user")


def pair_of(user: str) -> str:
    """Parley user → the key of the session its pair shares."""
    found = _PAIR_PEER.fullmatch(user)
    if found:
        return found.group(1)
    found = _IDLE_PEER.fullmatch(user)
    if found:
        n = int(found.group(1))
        return f"i{n // 2:0{len(found.group(1))}d}"
    raise ValueError(f"parley adapter: {user!r} belongs to no pair")


class ParleyAdapter:
    name = "parley"
    heartbeat_interval: float | None = None  # the server pings; websockets answers by itself
    heartbeat_msg: str | None = None

    def __init__(self, options: dict[str, str]) -> None:
        self.options = options
        path = options.get("map")
        if not path:
            raise SystemExit("parley adapter: pass --adapter-opt map=FILE (written by bench/run_all.py)")
        with open(path) as fh:
            data = json.load(fh)
        self.tokens: dict[str, str] = data["users"]
        self.sessions: dict[str, str] = data["sessions"]
        self._prefix: dict[str, str] = {}  # peer id → the frame up to "payload":

    def url(self, base: str, peer_id: str) -> str:
        # the query names the user so that handshake() (which only gets the socket) knows it;
        # the token itself goes in the hello frame, as a browser would send it
        return f"{base.rstrip('/')}/ws?peer={user_of(peer_id)}"

    async def handshake(self, ws) -> None:
        user = parse_qs(urlsplit(ws.request.path).query)["peer"][0]
        token = self.tokens.get(user)
        if token is None:
            raise RuntimeError(f"no token for {user} in the map file")
        await ws.send(json.dumps({"type": "hello", "token": token}))
        await self._expect(ws, lambda m: m.get("type") == "welcome", "welcome")
        session = self.sessions[pair_of(user)]
        await ws.send(json.dumps({"type": "join", "session": session, "ref": "join"}))
        reply = await self._expect(ws, lambda m: m.get("ref") == "join", "join reply")
        if reply.get("type") != "ok":
            raise RuntimeError(f"join refused: {reply.get('code')}")

    @staticmethod
    async def _expect(ws, wanted, what: str) -> dict:
        for _ in range(HANDSHAKE_FRAMES):
            message = _loads(await ws.recv())
            if message.get("type") == "error" and message.get("ref") is None:
                raise RuntimeError(f"{what}: {message.get('code')}")
            if wanted(message):
                return message
        raise RuntimeError(f"no {what} within {HANDSHAKE_FRAMES} frames")

    def _frame_prefix(self, dst: str, kind: str) -> str:
        key = dst + kind
        prefix = self._prefix.get(key)
        if prefix is None:
            user = user_of(dst)
            session = self.sessions[pair_of(user)]
            prefix = ('{"type":"signal","session":"' + session + '","to":"' + user
                      + '","kind":"' + kind + '","payload":')
            self._prefix[key] = prefix
        return prefix

    def offer(self, dst: str, payload: str) -> str:
        return self._frame_prefix(dst, "offer") + payload + "}"

    def answer(self, dst: str, payload: str) -> str:
        return self._frame_prefix(dst, "answer") + payload + "}"

    def parse(self, raw):
        message = _loads(raw)
        kind = message.get("type")
        if kind == "signal":
            return RELAY, message["from"], message["payload"]
        if kind == "error":
            return ERROR, None, "server:" + str(message.get("code"))
        return CONTROL, None, message


def write_map(path, pairs: int, session_ids: list[str], tokens: dict[str, str], *, worker: int = 0) -> None:
    """The map file for `pairs` load pairs of relaybench worker `worker` (pair i ↔ session_ids[i])."""
    sessions = {f"w{worker}p{i:04d}": session_ids[i] for i in range(pairs)}
    with open(path, "w") as fh:
        json.dump({"users": tokens, "sessions": sessions}, fh)
