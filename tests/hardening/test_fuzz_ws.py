"""Property-based fuzzing of the WebSocket protocol against a real server on a real socket.

Frames are drawn from the wire schemas (protocol/wire.py), then mutated: fields dropped,
wrong types, huge and negative integers, deep nesting, odd Unicode, NaN/Infinity,
duplicate keys. After each frame a `ping` probe must be answered: the only allowed
outcomes are `ok` or an `error` with a defined code, and the connection stays usable.
Seeded (derandomized); PARLEY_FUZZ_EXAMPLES sets the budget (400 by default).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("PARLEY_FUZZ_EXAMPLES", "400"))
CODES = {"bad_request", "unauthorized", "forbidden", "not_found", "not_joined", "conflict", "too_large",
         "rate_limited"}

SCHEMAS: dict[str, dict[str, str]] = {
    "hello": {"token": "str"},
    "join": {"session": "session"},
    "leave": {"session": "session"},
    "signal": {"session": "session", "to": "user", "kind": "signal_kind", "payload": "json"},
    "chat.send": {"session": "session", "client_id": "str", "body": "text"},
    "chat.edit": {"session": "session", "id": "str", "body": "text"},
    "chat.delete": {"session": "session", "id": "str"},
    "chat.receipt": {"session": "session", "kind": "receipt_kind", "seq": "int"},
    "chat.history": {"session": "session", "before_seq": "int", "after_seq": "int", "limit": "int"},
    "typing": {"session": "session", "active": "bool"},
    "session.end": {"session": "session"},
    "ping": {},
}

odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\u0000", "\ud7ff\ue000", "\u202e\u200b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "é" * 300, "\\", '"', "\ufeff"]),
)
huge_ints = st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**40])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)
wrong_types = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(allow_nan=False), odd_text,
                        st.lists(st.integers(), max_size=3), st.just({"x": 1}))


def value_for(kind: str, session: str) -> st.SearchStrategy[Any]:
    return {
        "session": st.sampled_from([session] * 6 + ["no-such-session", ""]) | odd_text,
        "user": st.sampled_from(["bob", "fuzzer", "nobody"]) | odd_text,
        "str": st.sampled_from(["c1", "m1"]) | odd_text,
        "text": st.just("hello") | odd_text | st.just("x" * 8001),
        "int": st.integers(min_value=1, max_value=50) | huge_ints | st.integers(),
        "bool": st.booleans(),
        "valid_int": st.integers(min_value=0, max_value=50),
        "signal_kind": st.sampled_from(["offer", "answer", "candidate", "hangup", "bogus"]),
        "receipt_kind": st.sampled_from(["delivered", "read", "seen"]),
        "json": json_values,
    }[kind]


@st.composite
def frames(draw: st.DrawFn, session: str) -> str:
    type_ = draw(st.sampled_from(sorted(SCHEMAS) * 4) | odd_text)
    fields: dict[str, Any] = {"type": type_}
    if draw(st.booleans()):
        fields["ref"] = draw(st.sampled_from(["r"]) | odd_text | wrong_types)
    for name, kind in SCHEMAS.get(type_, {}).items():
        fields[name] = draw(value_for(kind, session))
    mutation = draw(st.sampled_from(["none"] * 6 + ["drop", "wrong_type", "extra", "deep", "nan", "duplicate",
                                     "not_object", "bytes"]))
    names = [n for n in fields if n != "type"]
    if mutation == "drop" and names:
        del fields[draw(st.sampled_from(names))]
    elif mutation == "wrong_type" and names:
        fields[draw(st.sampled_from(names))] = draw(wrong_types)
    elif mutation == "extra":
        fields[draw(odd_text)] = draw(json_values)
    text = orjson.dumps(fields, option=orjson.OPT_NON_STR_KEYS).decode() if _dumpable(fields) else '{"type":"ping"}'
    if mutation == "deep":
        depth = draw(st.sampled_from([31, 32, 33, 200, 5000, 20000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        depth = min(depth, 9000) if len(opener) > 1 else depth  # stay under the 64 KiB frame limit
        text = text[:-1] + ',"payload":' + opener * depth + "1" + closer * depth + "}"
    elif mutation == "nan":
        text = text[:-1] + ',"seq":' + draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0"])) + "}"
    elif mutation == "duplicate":
        text = text[:-1] + ',"type":' + orjson.dumps(draw(st.sampled_from(sorted(SCHEMAS)))).decode() + "}"
    elif mutation == "not_object":
        text = draw(st.sampled_from(["[]", "null", "1", '"ping"', "{", "}", "", "{}"]))
    return text


def _dumpable(value: Any) -> bool:
    try:
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        return True
    except TypeError:  # integers past 64 bits: written by hand below
        return False


async def test_fuzzed_frames_get_ok_or_a_defined_error_and_nothing_breaks(make_server):
    server = await make_server(frames_per_second=100_000.0, frame_burst=100_000)
    session = await server.create_session(payer="fuzzer", provider="bob")
    probes = itertools.count()
    outcomes: dict[str, int] = {}

    async with server.client("fuzzer") as client:

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def check(data: st.DataObject) -> None:
            frame = data.draw(frames(session["id"]))
            trio.from_thread.run(send_and_probe, frame)

        async def send_and_probe(frame: str) -> None:
            await client.send_raw(frame)
            ref = f"probe-{next(probes)}"
            await client.send_raw({"type": "ping", "ref": ref})
            with trio.fail_after(10):
                while True:
                    event = await client.next_event()
                    if event.get("ref") == ref:
                        assert event["type"] == "ok", (frame[:300], event)
                        return
                    if event["type"] == "error":
                        assert event.get("code") in CODES, (frame[:300], event)
                        outcomes[event["code"]] = outcomes.get(event["code"], 0) + 1
                    elif event["type"] == "ok":
                        outcomes["ok"] = outcomes.get("ok", 0) + 1

        # hypothesis runs synchronously: give it a thread, and let it call back into trio
        await trio.to_thread.run_sync(check)
        assert client.closed is None
    assert outcomes.get("bad_request", 0) > 0 and outcomes.get("ok", 0) > 0, outcomes
    async with server.client("bob") as bob:  # the server is still usable
        assert (await bob.request("ping"))["type"] == "ok"
    assert (await server.http.get("/healthz")).status_code == 200
