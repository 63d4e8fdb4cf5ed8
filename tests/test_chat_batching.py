"""A session stores the chat sends queued in its mailbox in one round trip, without reordering."""

from __future__ import annotations

from actors.session import SendChat, SetTyping
from domain.identity import Identity

from .billing.harness import Peer, world


async def test_queued_sends_share_one_commit_and_keep_mailbox_order(autojump_clock):
    async with world() as w:
        sid = await w.create_active()
        alice, bob = Peer("payer"), Peer("provider")
        await w.join(alice, sid)
        await w.join(bob, sid)
        handle = await w.supervisor.lookup(sid)
        before = w.storage.statistics()
        caller = Identity(user="payer")

        def chat(n: int) -> SendChat:
            return SendChat(caller=caller, conn_id=alice.ref.id, client_id=f"c{n}", body=f"message {n}",
                            reply=alice.reply_to(f"r{n}"))

        # queued without a checkpoint in between: the actor finds them all waiting
        for n in range(1, 21):
            handle._mailbox.send_nowait(chat(n))
        handle._mailbox.send_nowait(SetTyping(conn=alice.ref, active=True, reply=alice.reply_to("t")))
        for n in range(21, 41):
            handle._mailbox.send_nowait(chat(n))
        await w.settle()

        acks = {f["ref"]: f for f in alice.frames("ok") if f["ref"].startswith("r")}
        assert [acks[f"r{n}"]["seq"] for n in range(1, 41)] == list(range(1, 41))
        frames = [f for f in bob.frames() if f["type"] in ("chat.message", "typing")]
        seen = [(f["type"], f.get("seq", f.get("active"))) for f in frames]
        assert seen == (
            [("chat.message", n) for n in range(1, 21)]
            + [("typing", True), ("chat.message", 21), ("typing", False)]  # sending ends typing
            + [("chat.message", n) for n in range(22, 41)]
        )
        after = w.storage.statistics()
        assert after.writes - before.writes == 40
        assert after.batches - before.batches <= 4  # two chat batches (and nothing else stored)


async def test_a_refused_send_in_a_batch_does_not_stop_the_others(autojump_clock):
    async with world() as w:
        sid = await w.create_active()
        alice, bob, stranger = Peer("payer"), Peer("provider"), Peer("payer")
        await w.join(alice, sid)
        await w.join(bob, sid)
        w.connect(stranger)
        handle = await w.supervisor.lookup(sid)
        caller = Identity(user="payer")
        for n, conn in enumerate([alice, stranger, alice], start=1):  # the stranger is not joined
            handle._mailbox.send_nowait(SendChat(
                caller=caller, conn_id=conn.ref.id, client_id=f"c{n}", body="hi",
                reply=conn.reply_to(f"r{n}"),
            ))
        handle._mailbox.send_nowait(SendChat(  # a repeat of c1: the original comes back
            caller=caller, conn_id=alice.ref.id, client_id="c1", body="again", reply=alice.reply_to("r4"),
        ))
        await w.settle()
        assert stranger.reply("r2")["code"] == "not_joined"
        assert [alice.reply(r)["seq"] for r in ("r1", "r3", "r4")] == [1, 2, 1]
        assert alice.reply("r4")["duplicate"] is True
        assert [f["seq"] for f in bob.frames("chat.message")] == [1, 2]
