"""The server WebSocket's message queue (gateway/listener.py `_Messages`): what
`trio.open_memory_channel(size)` does for trio-websocket's calls, for one producer
and one consumer at a time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.listener import message_queue


async def test_a_full_queue_makes_the_producer_wait_until_the_consumer_takes(autojump_clock):
    send, receive = message_queue(2)
    sent: list[int] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def producer() -> None:
                for n in range(5):
                    await send.send(n)
                    sent.append(n)

            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == [0, 1]  # the third waits: TCP pushes back
            assert [await receive.receive() for _ in range(5)] == [0, 1, 2, 3, 4]  # in order
    assert sent == [0, 1, 2, 3, 4]


async def test_a_waiting_consumer_gets_the_next_value_and_then_end_of_channel(autojump_clock):
    send, receive = message_queue(1)
    got: list[object] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def consumer() -> None:
                while True:
                    try:
                        got.append(await receive.receive())
                    except trio.EndOfChannel:
                        got.append("end")
                        return

            nursery.start_soon(consumer)
            await trio.testing.wait_all_tasks_blocked()
            async with send:
                await send.send("a")
                await send.send("b")
    assert got == ["a", "b", "end"]
    with pytest.raises(trio.ClosedResourceError):
        await send.send("c")


async def test_closing_the_receive_side_breaks_the_waiting_producer_and_waiting_receiver(autojump_clock):
    send, receive = message_queue(1)
    outcomes: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def producer() -> None:
                await send.send(1)
                try:
                    await send.send(2)
                except trio.BrokenResourceError:
                    outcomes.append("broken")

            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            await receive.aclose()
    assert outcomes == ["broken"]
    with pytest.raises(trio.ClosedResourceError):
        await receive.receive()
    with pytest.raises(trio.BrokenResourceError):
        await send.send(3)

    send, receive = message_queue(1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def receiver() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await receive.receive()
                outcomes.append("closed")

            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await receive.aclose()
    assert outcomes == ["broken", "closed"]


async def test_cancelled_waits_leave_the_queue_as_it_was(autojump_clock):
    send, receive = message_queue(1)
    with trio.move_on_after(1):
        await receive.receive()  # nothing comes: cancelled while waiting
    await send.send("x")
    with trio.move_on_after(1):
        await send.send("y")  # full: cancelled while waiting, "y" is not sent
    assert await receive.receive() == "x"
    with trio.move_on_after(1) as nothing:
        await receive.receive()
    assert nothing.cancelled_caught
    with trio.CancelScope() as scope:  # every call is a checkpoint
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await send.send("z")


async def test_a_second_concurrent_consumer_is_refused(autojump_clock):
    _, receive = message_queue(1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive.receive)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await receive.receive()
            nursery.cancel_scope.cancel()
