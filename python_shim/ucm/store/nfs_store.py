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
The entries of one block in one call are its *piece*: sorted by offset they
must not overlap. A piece that covers the block from byte 0 without gaps
(and, when the store knows the block size, at least that size) is the block
itself, stored under its id. Any other piece (UCM's tensor-parallel ranks
each write their share of one block at `layer_size*layer +
layer_size/tp*rank`) is stored as a block of its own, keyed by the id and the
piece's byte ranges, and found again by a load of the same id with the same
ranges (docs/ucm_store.md).

Memory: CUDA tensors and CPU tensors in shared memory are reached by the
engine in place. Other CPU tensors are copied through pooled shared-memory
buffers (ucm.memory.StagingPool); `register_memory` moves long-lived ones
into shared memory once instead. Regions are tied to the life of their
storage (ucm.memory.RegionRegistry).

Deadlines (ucm.deadline): every dump and load carries the time after which
the engine may not touch its memory (`loadTimeoutMs` after submission,
minus a margin for one block's copy). `wait`, `check` and `cancel` report a
task's memory free only once the engine acknowledged that nothing more of it
runs, or that deadline has passed.

Failures are misses: an unreachable engine makes lookups False, transfers
failed and commits False, never an exception (argument errors still raise).
When the engine this store started has died, the next call starts it again.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import struct
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from ..client import EngineClient, EngineError, EngineUnavailable, process_gone, say_task_line
from ..config import StoreConfig, load_config
from ..deadline import Deadline
from ..launcher import RuntimeDirError, SettingsMismatch, ensure_engine
from ..memory import RegionRegistry, ShardList, StagingPool, UnsupportedMemory, host_range_ok, raw_tensor
from .ucmstore import Task as _UcmTask

logger = logging.getLogger("ucm")

DEFAULT_NS = "ucm-store"
BlockId = Union[bytes, bytearray, memoryview, str]

#: piece layouts remembered for lookups (each costs one key per looked-up block)
_MAX_LAYOUTS = 64
#: dumped and not yet committed keys remembered for commit()
_MAX_UNCOMMITTED = 1 << 20


@dataclass
class _Part:
    """One engine request of a task (blocks with the same number of shards)."""

    engine_task: int
    blocks: list[int]  # indices into Task.keys
    epoch: int  # the client session it was submitted in
    done: bool = False
    cancel_acked: bool = False


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
    _parts: list[_Part] = field(default_factory=list, repr=False)
    _deadline: Deadline | None = field(default=None, repr=False)
    _engine: tuple[int, int] | None = field(default=None, repr=False)
    _staging: list[torch.Tensor] | None = field(default=None, repr=False)
    _copy_out: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _keep: list[Any] = field(default_factory=list, repr=False)
    _block_bytes: list[int] = field(default_factory=list, repr=False)


class _Raw:
    """An entry given as a raw address and size (dump_data / fetch_data)."""

    __slots__ = ("addr", "size")

    def __init__(self, addr: int, size: int):
        self.addr, self.size = addr, size


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


def block_key(block_id: Any, where: str) -> bytes:
    """The engine key of a block id: bytes as they are, str as its UTF-8 bytes."""
    if isinstance(block_id, str):
        k = block_id.encode()
    elif isinstance(block_id, (bytes, bytearray, memoryview)):
        k = bytes(block_id)
    else:
        raise TypeError(f"{where} must be bytes or str, got {type(block_id).__name__}")
    if not 1 <= len(k) <= 64:
        raise ValueError(f"{where} must be 1 to 64 bytes, got {len(k)}")
    return k


def piece_key(key: bytes, ranges: tuple[tuple[int, int], ...]) -> bytes:
    """The engine key of a piece of block `key` made of the byte `ranges`."""
    h = hashlib.sha256(b"ucm-piece\0" + key + b"\0")
    h.update(struct.pack(f"<{2 * len(ranges)}Q", *(x for r in ranges for x in r)))
    return h.digest()


class NfsStore:
    def __init__(self, config: str | os.PathLike[str] | dict[str, Any], *, namespace: str = DEFAULT_NS,
                 start_engine: bool = True, name: str = "ucm.store", block_size: int | None = None):
        self.config: StoreConfig = load_config(config)
        self.namespace = namespace
        #: bytes of a whole block, when known: a piece from byte 0 shorter than this is not the block
        self.block_size = block_size
        self._start_engine = start_engine
        self._down = False  # an engine call found no engine: revive before the next
        self._retry_at = 0.0
        if start_engine:
            ensure_engine(self.config)
        self.client = EngineClient(self.config.endpoint, self.config.timeout_ms, name)
        self.regions = RegionRegistry(self.client)
        self.staging = StagingPool()
        self._layouts: OrderedDict[tuple[tuple[int, int], ...], None] = OrderedDict()
        self._uncommitted: OrderedDict[bytes, list[bytes]] = OrderedDict()
        self._warned_at: dict[str, float] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_client, self.client)
        _live_stores.add(self)

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
            raise EngineUnavailable(f"no engine on {self.config.endpoint}; starting one again in "
                                    f"{self._retry_at - time.monotonic():.1f} s")
        try:
            ensure_engine(self.config, start_timeout_s=max(10.0, self.config.timeout_ms / 1000))
        except (SettingsMismatch, RuntimeDirError):
            self._retry_at = time.monotonic() + 5.0
            raise
        except Exception as e:  # noqa: BLE001 - no engine for now: every operation a miss
            self._retry_at = time.monotonic() + 5.0
            raise EngineUnavailable(f"cannot start the engine: {e}") from e
        self._down = False

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        self._ready()
        try:
            return self.client.call(op, **args)
        except EngineUnavailable:
            self._down = True
            raise

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
        return [found[i] or (bool(layouts) and all(found[n * (1 + j) + i] for j in range(len(layouts))))
                for i in range(n)]

    def dump(self, keys: Sequence[BlockId], offsets: Sequence[int], tensors: Sequence[torch.Tensor]) -> Task:
        return self._transfer("dump", "D2S", keys, offsets, list(tensors), "tensors")

    def load(self, keys: Sequence[BlockId], offsets: Sequence[int], tensors: Sequence[torch.Tensor]) -> Task:
        return self._transfer("load", "S2D", keys, offsets, list(tensors), "tensors")

    def dump_data(self, keys: Sequence[BlockId], offsets: Sequence[int], addrs: Sequence[int], sizes: Sequence[int]) -> Task:
        """dump() from raw addresses: inside a storage this store has seen
        (a tensor passed before, or register_memory), or host memory of this
        process (copied through staging)."""
        return self._transfer("dump", "D2S", keys, offsets, _raws(addrs, sizes), "src_addr")

    def fetch_data(self, keys: Sequence[BlockId], offsets: Sequence[int], addrs: Sequence[int], sizes: Sequence[int]) -> Task:
        """load() into raw addresses (see dump_data)."""
        return self._transfer("load", "S2D", keys, offsets, _raws(addrs, sizes), "dst_addr")

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
        for part in task._parts:
            if part.done:
                continue
            left = max(0, int((end - time.monotonic()) * 1000))
            r = self._ask(part, "wait", timeout_ms=left, deadline_ms=left + self.config.timeout_ms)
            if r is not None and r.get("done"):
                self._record(task, part, r)
            else:
                self._settle(task, part)
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
            r = self._ask(part, "check")
            if r is not None and r.get("done"):
                self._record(task, part, r)
            elif dl.passed() or part.cancel_acked or (r is None and process_gone(task._engine)):
                self._settle(task, part)  # no longer waits: past the deadline, acked or gone
        if all(p.done for p in task._parts):
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
        ok = True
        for part in task._parts:
            if part.done or part.cancel_acked:
                continue
            r = self._ask(part, "cancel")
            if r is not None:
                part.cancel_acked = True
            elif not (task._deadline.passed() or process_gone(task._engine)):  # type: ignore[union-attr]
                ok = False
        if ok:
            for part in task._parts:
                if not part.done:
                    self._settle(task, part)
            self._finish(task)
        return ok

    def commit(self, keys: Sequence[BlockId], success: bool = True, *, is_success: bool | None = None) -> list[bool]:
        """Makes dumped blocks visible (or, with success False, discards them).
        True per block whose every stored piece was committed."""
        if is_success is not None:
            success = is_success
        ks = [block_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
        if not ks:
            return []
        groups = [self._uncommitted.pop(k, [k]) for k in ks]
        flat = [e for g in groups for e in g]
        try:
            done = list(self._call("commit", ns=self.namespace, keys=flat, success=bool(success))["committed"])
        except (EngineError, SettingsMismatch, RuntimeDirError) as e:
            self._warn("commit", e)
            return [False] * len(ks)
        out, pos = [], 0
        for g in groups:
            out.append(all(done[pos:pos + len(g)]))
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

    def _transfer(self, op: str, direction: str, keys: Sequence[BlockId], offsets: Sequence[int],
                  sources: list[Any], what: str) -> Task:
        if not (len(keys) == len(offsets) == len(sources)):
            raise ValueError(f"keys, offsets and {what} must have the same length, got {len(keys)}, {len(offsets)}, {len(sources)}")
        # -- the entries, by block ------------------------------------------------------
        blocks: OrderedDict[bytes, list[tuple[int, int, int]]] = OrderedDict()  # key -> [(offset, length, entry)]
        ids: dict[bytes, Any] = {}
        for i, (k, off, src) in enumerate(zip(keys, offsets, sources)):
            key = block_key(k, f"keys[{i}]")
            if isinstance(off, bool) or not isinstance(off, int) or off < 0:
                raise ValueError(f"offsets[{i}] must be a non-negative int, got {off!r}")
            if isinstance(src, _Raw):
                n = src.size
            else:
                if not isinstance(src, torch.Tensor):
                    raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(src).__name__}")
                if not src.is_contiguous():
                    raise ValueError(f"{what}[{i}] must be contiguous (shape {tuple(src.shape)}, stride {src.stride()})")
                n = src.numel() * src.element_size()
            if n <= 0:
                raise ValueError(f"{what}[{i}] is empty")
            blocks.setdefault(key, []).append((off, n, i))
            ids.setdefault(key, k)
        order = list(blocks)
        ekeys: list[bytes] = []
        ranges_of: list[tuple[tuple[int, int], ...]] = []
        block_entries: list[list[int]] = []
        for key in order:
            ents = sorted(blocks[key])
            pos = 0
            for j, (off, n, i) in enumerate(ents):
                if j and off < pos:
                    prev = ents[j - 1]
                    raise ValueError(f"block {ids[key]!r}: entries {prev[2]} ([{prev[0]}, {prev[0] + prev[1]})) and {i} "
                                     f"([{off}, {off + n})) overlap")
                pos = off + n
            ranges = tuple((off, n) for off, n, _ in ents)
            tiles = all(r[0] == sum(x[1] for x in ranges[:j]) for j, r in enumerate(ranges))
            whole = tiles and (self.block_size is None or pos >= self.block_size)
            ekeys.append(key if whole else piece_key(key, ranges))
            if not whole:
                self._layouts[ranges] = None
                self._layouts.move_to_end(ranges)
                while len(self._layouts) > _MAX_LAYOUTS:
                    self._layouts.popitem(last=False)
            ranges_of.append(ranges)
            block_entries.append([i for _, _, i in ents])
        # -- where each entry's bytes are -------------------------------------------------
        mems: list[torch.Tensor] = []
        for i, src in enumerate(sources):
            if isinstance(src, _Raw):
                mems.append(self._raw_memory(src, op == "load", f"{what}[{i}]"))
            else:
                mems.append(src)
        staged: list[int] = []  # entries in private CPU memory: copied through staging
        for i, t in enumerate(mems):
            if t.device.type == "cpu" and not t.untyped_storage().is_shared():
                staged.append(i)
            elif t.device.type != "cpu":
                try:
                    # Memory the engine can never open is the caller's error,
                    # said before anything is sent (and again on every call).
                    self.regions.export(t)
                except UnsupportedMemory as e:
                    raise UnsupportedMemory(f"{what}[{i}]: {e}") from None
        task = Task(0, direction, [ids[k] for k in order])
        task._block_bytes = [sum(n for _, n in r) for r in ranges_of]
        task._keep = list(mems)  # the engine may use this memory until the task is over
        if not order:
            task.done = True
            return task
        # Private CPU memory goes through pooled staging chunks. Each chunk's
        # blocks form their own engine task, so the copies overlap the I/O: a
        # dump copies chunk k+1 in while the engine writes chunk k, a load
        # copies a chunk out as soon as its task is done (see _record).
        chunks, placed, chunk_of = (self.staging.place([mems[i].numel() * mems[i].element_size() for i in staged])
                                    if staged else ([], [], []))
        block_of = {i: b for b, ents in enumerate(block_entries) for i in ents}
        views: dict[int, torch.Tensor] = dict(zip(staged, placed))
        chunk_of_block: dict[int, int] = {}
        for i, c in zip(staged, chunk_of):
            chunk_of_block.setdefault(block_of[i], c)
        if op == "load":
            task._copy_out = [(block_of[i], views[i], mems[i]) for i in staged]
        task._staging = chunks or None
        # -- requests: one per shard count (the engine wants the same count per block) and staging chunk ---
        groups: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        for b, ents in enumerate(block_entries):
            groups.setdefault((len(ents), chunk_of_block.get(b, -1)), []).append(b)
        task._deadline = Deadline(self.config.load_timeout_ms, max(task._block_bytes))
        task.status = ["failed"] * len(order)
        errors = []
        try:
            self._ready()
        except (EngineError, SettingsMismatch, RuntimeDirError) as e:
            errors.append(str(e))
            groups.clear()
        task._engine = self.client.engine_identity
        for (count, _chunk), bidx in groups.items():
            if op == "dump":
                for b in bidx:  # taken now: the caller may reuse its tensors as soon as dump() returns
                    for i in block_entries[b]:
                        if i in views:
                            views[i].copy_(mems[i].reshape(-1).view(torch.uint8))
            mem_list = [views.get(i, mems[i]) for b in bidx for i in block_entries[b]]
            try:
                tid = self._submit(op, [ekeys[b] for b in bidx], count, mem_list, task._deadline)
            except EngineError as e:
                errors.append(str(e))
                if isinstance(e, EngineUnavailable):
                    self._down = True
                    if e.sent == op:
                        # Sent, never answered: the engine may still run it, until
                        # its deadline. A part nobody can ask about (epoch -1).
                        task._parts.append(_Part(0, bidx, -1))
                continue
            task._parts.append(_Part(tid, bidx, self.client.epoch))
            task._engine = self.client.engine_identity
            if not task.task_id:
                task.task_id = tid
            if op == "dump":
                for b in bidx:
                    if ekeys[b] != order[b]:
                        lst = self._uncommitted.setdefault(order[b], [])
                        if ekeys[b] not in lst:
                            lst.append(ekeys[b])
                        self._uncommitted.move_to_end(order[b])
                while len(self._uncommitted) > _MAX_UNCOMMITTED:
                    self._uncommitted.popitem(last=False)
        if errors:
            task.error = "; ".join(errors)
        if not task._parts:
            # Engine down or request refused: every block failed (a miss to
            # recompute), never an exception in the caller's path.
            self._finish(task)
        return task

    def _raw_memory(self, src: _Raw, write: bool, where: str) -> torch.Tensor:
        if isinstance(src.addr, bool) or not isinstance(src.addr, int) or not isinstance(src.size, int) or src.size <= 0:
            raise ValueError(f"{where}: address {src.addr!r} and size {src.size!r} must be positive ints")
        hit = self.regions.find(src.addr, src.size)
        if hit is not None:
            storage, off = hit
            if isinstance(storage, torch.UntypedStorage):
                t = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
                return t[off:off + src.size]
        if host_range_ok(src.addr, src.size, write):
            return raw_tensor(src.addr, src.size)
        raise ValueError(f"{where}: address {src.addr:#x} (+{src.size} bytes) is neither inside memory this store has "
                         f"seen (pass the tensor to dump/load or register_memory first) nor {'writable' if write else 'readable'} "
                         "host memory of this process")

    def _submit(self, op: str, keys: list[bytes], count: int, mem: list[torch.Tensor], dl: Deadline) -> int:
        extra: dict[str, Any] = {"deadline_unix_ms": dl.unix_ms}
        for attempt in (0, 1):
            try:
                located = self.regions.locate_many(mem)
                shards = ShardList(count)
                for (rid, base), t in zip(located, mem):
                    shards.add(rid, base, t.numel() * t.element_size())
                cuda = next((t.device for t in mem if t.device.type == "cuda"), None)
                if op == "dump" and cuda is not None:
                    # The engine reads only after the work queued so far on this stream.
                    extra["event"] = self.regions.record_event(cuda)
                return int(self.client.call(op, ns=self.namespace, keys=keys, shards=shards.wire(), **extra)["task"])
            except EngineError as e:
                if e.code != "unknown_region" or attempt == 1:
                    raise
                self.regions.forget()  # a new session (engine restart): register again
        raise AssertionError("unreachable")

    # ---- results ------------------------------------------------------------------------

    def _ask(self, part: _Part, op: str, **args: Any) -> dict[str, Any] | None:
        """A request about a part; None when the engine cannot answer for it
        (unreachable, or the session it ran in is gone)."""
        if part.epoch != self.client.epoch:
            return None
        try:
            r = self.client.call(op, task=part.engine_task, **args)
        except EngineError as e:
            if isinstance(e, EngineUnavailable):
                self._down = True
            return None
        return r if part.epoch == self.client.epoch else None

    def _record(self, task: Task, part: _Part, r: dict[str, Any]) -> None:
        say_task_line(r)
        status = list(r.get("status", []))
        for j, b in enumerate(part.blocks):
            task.status[b] = status[j] if j < len(status) else "failed"
        task.bytes += int(r.get("bytes", 0))
        part.done = True
        self._copy_out(task, set(part.blocks))

    @staticmethod
    def _copy_out(task: Task, blocks: set[int] | None = None) -> None:
        """A staged load's bytes reach the caller's tensors: those of `blocks`
        (all when None) that arrived whole; the rest stay untouched."""
        ok = {"ok", "skipped"}
        left = []
        for b, view, t in task._copy_out:
            if blocks is not None and b not in blocks:
                left.append((b, view, t))
            elif task.status[b] in ok:
                t.reshape(-1).view(torch.uint8).copy_(view)
        task._copy_out = left

    def _settle(self, task: Task, part: _Part) -> None:
        """A part not finished when the caller stops waiting: cancelled, and
        then done as far as memory goes. The engine's acknowledgement says
        nothing of it runs any more; without one (unreachable), only the
        engine process being gone or the deadline having passed says so, and
        until then this blocks."""
        if not part.cancel_acked and self._ask(part, "cancel") is not None:
            part.cancel_acked = True
        if part.cancel_acked:
            r = self._ask(part, "wait", timeout_ms=1000, deadline_ms=1000 + self.config.timeout_ms)
            if r is not None and r.get("done"):
                self._record(task, part, r)
                return
        elif not process_gone(task._engine):
            task._deadline.sleep_until()  # type: ignore[union-attr]
        for b in part.blocks:
            task.status[b] = "cancelled" if part.cancel_acked else "failed"
        part.done = True

    def _finish(self, task: Task) -> None:
        ok = {"ok", "skipped"}
        self._copy_out(task)
        for chunk in task._staging or []:
            self.staging.give(chunk)
        task._staging = None
        task._copy_out = []
        task._keep = []
        task.failed_keys = [task.keys[b] for b, s in enumerate(task.status) if s not in ok]
        task.done = True


def _raws(addrs: Sequence[int], sizes: Sequence[int]) -> list[_Raw]:
    if len(addrs) != len(sizes):
        raise ValueError(f"addresses and sizes must have the same length, got {len(addrs)} and {len(sizes)}")
    return [_Raw(a, s) for a, s in zip(addrs, sizes)]
