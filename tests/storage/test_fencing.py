"""Fencing (cluster mode), on both databases: a claim bumps the session's owner epoch, and
every durable write carrying an older epoch is refused with `Fenced`, undoing nothing else."""

from __future__ import annotations

import dataclasses

import outcome
import pytest
import trio

from domain.errors import Fenced, NotFound
from domain.timeline import JOINED, TimelineEntry
from storage import messages as sm
from tests.storage.conftest import Store
from tests.storage.test_storage import chat, new_session, open_storage


async def test_claim_bumps_the_epoch_and_fences_older_owners(store: Store):
    with trio.fail_after(20):
        async with open_storage(store.backend()) as (_, storage):
            created, _ = await storage.write(new_session("s1"))
            assert created.owner_node is None
            assert await storage.write(sm.ClaimSession(session_id="s1", node="a")) == 1
            assert (await storage.read(sm.GetSession(session_id="s1"))).owner_node == "a"
            first = await storage.write(dataclasses.replace(chat("s1", "c1"), epoch=1))
            assert first[0].seq == 1
            assert await storage.write(sm.ClaimSession(session_id="s1", node="b")) == 2
            # the old owner's writes are refused, each kind of them
            entry = TimelineEntry(session_id="s1", at=1, kind=JOINED, actor="alice")
            stale = [
                dataclasses.replace(chat("s1", "c2"), epoch=1),
                sm.AppendTimeline(entries=(entry,), epoch=1),
                sm.CheckpointBilling(billing=sm.BillingState(
                    session_id="s1", rate_per_minute=100, currency="USD", segments=((0, 60_000),),
                ), epoch=1),
                sm.TransitionSession(session_id="s1", name="start", at=2, epoch=1),
                sm.EditMessage(session_id="s1", message_id=first[0].id, editor="alice", body="x", at=3, epoch=1),
                sm.DeleteMessage(session_id="s1", message_id=first[0].id, by="alice", as_admin=False, at=3, epoch=1),
                sm.RaiseMark(session_id="s1", user="bob", kind="read", seq=1, epoch=1),
            ]
            fresh = dataclasses.replace(chat("s1", "c3"), epoch=2)
            results = await storage.write_many([*stale, fresh])
            for request, result in zip(stale, results):
                assert isinstance(result, outcome.Error) and isinstance(result.error, Fenced), request
            # the current owner's write in the same batch went through, and numbering stayed gapless
            assert results[-1].unwrap()[0].seq == 2
            assert store.query("SELECT seq, body FROM messages ORDER BY seq") == [(1, "hello c1"), (2, "hello c3")]
            assert store.query("SELECT state FROM sessions") == [("scheduled",)]
            assert store.count("marks") == 0
            # no epoch: one node, unfenced, as before
            await storage.write(sm.RaiseMark(session_id="s1", user="bob", kind="read", seq=1))
            # giving it up only counts for the current epoch
            await storage.write(sm.ReleaseSession(session_id="s1", owner_epoch=1))
            assert (await storage.read(sm.GetSession(session_id="s1"))).owner_node == "b"
            await storage.write(sm.ReleaseSession(session_id="s1", owner_epoch=2))
            assert (await storage.read(sm.GetSession(session_id="s1"))).owner_node is None
            with pytest.raises(NotFound):
                await storage.write(sm.ClaimSession(session_id="nope", node="a"))


async def test_active_owners_and_agreed_settings(store: Store):
    with trio.fail_after(20):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(new_session("s1"))
            await storage.write(new_session("s2"))
            await storage.write(sm.TransitionSession(session_id="s1", name="start", at=5))
            await storage.write(sm.ClaimSession(session_id="s1", node="a"))
            assert await storage.read(sm.ListActiveOwners()) == (("s1", "a"),)
            assert await storage.write(sm.AgreeSetting(key="k", value="one")) == "one"
            assert await storage.write(sm.AgreeSetting(key="k", value="two")) == "one"
