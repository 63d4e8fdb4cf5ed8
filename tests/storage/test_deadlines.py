"""Write deadlines: the storage actor keeps one deadline watcher for every queued call
(no cancel scope per write). A call past its deadline gets `TooSlowError` (its requests
still go to the database in their turn: a write that timed out for its caller may commit),
a short deadline queued behind long ones fires on time, a caller cancelled from outside is
not woken again, and callers still waiting when the actor stops get `StorageUnavailable`
instead of waiting out their deadline."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import trio

from domain.errors import StorageUnavailable
from storage import messages as sm
from storage.actor import StorageActor
from storage.sqlite_backend import SqliteBackend
from tests.storage.test_storage import Wrapped, chat, new_session, open_storage


class Gate(Wrapped):
    """Holds every write batch (in the writer thread) until `release` while `closed`."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def close_gate(self) -> None:
        self.open.clear()
        self.entered.clear()

    def begin(self, conn: Any) -> None:
        self.entered.set()
        assert self.open.wait(20)
        self.inner.begin(conn)


@pytest.fixture
def gated(tmp_path: Any) -> Gate:
    return Gate(SqliteBackend(tmp_path / "gate.sqlite3"))


async def _until(event: threading.Event) -> None:
    while not event.is_set():
        await trio.sleep(0.005)


async def test_a_write_past_its_deadline_is_too_slow_and_still_commits(gated: Gate):
    with trio.fail_after(20):
        async with open_storage(gated) as (_, storage):
            await storage.write(new_session("a"))
            gated.close_gate()
            blocker = trio.Event()

            async def held() -> None:
                await storage.write(chat("a", "held"))  # the batch the gate holds
                blocker.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(held)
                await _until(gated.entered)
                started = trio.current_time()
                with pytest.raises(trio.TooSlowError):
                    await storage.write(chat("a", "late"), timeout=0.2)
                with pytest.raises(trio.TooSlowError):
                    await storage.write_many([chat("a", "late-1"), chat("a", "late-2")], timeout=0.2)
                assert 0.35 <= trio.current_time() - started < 5
                gated.open.set()
            assert blocker.is_set()
            await storage.write(chat("a", "after"))  # queued behind the late ones: they are committed
            messages = await storage.read(sm.GetMessages(session_id="a"))
            assert [m.client_id for m in messages] == ["held", "late", "late-1", "late-2", "after"]
            assert [m.seq for m in messages] == [1, 2, 3, 4, 5]


async def test_a_short_deadline_behind_long_ones_fires_on_time(gated: Gate):
    with trio.fail_after(20):
        async with open_storage(gated) as (_, storage):
            await storage.write(new_session("a"))
            gated.close_gate()
            answered: list[str] = []

            async def patient(client_id: str) -> None:
                await storage.write(chat("a", client_id), timeout=30)
                answered.append(client_id)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(patient, "first")
                await _until(gated.entered)
                for i in range(5):
                    nursery.start_soon(patient, f"queued-{i}")
                await trio.sleep(0.05)
                started = trio.current_time()
                with pytest.raises(trio.TooSlowError):
                    await storage.write(chat("a", "hurried"), timeout=0.1)
                assert trio.current_time() - started < 2
                assert answered == []
                gated.open.set()
            assert sorted(answered) == ["first"] + [f"queued-{i}" for i in range(5)]


async def test_a_caller_cancelled_from_outside_leaves_the_rest_answered(gated: Gate):
    with trio.fail_after(20):
        async with open_storage(gated) as (actor, storage):
            await storage.write(new_session("a"))
            gated.close_gate()
            answered: list[str] = []

            async def writer(client_id: str) -> None:
                await storage.write(chat("a", client_id))
                answered.append(client_id)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, "first")
                await _until(gated.entered)
                with trio.move_on_after(0.05) as cancelled:
                    await storage.write(chat("a", "gave-up"))
                assert cancelled.cancelled_caught
                nursery.start_soon(writer, "after")
                await trio.sleep(0.05)
                gated.open.set()
            assert sorted(answered) == ["after", "first"]
            assert not actor.deadlines.calls  # answered calls leave the watcher
            assert actor.deadlines._timer.deadline == math.inf  # nothing waits: no timer


async def test_closing_the_handle_answers_every_queued_write_first(gated: Gate):
    with trio.fail_after(20):
        answered: list[str] = []
        async with trio.open_nursery() as outer:
            async with open_storage(gated) as (_, storage):
                await storage.write(new_session("a"))
                gated.close_gate()

                async def writer(client_id: str) -> None:
                    await storage.write(chat("a", client_id))
                    answered.append(client_id)

                outer.start_soon(writer, "first")
                await _until(gated.entered)
                outer.start_soon(writer, "second")
                await trio.sleep(0.05)
                gated.open.set()
            # `open_storage` closed the handle: the actor commits what is queued, then stops
        assert sorted(answered) == ["first", "second"]


async def test_a_stopped_actor_fails_its_waiting_callers_at_once(gated: Gate):
    with trio.fail_after(20):
        outcomes: list[str] = []
        async with trio.open_nursery() as outer:
            actor_scope = trio.CancelScope()
            actor = StorageActor(gated)

            async def run_actor(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with actor_scope:
                    await actor.run(task_status=task_status)

            storage = await outer.start(run_actor)
            await storage.write(new_session("a"))
            gated.close_gate()

            async def writer(client_id: str) -> None:
                try:
                    await storage.write(chat("a", client_id))
                    outcomes.append("stored")
                except StorageUnavailable:
                    outcomes.append("unavailable")

            outer.start_soon(writer, "first")
            await _until(gated.entered)
            outer.start_soon(writer, "second")
            await trio.sleep(0.05)
            started = trio.current_time()
            actor_scope.cancel()  # the actor goes away with one batch in its thread and one write queued
            gated.open.set()
        assert outcomes == ["stored", "unavailable"]  # the batch under way commits and is answered
        assert trio.current_time() - started < 5  # not their 30 s deadlines
