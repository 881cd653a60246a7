"""How NfsStore's calls with private CPU tensors go through the bounded staging pool.

A call is cut into units: blocks with the same number of shards whose
private entries sit in the same staging chunk(s) (ucm.memory.StagingPool.plan).
Each unit is one engine request. A dump copies a unit's entries into its
chunk just before sending it, so the copy of unit k+1 overlaps the engine's
writes of unit k; a load copies a unit's bytes out as soon as its part is
over.

The pool is bounded. When lending the next chunk would pass its budget, a
dump waits for the oldest part holding staging (its own or another task's
of this store) to be over and reuses that memory: dump() returns once every
private byte is copied, so the caller may reuse its tensors at once, and a
call larger than the budget touches no more fresh memory than the budget.
A load submits what fits and leaves the rest queued; wait() and check()
submit it as staging comes back. A chunk goes back to the pool only once
every part using it is over (the engine answered, acknowledged a cancel,
its process is gone, or the deadline has passed: ucm.transfer), so the pool
never lends memory the engine may still touch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..client import EngineUnavailable
from . import task as tasks
from .pieces import shards_of
from .task import Part, Task

if TYPE_CHECKING:  # pragma: no cover
    from .nfs_store import NfsStore


@dataclass
class Unit:
    """One engine request of a call, not sent yet."""

    count: int  # shards per block
    blocks: list[int]  # indices into the call's blocks
    chunks: list[int]  # staging chunks its private entries are in (indices into Plan.chunk_sizes)


@dataclass(eq=False)
class Plan:
    """What is left to send of one call, and the staging it holds."""

    op: str
    commit: bool
    okeys: list[bytes]  # per block, its key as the caller's store names it
    ekeys: list[bytes]  # per block, its engine key
    entries: list[list[int]]  # per block, its entries
    mems: list[torch.Tensor]  # per entry, its bytes
    slots: dict[int, tuple[int, int, int]]  # private entry -> (chunk, offset, bytes)
    chunk_sizes: list[int]
    queue: deque[Unit] = field(default_factory=deque)
    bufs: dict[int, torch.Tensor] = field(default_factory=dict)  # chunks taken from the pool
    users: dict[int, int] = field(default_factory=dict)  # chunk -> units using it not over yet


def make_plan(
    op: str,
    commit: bool,
    okeys: list[bytes],
    ekeys: list[bytes],
    entries: list[list[int]],
    mems: list[torch.Tensor],
    staged: list[int],
) -> Plan:
    from ..memory import StagingPool

    sizes = [mems[i].numel() * mems[i].element_size() for i in staged]
    chunk_sizes, offsets, where = StagingPool.plan(sizes) if staged else ([], [], [])
    slots = {i: (c, off, n) for i, c, off, n in zip(staged, where, offsets, sizes)}
    p = Plan(op, commit, okeys, ekeys, entries, mems, slots, chunk_sizes)
    units: dict[tuple[int, tuple[int, ...]], Unit] = {}
    for b, ents in enumerate(entries):
        chunks = tuple(sorted({slots[i][0] for i in ents if i in slots}))
        key = (len(ents), chunks)
        u = units.get(key)
        if u is None:
            u = units[key] = Unit(len(ents), [], list(chunks))
            p.queue.append(u)
            for c in chunks:
                p.users[c] = p.users.get(c, 0) + 1
        u.blocks.append(b)
    return p


class Pump:
    """Sends the units of a store's calls as staging allows."""

    def __init__(self, store: "NfsStore"):
        self.store = store
        #: parts holding staging, oldest first
        self.holders: deque[tuple[Task, Part]] = deque()

    def run(self, task: Task, block: bool) -> None:
        """Sends the task's queued units in order. `block` (a dump): when the
        budget is spent, wait for staging to come back; else stop and leave
        the rest queued."""
        plan = task._plan
        if plan is None:
            return
        pool = self.store.staging
        while plan.queue:
            u = plan.queue[0]
            for c in u.chunks:
                if c in plan.bufs:
                    continue
                size = plan.chunk_sizes[c]
                while pool.over_budget(size) and self.reclaim_one(wait=block):
                    pass
                if pool.over_budget(size) and not block:
                    return
                plan.bufs[c] = pool.take(size)
            plan.queue.popleft()
            self.send(task, u)

    def send(self, task: Task, u: Unit) -> None:
        plan = task._plan
        assert plan is not None
        mem_list = []
        for b in u.blocks:
            for i in plan.entries[b]:
                slot = plan.slots.get(i)
                if slot is None:
                    mem_list.append(plan.mems[i])
                    continue
                c, off, n = slot
                view = plan.bufs[c][off : off + n]
                if plan.op == "dump":  # taken now: the caller may reuse its tensors as soon as dump() returns
                    view.copy_(plan.mems[i].reshape(-1).view(torch.uint8))
                else:
                    task._copy_out.append((b, view, plan.mems[i]))
                mem_list.append(view)
        store = self.store
        ekeys = [plan.ekeys[b] for b in u.blocks]
        okeys = [plan.okeys[b] for b in u.blocks]
        # Pieces of blocks: a commit of the block's key, from this store or any other client, commits them.
        pieces = plan.op == "dump" and not plan.commit and okeys != ekeys
        p, err = store.transfers.submit(
            plan.op,
            ekeys,
            mem_list,
            shards_of(u.count, mem_list),
            task._deadline,
            commit=plan.commit,
            commit_keys=okeys if pieces else None,
        )
        if err is not None:
            task.error = f"{task.error}; {err}" if task.error else str(err)
            store._down = store._down or isinstance(err, EngineUnavailable)
        if p is None:  # never sent: its blocks failed, its staging is free again
            tasks.copy_out(task, set(u.blocks))
            self.release(task, u.chunks)
            return
        # Sent and never answered (no id), the engine may still run it
        # until its deadline: a part nobody can ask about.
        part = Part(p, u.blocks, chunks=list(u.chunks))
        task._parts.append(part)
        if u.chunks:
            self.holders.append((task, part))
        if p.task is None:
            return
        if not task.task_id:
            task.task_id = p.task
        if plan.op == "dump" and not plan.commit:
            store._uncommitted.dumped((plan.okeys[b], plan.ekeys[b]) for b in u.blocks)

    def part_over(self, task: Task, part: Part) -> None:
        """A part was recorded or settled: its staging may go back."""
        chunks, part.chunks = part.chunks, []
        self.release(task, chunks)

    def release(self, task: Task, chunks: list[int]) -> None:
        plan = task._plan
        if plan is None:
            return
        for c in chunks:
            plan.users[c] -= 1
            if plan.users[c] <= 0 and c in plan.bufs:
                self.store.staging.give(plan.bufs.pop(c))

    def drop_queue(self, task: Task) -> None:
        """Units never sent: their blocks stay failed and hold no staging."""
        plan = task._plan
        if plan is None:
            return
        while plan.queue:
            u = plan.queue.popleft()
            self.release(task, u.chunks)

    def finish(self, task: Task) -> None:
        """The task is over: every chunk it still holds goes back."""
        plan = task._plan
        if plan is None:
            return
        self.drop_queue(task)
        for part in task._parts:
            self.part_over(task, part)
        for c in list(plan.bufs):
            self.store.staging.give(plan.bufs.pop(c))
        task._plan = None

    def reclaim_one(self, wait: bool) -> bool:
        """Lets the staging of the oldest part still holding some go, once
        that part is over: waits for it (`wait`), or only asks whether it is
        done. False when no part holds staging, or (not `wait`) the oldest is
        still running."""
        while self.holders:
            t, part = self.holders[0]
            if part.done or not part.chunks:
                self.holders.popleft()
                continue
            if wait:
                left = max(0, int((part.pending.deadline.give_up - time.monotonic()) * 1000))
                r = self.store.transfers.wait(part.pending, left)
            else:
                r = self.store.transfers.ask(part.pending, "check")
                if r is None or not r.get("done"):
                    return False
            self.holders.popleft()
            if r is not None and r.get("done"):
                tasks.record(t, part, r)
            else:
                self.store._settle(t, part)
            self.part_over(t, part)
            return True
        return False
