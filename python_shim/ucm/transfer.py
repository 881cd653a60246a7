"""Dumps and loads handed to the engine, followed until their memory is free.

Both users of the engine's transfers, the vLLM connector's worker and
`NfsStore`, go through `Transfers`: it turns tensors into shards, records the
CUDA event a dump waits on, registers memory again when a new engine session
no longer knows it (`unknown_region`, retried once), asks about a task
(`wait`, `check`, `cancel`) and settles one the caller stops waiting for.
What the results mean (stats, failed blocks, staging copies) stays with each
user.

The invariant: a task's memory is reported free only once the engine
acknowledged a `cancel`, its process is gone, or the task's deadline has
passed (ucm.deadline), waited for here when the engine cannot be asked.
A task whose request went out and was never answered has no id; only its
deadline settles it. A task is asked about only in the client session it was
submitted in: a new session (`hello` again) released the old one's tasks and
may reuse their ids.

Each user keeps its own policy for an engine that does not answer (the
connector degrades to misses and reconnects in the background, the store
starts the engine again before its next call): `request` is that policy, a
call that returns None instead of raising when the engine cannot answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .client import EngineClient, EngineError, EngineUnavailable, process_gone, say_task_line
from .deadline import Deadline
from .memory import RegionRegistry
from .shards import ShardList

#: one request to the engine under its user's policy: the reply, or None
#: when the engine cannot answer it (never raises an EngineError)
Request = Callable[..., "dict[str, Any] | None"]


@dataclass(eq=False)
class Pending:
    """A dump or load the engine accepted, or may have."""

    task: int | None  # the engine's id; None: sent, but the reply (the id) never came (or has not been taken yet)
    keys: list[bytes]  # the engine keys it was submitted with
    deadline: Deadline
    engine: tuple[int, int] | None  # (pid, start time) of the engine that has it
    epoch: int  # the client session it was submitted in
    cancel_acked: bool = False  # the engine said nothing of it runs any more
    reply: int | None = None  # sent without waiting: the id of the request whose reply (the task id) is not taken yet
    op: str = "submit"  # what was sent ("dump", "load"), for the log when that reply is a refusal
    refused: bool = False  # that reply was the engine's refusal: nothing of it ever ran

    def engine_gone(self) -> bool:
        return process_gone(self.engine)


class Transfers:
    """The transfers of one client in one namespace."""

    def __init__(
        self,
        client: EngineClient,
        regions: RegionRegistry,
        namespace: str,
        request: Request,
        failed: Callable[[str, EngineError], None] | None = None,
    ):
        self.client = client
        self.regions = regions
        self.namespace = namespace
        self._request = request
        #: told of an engine error in the reply to a request sent without waiting (the user's policy, as in `request`)
        self._failed = failed

    # ---- submitting --------------------------------------------------------------

    def submit(
        self,
        op: str,
        keys: list[bytes],
        tensors: list[torch.Tensor],
        shards_of: Callable[[list[tuple[int, int]]], ShardList],
        deadline: Deadline,
        commit: bool = False,
        commit_keys: list[bytes] | None = None,
        defer: bool = False,
    ) -> tuple[Pending | None, EngineError | None]:
        """Hands a dump or load of `keys` to the engine. `tensors` are located
        (registered in this session where needed) and `shards_of` turns their
        (region id, offset) into the request's shards. A dump or load of CUDA
        memory carries an event recorded now on the first CUDA tensor's
        device: the engine copies out of or into that memory only once the
        work queued so far on that stream has run. Returns (the task, None), or the engine's error with
        None, or with a task without id when the request went out unanswered
        (the engine may still run it, until its deadline). Anything that is
        not an engine answer raises. `commit_keys` (a dump of pieces): per
        block, the key whose commit commits it, from any client. `defer`:
        the request is sent without waiting for the engine's answer, which
        the first question about the task takes (a refusal then makes the
        task one that ran nothing, as if it failed at once)."""
        for attempt in (0, 1):
            try:
                located = self.regions.locate_many(tensors)
                shards = shards_of(located)
                extra: dict[str, Any] = {"commit": True} if commit else {}
                if commit_keys is not None:
                    extra["commit_keys"] = commit_keys
                cuda = next((t.device for t in tensors if t.device.type == "cuda"), None)
                if cuda is not None:
                    # A dump reads what the work queued so far wrote; a load's
                    # bytes must land after it (vLLM zeroing new blocks, a
                    # step still reading them), not be overwritten by it.
                    extra["event"] = self.regions.record_event(cuda)
                args = dict(
                    ns=self.namespace, keys=keys, shards=shards.wire(), deadline_unix_ms=deadline.unix_ms, **extra
                )
                if defer:
                    rid = self.client.send(op, **args)
                    identity = self.client.engine_identity
                    return Pending(None, keys, deadline, identity, self.client.epoch, reply=rid, op=op), None
                r = self.client.call(op, **args)
                return Pending(int(r["task"]), keys, deadline, self.client.engine_identity, self.client.epoch), None
            except EngineUnavailable as e:
                if e.sent == op:
                    return Pending(None, keys, deadline, self.client.engine_identity, -1), e
                return None, e
            except EngineError as e:
                if e.code == "unknown_region" and attempt == 0:
                    self.regions.forget()  # a new session (engine restart): register again
                    continue
                return None, e
        raise AssertionError("unreachable")

    # ---- asking ------------------------------------------------------------------

    def ask(self, p: Pending, op: str, **args: Any) -> dict[str, Any] | None:
        """A request about task `p`; None when it cannot be answered (the
        engine is down, the id never came, or the session it ran in is
        gone, its process ended). A reply that says the task is done prints
        its task line. A task the engine refused when it was sent (`defer`)
        is answered done, with no status: every block failed."""
        if p.reply is not None:
            self._take(p)
        if p.refused:
            return {"done": True, "released": True, "status": []}
        if p.task is None or p.epoch != self.client.epoch or self.client.gone(p.engine):
            return None  # (an engine gone is not asked: a new session's hello would wait for nobody)
        r = self._request(op, task=p.task, **args)
        if r is None or p.epoch != self.client.epoch:
            return None
        if r.get("done"):
            say_task_line(r)
        return r

    def _take(self, p: Pending) -> None:
        """The engine's answer to `p`'s request, sent without waiting: its
        task id, or its refusal (nothing of it runs), or none (the engine may
        run it until its deadline, as a request whose reply never came)."""
        rid, p.reply = p.reply, None
        assert rid is not None
        if p.epoch != self.client.epoch or self.client.gone(p.engine):
            return  # (a new session: the old connection and the reply are gone; an engine gone runs nothing)
        try:
            p.task = int(self.client.take(rid, p.op)["task"])
        except EngineUnavailable as e:
            if self._failed is not None:
                self._failed(p.op, e)
        except EngineError as e:
            p.refused = True
            if e.code == "unknown_region":
                self.regions.forget()  # the next submission registers its memory again
            if self._failed is not None:
                self._failed(p.op, e)

    def wait(self, p: Pending, left_ms: int) -> dict[str, Any] | None:
        """The result of `p` once it is done within `left_ms`, else None."""
        r = self.ask(p, "wait", timeout_ms=left_ms, deadline_ms=left_ms + self.client.timeout_ms)
        return r if r is not None and r.get("done") else None

    def cancel(self, p: Pending) -> bool:
        """True once the engine acknowledged that nothing of `p` runs any more."""
        if not p.cancel_acked and self.ask(p, "cancel") is not None:
            p.cancel_acked = True
        return p.cancel_acked

    def settle(self, p: Pending, waiting: Callable[[Pending], None] | None = None) -> str:
        """Returns once no block of `p` can touch the caller's memory any more,
        and says why: "gone" (its process ended: nothing of it can run, and
        nobody is asked), "cancelled" (the engine acknowledged a cancel) or
        "deadline" (the engine cannot be asked: its deadline has passed,
        waited for here after calling `waiting`)."""
        if p.engine_gone():
            return "gone"
        if self.cancel(p):
            return "cancelled"
        if p.engine_gone():  # died while the cancel was asked
            return "gone"
        if not p.deadline.passed():
            if waiting is not None:
                waiting(p)
            p.deadline.sleep_until()
        return "deadline"
