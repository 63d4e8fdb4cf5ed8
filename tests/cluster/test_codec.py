"""What crosses nodes comes back as it left: session messages, delivery items, replies, errors."""

from __future__ import annotations

from actors.cluster import codec
from actors.ports import ChatCursor, ChatFrame, ConnectionRef, ToCaller, ToConnection
from actors.session import JoinSession, MembersLost, RelaySignal, SendChat, Transition
from domain.chat import ChatMessage
from domain.errors import Conflict, Fenced, NotJoined
from domain.identity import Identity
from domain.session import SessionRecord
from protocol.replies import ChatAccepted, Joined, LiveBilling

CONN = ConnectionRef(id="c1", user="alice", is_admin=False)


def roundtrip(value, here=None):
    return codec.decode(codec.encode(value, here=here))


def test_messages_and_items_round_trip_and_local_addresses_name_their_node():
    join = JoinSession(conn=CONN, reply=ToConnection(conn=CONN, ref="r1"))
    back = roundtrip(join, here="n1")
    assert back.conn.node == "n1" and back.reply.conn.node == "n1" and back.reply.ref == "r1"
    signal = RelaySignal(conn=CONN, to="bob", kind="offer", payload=b'{"sdp":"v=0\\u0000"}',
                         reply=ToCaller(call_id=7))
    assert roundtrip(signal, here="n2").payload == signal.payload
    assert roundtrip(signal, here="n2").reply == ToCaller(call_id=7, node="n2")
    send = SendChat(caller=Identity(user="alice"), conn_id=None, client_id="x", body="hé", reply=ToCaller(call_id=1))
    assert roundtrip(send).body == "hé"
    assert roundtrip(Transition(caller=Identity(user="a", is_admin=True), name="end", reply=ToCaller(call_id=2)))
    assert roundtrip(MembersLost(node="n3")) == MembersLost(node="n3")
    for item in ("a frame", ChatFrame(session_id="s", seq=3, text=None), ChatCursor(session_id="s", after_seq=1,
                                                                                    last_seq=4)):
        assert roundtrip(item) == item


def test_replies_and_errors_round_trip():
    session = SessionRecord(id="s", payer="a", provider="b", rate_per_minute=1, currency="USD", created_at=1,
                            metadata={"tags": ["x", {"deep": [1]}]}, owner_node="n1")
    joined = roundtrip(Joined(session=session, participants=("a", "b"), last_seq=3))
    assert joined.session.metadata == {"tags": ("x", {"deep": (1,)})} and joined.session.owner_node == "n1"
    message = ChatMessage(id="m", session_id="s", seq=1, client_id="c", sender="a", body="hi", created_at=5)
    assert roundtrip(ChatAccepted(session_id="s", message=message, duplicate=False)).message == message
    assert roundtrip(LiveBilling(session_id="s", rate_per_minute=1, currency="USD", segments=((1, 2),),
                                 final=False)).billable_ms == 1
    conflict = roundtrip(Conflict("no", state="ended"))
    assert isinstance(conflict, Conflict) and conflict.state == "ended" and conflict.extra == {"state": "ended"}
    assert isinstance(roundtrip(Fenced("moved")), Fenced)
    assert roundtrip(NotJoined("x")).code == "not_joined"


async def test_a_message_that_does_not_decode_is_dropped_not_fatal(caplog):
    from actors.cluster.node import _arrived

    await _arrived(["s", "sid", 0, {"@": "FromANewerNode", "f": {}}], directory=None, post_office=None)
    assert "does not decode" in caplog.text
