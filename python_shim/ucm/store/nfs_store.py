"""`NfsStore`: UCM's store interface over the engine.

    store = NfsStore("ucm_config.yaml")       # or the config as a dict
    found = store.lookup([k1, k2])            # -> [bool, bool]
    task = store.dump(keys, offsets, tensors) # device -> storage
    store.wait(task)                          # 0 when every block succeeded
    store.commit(keys)                        # make them visible
    task = store.load(keys, offsets, tensors) # storage -> device
    store.close()

Block ids are bytes (vLLM's block hashes) or str (UCM's form: its UTF-8
bytes are the key), 1 to 64 bytes. Entry i of a dump or load says: tensor i
holds the bytes of block keys[i] starting at byte offsets[i] of that block.
The entries of one block in one call are its *piece*: the whole block, or a
part stored as a block of its own (UCM's tensor-parallel ranks each write
their share of one block), found again by a load of the same id with the
same byte ranges (ucm.store.pieces, docs/ucm_store.md).

Memory: CUDA tensors and CPU tensors in shared memory are reached by the
engine in place. Other CPU tensors are copied through pooled shared-memory
buffers (ucm.memory.StagingPool); `register_memory` moves long-lived ones
into shared memory once instead. Regions are tied to the life of their
storage (ucm.memory.RegionRegistry).

Deadlines (ucm.deadline): every dump and load carries the time after which
the engine may not touch its memory (`loadTimeoutMs` after submission,
minus a margin for one block's copy). `wait`, `check` and `cancel` report a
task's memory free only once the engine acknowledged that nothing more of it
runs, or that deadline has passed (ucm.transfer holds that logic, shared
with the vLLM connector; ucm.store.pieces turns entries into blocks).

Failures are misses: an unreachable engine makes lookups False, transfers
failed and commits False, never an exception (argument errors still raise).
When the engine this store started has died, the next call starts it again.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from typing import Any, Sequence, Union

import torch

from ..client import EngineClient, EngineError, EngineUnavailable, process_gone
from ..config import StoreConfig, load_config
from ..deadline import Deadline
from ..launcher import RuntimeDirError, SettingsMismatch, ensure_engine
from ..memory import RegionRegistry, StagingPool, UnsupportedMemory
from ..transfer import Transfers
from . import task as tasks
from .pieces import Layouts, Uncommitted, block_key, entry_memory, piece_key, plan, raws
from .staged import Pump, make_plan
from .task import Part, Task

__all__ = ["DEFAULT_NS", "NfsStore", "Task", "block_key", "piece_key"]

logger = logging.getLogger("ucm")

DEFAULT_NS = "ucm-store"
BlockId = Union[bytes, bytearray, memoryview, str]

_live_stores: "weakref.WeakSet[NfsStore]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Say goodbye at exit, so that the engine counts this client gone at once
    # (an idle engine with other settings can then be replaced without waiting).
    for s in list(_live_stores):
        try:
            s.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def _close_client(client: EngineClient) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - garbage collection or exit
        pass


class NfsStore:
    def __init__(
        self,
        config: str | os.PathLike[str] | dict[str, Any],
        *,
        namespace: str = DEFAULT_NS,
        start_engine: bool = True,
        name: str = "ucm.store",
        block_size: int | None = None,
        prefault_staging: bool = True,
    ):
        self.config: StoreConfig = load_config(config)
        self.namespace = namespace
        #: bytes of a whole block, when known: a piece from byte 0 shorter than this is not the block
        self.block_size = block_size
        self._start_engine = start_engine
        self._down = False  # an engine call found no engine: revive before the next
        self._retry_at = 0.0
        if start_engine:
            ensure_engine(self.config)
        self.client = EngineClient(
            self.config.endpoint,
            self.config.timeout_ms,
            name,
            on_hello=self.config.on_hello,
            engine_uid=self.config.engine_uid,
        )
        self.regions = RegionRegistry(self.client)
        self.transfers = Transfers(self.client, self.regions, namespace, self._request)
        self.staging = StagingPool()
        # Private CPU tensors are copied through this pool: its memory is
        # made and touched now, on a background thread, so that the first
        # dumps do not pay the kernel's first-touch faults (UCM_STAGING_BYTES,
        # UCM_STAGING_PREFAULT=0: ucm.memory.StagingPool). UCM's store
        # classes, whose callers mostly pass GPU memory, start it at the first
        # call that needs staging instead (`prefault_staging=False`).
        if prefault_staging:
            self.staging.prefault()
        self._pump = Pump(self)
        self._layouts = Layouts()
        self._uncommitted = Uncommitted()
        self._warned_at: dict[str, float] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_client, self.client)
        _live_stores.add(self)
        self._expected_block_bytes = 0
        if block_size and start_engine:
            self.expect_block_bytes(block_size)

    def expect_block_bytes(self, nbytes: int) -> None:
        """Tells the engine the payload of the blocks this store will dump
        (a registration of nothing but the size; NfsStore does it itself when
        given `block_size`): a Cache stage then makes its memory for blocks
        of that size in the background now, rather than during the first
        dumps (docs/cache_stage.md). Said again to an engine started anew.
        Best effort: without it the stage prepares at the first block."""
        self._expected_block_bytes = nbytes
        try:
            self.client.call("register", block_bytes=nbytes)
        except EngineUnavailable as e:
            logger.debug("UCM: could not tell the engine the block size (%s)", e)
        except EngineError as e:  # a size the engine refuses (too_large): every dump of it would fail
            logger.warning("UCM: blocks of %d bytes: %s", nbytes, e)

    # ---- the engine, started again when it died ------------------------------------

    def _ready(self) -> None:
        """Before each engine request: if the engine is known to be gone (its
        process ended, or the last request found nobody), start it again under
        the launcher's lock, as the connector does. Raises EngineUnavailable
        while that is not possible (retried at most every 5 s)."""
        if not self._start_engine:
            return
        if not (self._down or process_gone(self.client.engine_identity)):
            return
        if time.monotonic() < self._retry_at:
            raise EngineUnavailable(
                f"no engine on {self.config.endpoint}; starting one again in {self._retry_at - time.monotonic():.1f} s"
            )
        try:
            ensure_engine(self.config, start_timeout_s=max(10.0, self.config.timeout_ms / 1000))
        except (SettingsMismatch, RuntimeDirError):
            self._retry_at = time.monotonic() + 5.0
            raise
        except Exception as e:  # noqa: BLE001 - no engine for now: every operation a miss
            self._retry_at = time.monotonic() + 5.0
            raise EngineUnavailable(f"cannot start the engine: {e}") from e
        self._down = False
        if self._expected_block_bytes:
            self.expect_block_bytes(self._expected_block_bytes)

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        self._ready()
        try:
            return self.client.call(op, **args)
        except EngineUnavailable:
            self._down = True
            raise

    def _request(self, op: str, **args: Any) -> dict[str, Any] | None:
        """A request about a running task: None when the engine cannot answer
        (marked down, so that the next call starts it again)."""
        try:
            return self.client.call(op, **args)
        except EngineError as e:
            if isinstance(e, EngineUnavailable):
                self._down = True
            return None

    def _warn(self, what: str, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at.get(what, -1e9) >= 10:
            self._warned_at[what] = now
            logger.warning("UCM: %s failed (%s); treated as a miss", what, e)

    # ---- the five operations --------------------------------------------------------

    def lookup(self, keys: Sequence[BlockId]) -> list[bool]:
        """True for each block stored and committed: stored whole, or as the
        pieces of every piece layout this store has used."""
        ks = [block_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
        if not ks:
            return []
        layouts = list(self._layouts)
        ask = ks + [piece_key(k, lay) for lay in layouts for k in ks]
        try:
            found = list(self._call("lookup", ns=self.namespace, keys=ask)["found"])
        except (EngineError, SettingsMismatch, RuntimeDirError) as e:
            self._warn("lookup", e)
            return [False] * len(ks)
        n = len(ks)
        return [
            found[i] or (bool(layouts) and all(found[n * (1 + j) + i] for j in range(len(layouts)))) for i in range(n)
        ]

    def lookup_prefix(self, keys: Sequence[BlockId]) -> int:
        """How many of `keys`, from the first, are stored and committed: the
        engine checks them in order and stops at the first miss (a prefix
        lookup), so a long run of misses costs one check. 0 when the engine
        cannot answer."""
        ks = [block_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
        if not ks:
            return 0
        if self._layouts:  # pieces: the whole answer of lookup(), up to its first miss
            found = self.lookup(ks)
        else:
            try:
                found = list(self._call("lookup", ns=self.namespace, keys=ks, runs=[len(ks)])["found"])
            except (EngineError, SettingsMismatch, RuntimeDirError) as e:
                self._warn("lookup", e)
                return 0
        return next((i for i, f in enumerate(found) if not f), len(ks))

    def dump(
        self, keys: Sequence[BlockId], offsets: Sequence[int], tensors: Sequence[torch.Tensor], *, commit: bool = False
    ) -> Task:
        """Device -> storage. With `commit`, the engine makes each block
        visible as soon as it is written (no commit() call)."""
        return self._transfer("dump", "D2S", keys, offsets, list(tensors), "tensors", commit)

    def load(self, keys: Sequence[BlockId], offsets: Sequence[int], tensors: Sequence[torch.Tensor]) -> Task:
        return self._transfer("load", "S2D", keys, offsets, list(tensors), "tensors")

    def dump_data(
        self,
        keys: Sequence[BlockId],
        offsets: Sequence[int],
        addrs: Sequence[int],
        sizes: Sequence[int],
        *,
        commit: bool = False,
    ) -> Task:
        """dump() from raw addresses: inside a storage this store has seen
        (a tensor passed before, or register_memory), or host memory of this
        process (copied through staging)."""
        return self._transfer("dump", "D2S", keys, offsets, raws(addrs, sizes), "src_addr", commit)

    def fetch_data(
        self, keys: Sequence[BlockId], offsets: Sequence[int], addrs: Sequence[int], sizes: Sequence[int]
    ) -> Task:
        """load() into raw addresses (see dump_data)."""
        return self._transfer("load", "S2D", keys, offsets, raws(addrs, sizes), "dst_addr")

    def register_memory(self, tensors: Sequence[torch.Tensor]) -> None:
        """Makes long-lived CPU tensors zero-copy: moves their storages into
        shared memory once, in place (their data pointers change; existing
        views follow). Later dumps and loads of them skip the staging copy."""
        for i, t in enumerate(tensors):
            try:
                self.regions.export(t)
            except UnsupportedMemory as e:
                raise UnsupportedMemory(f"tensors[{i}]: {e}") from None

    def wait(self, task: Task, timeout_ms: int | None = None) -> int:
        """Blocks until the task finished; 0 when every block succeeded, else
        the number of failed blocks. Waits at most `timeout_ms` (default: until
        the task's deadline), then cancels what is left. It never returns
        before the engine can no longer touch the task's memory: after a
        timeout, once the engine acknowledged the cancel, or, when it cannot
        be asked, once the deadline has passed."""
        if task.done:
            return len(task.failed_keys)
        dl = task._deadline
        assert dl is not None
        end = dl.give_up if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        end = min(end, dl.give_up + self.config.timeout_ms / 1000)
        while True:
            part = next((p for p in task._parts if not p.done), None)
            if part is None:
                if task._plan is not None and task._plan.queue and time.monotonic() < end:
                    self._pump.run(task, block=True)  # a load's units left for staging to come back
                    continue
                break
            r = self.transfers.wait(part.pending, max(0, int((end - time.monotonic()) * 1000)))
            if r is not None:
                tasks.record(task, part, r)
            else:
                self._settle(task, part)
            self._pump.part_over(task, part)
            if time.monotonic() < end:
                self._pump.run(task, block=False)
        self._finish(task)
        return len(task.failed_keys)

    def check(self, task: Task) -> bool:
        """Non-blocking: True once the task finished (results filled in)."""
        if task.done:
            return True
        dl = task._deadline
        assert dl is not None
        for part in task._parts:
            if part.done:
                continue
            r = self.transfers.ask(part.pending, "check")
            if r is not None and r.get("done"):
                tasks.record(task, part, r)
            elif dl.passed() or part.pending.cancel_acked or (r is None and part.pending.engine_gone()):
                self._settle(task, part)  # no longer waits: past the deadline, acked or gone
            if part.done:
                self._pump.part_over(task, part)
        if dl.passed():
            self._pump.drop_queue(task)
        self._pump.run(task, block=False)
        if all(p.done for p in task._parts) and not (task._plan is not None and task._plan.queue):
            self._finish(task)
        return task.done

    def cancel(self, task: Task) -> bool:
        """Stops a running task: blocks not yet copied end as failed. True once
        the engine guarantees that no block of it touches the tensors any more
        (also when it had finished, or its deadline has passed): the task is
        then finished, its tensors hold their final bytes and wait() returns
        at once. False when the engine could not be asked (the task is left
        running; wait() settles it)."""
        if task.done:
            return True
        self._pump.drop_queue(task)  # units not sent yet are never sent
        ok = True
        for part in task._parts:
            if part.done or part.pending.cancel_acked:
                continue
            if not (
                self.transfers.cancel(part.pending) or part.pending.deadline.passed() or part.pending.engine_gone()
            ):
                ok = False
        if ok:
            for part in task._parts:
                if not part.done:
                    self._settle(task, part)
            self._finish(task)
        return ok

    def _finish(self, task: Task) -> None:
        tasks.finish(task)
        self._pump.finish(task)

    def commit(self, keys: Sequence[BlockId], success: bool = True, *, is_success: bool | None = None) -> list[bool]:
        """Makes dumped blocks visible (or, with success False, discards them).
        True per block whose every stored piece was committed."""
        if is_success is not None:
            success = is_success
        ks = [block_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
        if not ks:
            return []
        groups = [self._uncommitted.take(k) for k in ks]
        flat = [e for g in groups for e in g]
        try:
            done = list(self._call("commit", ns=self.namespace, keys=flat, success=bool(success))["committed"])
        except (EngineError, SettingsMismatch, RuntimeDirError) as e:
            self._warn("commit", e)
            return [False] * len(ks)
        out, pos = [], 0
        for g in groups:
            out.append(all(done[pos : pos + len(g)]))
            pos += len(g)
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.staging.clear()
            self._finalizer()  # says goodbye: the engine releases this client's regions

    def __enter__(self) -> "NfsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transfers --------------------------------------------------------------------

    def _transfer(
        self,
        op: str,
        direction: str,
        keys: Sequence[BlockId],
        offsets: Sequence[int],
        sources: list[Any],
        what: str,
        commit: bool = False,
    ) -> Task:
        blocks = plan(keys, offsets, sources, what, self.block_size, self._layouts)
        order, ekeys, block_entries = blocks.keys, blocks.ekeys, blocks.entries
        mems, staged = entry_memory(self.regions, sources, op == "load", what)
        task = Task(0, direction, blocks.ids)
        task._block_bytes = blocks.block_bytes()
        task._keep = list(mems)  # the engine may use this memory until the task is over
        if not order:
            task.done = True
            return task
        # Private CPU memory goes through the bounded staging pool, a unit
        # (one engine task) per chunk so that copies overlap the I/O; a dump
        # returns once every private byte is copied (ucm.store.staged).
        task._plan = make_plan(op, commit, order, ekeys, block_entries, mems, staged)
        if staged:
            self.staging.prefault()
        task._deadline = Deadline(self.config.load_timeout_ms, max(task._block_bytes))
        task.status = ["failed"] * len(order)
        try:
            self._ready()
        except (EngineError, SettingsMismatch, RuntimeDirError) as e:
            task.error = str(e)
            self._pump.drop_queue(task)
        self._pump.run(task, block=op == "dump")
        if not task._parts and not task._plan.queue:
            # Engine down or request refused: every block failed (a miss to
            # recompute), never an exception in the caller's path.
            self._finish(task)
        return task

    def _settle(self, task: Task, part: Part) -> None:
        """A part not finished when the caller stops waiting: cancelled, and
        then done as far as memory goes (ucm.transfer: until the engine
        acknowledged the cancel, its process is gone or the deadline has
        passed, this blocks). A cancelled part's result is read once more:
        blocks copied before the cancel count."""
        if self.transfers.settle(part.pending) == "cancelled":
            r = self.transfers.wait(part.pending, 1000)
            if r is not None:
                tasks.record(task, part, r)
                return
        tasks.give_up(task, part)
