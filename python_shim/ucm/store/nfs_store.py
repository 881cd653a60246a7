"""`NfsStore`: UCM's store interface over the engine.

    store = NfsStore("ucm_config.yaml")       # or the config as a dict
    found = store.lookup([k1, k2])            # -> [bool, bool]
    task = store.dump(keys, offsets, tensors) # device -> storage
    store.wait(task)                          # 0 when every block succeeded
    store.commit(keys)                        # make them visible
    task = store.load(keys, offsets, tensors) # storage -> device
    store.close()

Entry i of a dump or load says: tensor i holds the bytes of block keys[i]
starting at byte offsets[i] of that block. Entries with the same key form one
block; sorted by offset they must tile it from 0 without gaps. Every block of
one call must have the same number of entries. Tensors must be contiguous
views into memory the engine can reach (see ucm.memory).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..client import EngineClient, EngineError, EngineUnavailable
from ..config import StoreConfig, load_config
from ..launcher import ensure_engine
from ..memory import RegionRegistry, ShardList, UnsupportedMemory

DEFAULT_NS = "ucm-store"


@dataclass
class Task:
    """A dump or load in flight. After wait(): `failed_keys`, `status`."""

    task_id: int | None
    direction: str
    keys: list[bytes]
    done: bool = False
    status: list[str] = field(default_factory=list)
    failed_keys: list[bytes] = field(default_factory=list)
    bytes: int = 0
    error: str | None = None


class NfsStore:
    def __init__(self, config: str | os.PathLike[str] | dict[str, Any], *, namespace: str = DEFAULT_NS,
                 start_engine: bool = True, name: str = "ucm.store"):
        self.config: StoreConfig = load_config(config)
        self.namespace = namespace
        if start_engine:
            ensure_engine(self.config)
        self.client = EngineClient(self.config.endpoint, self.config.timeout_ms, name)
        self.regions = RegionRegistry(self.client)

    # ---- the five operations --------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> list[bool]:
        keys = _check_keys(keys)
        if not keys:
            return []
        return list(self.client.call("lookup", ns=self.namespace, keys=keys)["found"])

    def dump(self, keys: Sequence[bytes], offsets: Sequence[int], tensors: Sequence[torch.Tensor]) -> Task:
        return self._transfer("dump", "D2S", keys, offsets, tensors)

    def load(self, keys: Sequence[bytes], offsets: Sequence[int], tensors: Sequence[torch.Tensor]) -> Task:
        return self._transfer("load", "S2D", keys, offsets, tensors)

    def wait(self, task: Task, timeout_ms: int | None = None) -> int:
        """Blocks until the task finished; 0 when every block succeeded, else the number of failed blocks."""
        if not task.done:
            if task.task_id is None:
                task.done = True
            else:
                timeout = timeout_ms if timeout_ms is not None else self.config.load_timeout_ms
                try:
                    r = self.client.call("wait", deadline_ms=timeout + self.config.timeout_ms, task=task.task_id, timeout_ms=timeout)
                    if not r.get("done"):
                        # Given up: the engine must stop writing these tensors before we say so.
                        self.client.call("cancel", task=task.task_id)
                        raise EngineUnavailable(f"task {task.task_id} not done within {timeout} ms; cancelled")
                    self._finish(task, r)
                except EngineError as e:
                    task.done = True
                    task.error = str(e)
                    task.status = ["failed"] * len(task.keys)
                    task.failed_keys = list(task.keys)
        return len(task.failed_keys)

    def check(self, task: Task) -> bool:
        """Non-blocking: True once the task finished (results filled in)."""
        if task.done or task.task_id is None:
            return True
        r = self.client.call("check", task=task.task_id)
        if r.get("done"):
            self._finish(task, r)
        return task.done

    def cancel(self, task: Task) -> bool:
        """Stops a running task: blocks not yet copied end as failed. Returns
        True once the engine guarantees that no block of it writes the tensors
        any more (also when the task had already finished), False when the
        engine could not be asked."""
        if task.done or task.task_id is None:
            return True
        try:
            self.client.call("cancel", task=task.task_id)
            return True
        except EngineError:
            return False

    def commit(self, keys: Sequence[bytes], success: bool = True) -> list[bool]:
        keys = _check_keys(keys)
        if not keys:
            return []
        return list(self.client.call("commit", ns=self.namespace, keys=keys, success=bool(success))["committed"])

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "NfsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers ---------------------------------------------------------------

    def _finish(self, task: Task, r: dict[str, Any]) -> None:
        task.done = True
        task.status = list(r.get("status", []))
        task.bytes = int(r.get("bytes", 0))
        task.failed_keys = [task.keys[i] for i in r.get("failed", [])]

    def _transfer(self, op: str, direction: str, keys: Sequence[bytes], offsets: Sequence[int],
                  tensors: Sequence[torch.Tensor]) -> Task:
        keys = _check_keys(keys)
        if not (len(keys) == len(offsets) == len(tensors)):
            raise ValueError(f"keys, offsets and tensors must have the same length, got {len(keys)}, {len(offsets)}, {len(tensors)}")
        blocks: dict[bytes, list[tuple[int, int, torch.Tensor]]] = {}
        for i, (k, off, t) in enumerate(zip(keys, offsets, tensors)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_contiguous():
                raise ValueError(f"tensors[{i}] must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
            if not isinstance(off, int) or off < 0:
                raise ValueError(f"offsets[{i}] must be a non-negative int, got {off!r}")
            blocks.setdefault(k, []).append((off, i, t))
        order = list(blocks)
        per_block = {len(v) for v in blocks.values()}
        if len(per_block) > 1:
            raise ValueError(f"every block of one call must have the same number of shards, got {sorted(per_block)}")
        shards = ShardList(per_block.pop() if per_block else 1)
        layout: list[tuple[int, torch.Tensor]] = []
        for k in order:
            pos = 0
            for off, i, t in sorted(blocks[k], key=lambda e: e[0]):
                if off != pos:
                    raise ValueError(f"block {k.hex()}: shard at offset {off} leaves a gap or overlap (expected {pos})")
                n = t.numel() * t.element_size()
                layout.append((n, t))
                pos += n
                try:
                    # Memory the engine can never open is the caller's error,
                    # said before anything is sent (and again on every call).
                    self.regions.export(t)
                except UnsupportedMemory as e:
                    raise UnsupportedMemory(f"tensors[{i}]: {e}") from None
        task = Task(None, direction, order)
        if not order:
            task.done = True
            return task
        try:
            for attempt in (0, 1):
                shards = ShardList(shards.per_block)
                for n, t in layout:
                    rid, base = self.regions.locate(t)
                    shards.add(rid, base, n)
                extra: dict[str, Any] = {}
                dev = layout[0][1].device
                if op == "dump" and dev.type == "cuda":
                    # The engine reads only after the work queued so far on this stream.
                    extra["event"] = self.regions.record_event(dev)
                try:
                    r = self.client.call(op, ns=self.namespace, keys=order, shards=shards.wire(), **extra)
                    break
                except EngineError as e:
                    if e.code != "unknown_region" or attempt == 1:
                        raise
                    self.regions.forget()  # a new session (engine restart): register again
            task.task_id = int(r["task"])
        except EngineError as e:
            # Engine down or request refused: every block of the task failed
            # (a miss to recompute), never an exception in the caller's path.
            task.done = True
            task.error = str(e)
            task.status = ["failed"] * len(order)
            task.failed_keys = list(order)
        return task


def _check_keys(keys: Sequence[bytes]) -> list[bytes]:
    out = []
    for i, k in enumerate(keys):
        if not isinstance(k, (bytes, bytearray, memoryview)):
            raise TypeError(f"keys[{i}] must be bytes, got {type(k).__name__}")
        k = bytes(k)
        if not 1 <= len(k) <= 64:
            raise ValueError(f"keys[{i}] must be 1 to 64 bytes, got {len(k)}")
        out.append(k)
    return out
