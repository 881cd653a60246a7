"""NfsStore's Task: one dump or load as the caller sees it, made of engine tasks.

A call may become several engine tasks (parts): the engine wants the same
number of shards for every block of a request, and each staging chunk is its
own request so that copies overlap the I/O (ucm.store.staged). A part's
staging goes back to the pool once that part is over, the task's tensors are
let go once every part is, so the engine never touches memory the caller or
the pool has reused. A staged load's bytes reach the caller's tensors only
for blocks that arrived whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..deadline import Deadline
from .. import status as block_status
from ..transfer import Pending
from .ucmstore import Task as _UcmTask


@dataclass
class Part:
    """One engine request of a task (blocks with the same number of shards)."""

    pending: Pending
    blocks: list[int]  # indices into Task.keys
    done: bool = False
    chunks: list[int] = field(default_factory=list)  # staging chunks it holds until it is over


@dataclass(eq=False)
class Task(_UcmTask):
    """A dump or load. `task_id` is the engine's id (> 0) once the engine
    accepted it, 0 when nothing could be submitted (then every block failed).
    After wait()/check() said it finished: `status` per block, `failed_keys`."""

    task_id: int
    direction: str
    keys: list[Any]  # block ids as given, one per block
    done: bool = False
    status: list[str] = field(default_factory=list)
    failed_keys: list[Any] = field(default_factory=list)
    bytes: int = 0
    error: str | None = None
    _parts: list[Part] = field(default_factory=list, repr=False)
    _deadline: Deadline | None = field(default=None, repr=False)
    _plan: Any = field(default=None, repr=False)  # ucm.store.staged.Plan: units not sent, staging held
    _copy_out: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _keep: list[Any] = field(default_factory=list, repr=False)
    _block_bytes: list[int] = field(default_factory=list, repr=False)


def record(task: Task, part: Part, r: dict[str, Any]) -> None:
    """The engine's result of a part: its blocks' status and bytes."""
    status = list(r.get("status", []))
    for j, b in enumerate(part.blocks):
        task.status[b] = status[j] if j < len(status) else "failed"
    task.bytes += int(r.get("bytes", 0))
    part.done = True
    copy_out(task, set(part.blocks))


def give_up(task: Task, part: Part) -> None:
    """A part settled without a result: its blocks were cancelled (the engine
    said so) or failed."""
    for b in part.blocks:
        task.status[b] = block_status.CANCELLED if part.pending.cancel_acked else "failed"
    part.done = True


def copy_out(task: Task, blocks: set[int] | None = None) -> None:
    """A staged load's bytes reach the caller's tensors: those of `blocks`
    (all when None) that arrived whole; the rest stay untouched."""
    left = []
    for b, view, t in task._copy_out:
        if blocks is not None and b not in blocks:
            left.append((b, view, t))
        elif task.status[b] in block_status.STORED:
            t.reshape(-1).view(torch.uint8).copy_(view)
    task._copy_out = left


def finish(task: Task) -> None:
    """Every part is over: results final, memory let go (the caller gives
    the staging back: ucm.store.staged.Pump.finish)."""
    copy_out(task)
    task._copy_out = []
    task._keep = []
    task.failed_keys = [task.keys[b] for b, s in enumerate(task.status) if s not in block_status.STORED]
    task.done = True
