"""The billing timer: one child task per session actor that wakes it when billing is due.

The session actor owns the ledger (who is present, what is billable) and decides
*when* billing is next due: the next tick, the one-minute warning, the budget
limit. The timer only keeps that one deadline and, when it passes, posts one
`BillingDue` into the session's mailbox. Ticks coalesce: until the session has
handled a wake-up and set a new deadline, no second one is posted, so a busy
session never finds a pile of stale ticks in its mailbox.

`reschedule` is synchronous and may be called any number of times; the last
deadline wins (the restartable single timer of Hypercorn's worker context).
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

import trio

M = TypeVar("M")


class BillingTimer(Generic[M]):
    """Posts `wake` (the session's `BillingDue`) into `mailbox` when the deadline passes."""

    def __init__(self, mailbox: trio.MemorySendChannel[M], wake: M) -> None:
        self._mailbox = mailbox
        self._wake = wake
        self._deadline = math.inf
        self._changed = trio.Event()

    @property
    def deadline(self) -> float:
        return self._deadline

    def reschedule(self, deadline: float) -> None:
        """Wake the session at Trio time `deadline` (math.inf: never)."""
        self._deadline = deadline
        self._changed.set()

    def cancel(self) -> None:
        self.reschedule(math.inf)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._changed = trio.Event()
            with trio.move_on_at(self._deadline):
                await self._changed.wait()
                continue
            self._deadline = math.inf
            try:
                await self._mailbox.send(self._wake)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the session has retired
