"""UcmPipelineStore: UCM's current store class (`ucm.store.pipeline.connector`
in UCM, interface ucm.store.ucmstore_v1), over this package's engine.

    store = UcmConnectorFactoryV1.create_connector("UcmPipelineStore", {
        "store_pipeline": "Cache|Posix", "storage_backends": ["/mnt/kv"],
        "device_id": 0, "shard_size": layer_bytes, "block_size": block_bytes,
        "tensor_size_list": [k_bytes, v_bytes]})
    task = store.dump_data(ids, [layer] * len(ids), addrs)  # addrs[i]: block i's K and V of `layer`
    store.wait(task)                                        # raises RuntimeError when a block failed
    last = store.lookup_on_prefix(ids)                      # -1: none stored
    store.wait(store.load(ids, [layer] * len(ids), tensors))

The config is UCM's flat store config: ucm_connector_config's keys (UCM's
names mapped onto ours, or accepted with no effect, as in the YAML:
ucm.ucm_keys) plus what UCM's connector adds for its store (`device_id`,
`shard_size`, `block_size`, `tensor_size_list`, `unique_id`, ...), which
describe the caller and are taken here, not passed to the engine.

A block is `block_size` bytes in shards of `shard_size` (one shard when
either is unknown): each shard is stored as a block file of its own, the
last one under the block id itself and the others under a digest of the id
and the shard's index. So `lookup` of a block id answers whether its last
shard is stored, as UCM's Posix store makes a block visible when its last
shard is written, and a process that knows only `block_size` (UCM's
scheduler) asks the same question as the workers that wrote it. A shard
written without the others is a block whose load finds the missing ones
absent: a failed load, never wrong bytes. Dumps are committed by the engine
as each shard lands (there is no commit call in this interface).

Differences from UCM (docs/ucm_store.md): the Cache stage is the engine's,
shared by every process on the node (docs/cache_stage.md), and `prefetch`
does nothing (blocks enter the stage when they are dumped or loaded); a
worker tells the engine its shard's size when it opens, so that the stage
makes its memory before the first dump; `cc_store` raises;
`wait` raises only once the engine can no longer touch the task's memory,
and `check` never raises (a failure is what `wait` says, or the task's
`failed_block_ids`); raw addresses of GPU memory must be inside a tensor the
store has seen (`register_memory`); `prerequisite_handle` is not needed: a
dump of CUDA memory records its own event on the current stream when it is
submitted, and the engine copies only after it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch

from ..nfs_store import DEFAULT_NS, NfsStore
from ..nfs_store import Task as NfsTask
from ..nfsstore.nfsstore_connector import engine_config
from ..pieces import block_key
from ..ucmstore_v1 import Task, UcmKVStoreBaseV1

__all__ = ["RUNTIME_KEYS", "UcmNfsStoreV1", "UcmPipelineStore", "UcmPipelineStoreTransTask"]

#: what UCM's connector adds to the store's config: the caller's device and
#: KV layout, not settings of the store
RUNTIME_KEYS = frozenset(
    {
        "unique_id",
        "device_id",
        "tensor_size",
        "tensor_size_list",
        "shard_size",
        "block_size",
        "local_rank_size",
        "cpu_affinity_cores",
        "posix_gc_enable",
    }
)


@dataclass(eq=False)
class UcmPipelineStoreTransTask(Task):
    """A load or dump of this interface: `task_id` is the engine's (> 0 once
    submitted). After wait()/check() said it finished, `failed_block_ids`
    names the blocks not transferred and `status` says why, per block."""

    task_id: int
    direction: str
    block_ids: list[Any]
    done: bool = False
    failed_block_ids: list[Any] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    _inner: NfsTask | None = field(default=None, repr=False)
    _owner: dict[bytes, int] = field(default_factory=dict, repr=False)


def _size(config: Dict[str, Any], key: str) -> int | None:
    v = config.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{key} must be a positive int, got {v!r}")
    return v


class UcmPipelineStore(UcmKVStoreBaseV1):
    #: the connector name its config is checked as (UcmPipelineStore needs store_pipeline)
    CONNECTOR_NAME = "UcmPipelineStore"

    def __init__(self, config: Dict[str, Any]) -> None:
        if not isinstance(config, dict):
            raise TypeError(f"{self.CONNECTOR_NAME} config must be a dict, got {type(config).__name__}")
        super().__init__(config)
        self.tensor_size = _size(config, "tensor_size")
        self.shard_size = _size(config, "shard_size")
        self.block_size = _size(config, "block_size")
        sizes = config.get("tensor_size_list")
        if sizes is not None:
            sizes = list(sizes.tolist() if hasattr(sizes, "tolist") else sizes)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
                raise ValueError(f"tensor_size_list must be a list of positive ints, got {sizes!r}")
        self.tensor_size_list: list[int] | None = sizes
        self.shards = 1
        if self.shard_size and self.block_size:
            if self.block_size % self.shard_size:
                raise ValueError(f"block_size {self.block_size} is not a multiple of shard_size {self.shard_size}")
            self.shards = self.block_size // self.shard_size
        device = config.get("device_id", -1)
        role = "worker" if isinstance(device, int) and device >= 0 else "scheduler"
        flat = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
        self.store = NfsStore(
            engine_config(flat, self.CONNECTOR_NAME),
            namespace=DEFAULT_NS,
            name=f"ucm.{self.CONNECTOR_NAME}.{role}",
            prefault_staging=False,  # UCM's callers pass device memory; staging is made at its first use
        )
        # A worker's block files each hold one shard: the size the engine's Cache stage prepares for.
        if role == "worker" and (self.shard_size or self.block_size):
            self.store.expect_block_bytes(self.shard_size or self.block_size)

    # ---- where a shard lives --------------------------------------------------------

    def _key(self, block_id: Any, shard: Any, i: int) -> bytes:
        """The block file of shard `shard` of block `block_id`: the last shard
        under the id itself, the others under a digest of id and index."""
        key = block_key(block_id, f"block_ids[{i}]")
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self.shards:
            raise ValueError(
                f"shard_index[{i}] must be an int from 0 to {self.shards - 1} (block_size / shard_size), got {shard!r}"
            )
        if shard == self.shards - 1:
            return key
        return hashlib.sha256(b"ucm-v1-shard|%d|" % shard + key).digest()

    def _plan(
        self, block_ids: Sequence[Any], shard_index: Sequence[int], rows: Sequence[Sequence[Any]], what: str
    ) -> tuple[list[bytes], dict[bytes, int]]:
        if not (len(block_ids) == len(shard_index) == len(rows)):
            raise ValueError(
                f"block_ids, shard_index and {what} must have one entry per block, "
                f"got {len(block_ids)}, {len(shard_index)} and {len(rows)}"
            )
        keys, owner = [], {}
        for i, (b, s) in enumerate(zip(block_ids, shard_index)):
            k = self._key(b, s, i)
            keys.append(k)
            owner.setdefault(k, i)
        return keys, owner

    def _check_shard(self, nbytes: int, i: int, what: str) -> None:
        if self.shard_size is not None and nbytes != self.shard_size:
            raise ValueError(f"{what}[{i}] holds {nbytes} bytes; a shard is shard_size = {self.shard_size} bytes")

    def _column_sizes(self, n: int) -> list[int]:
        if self.tensor_size_list is not None and len(self.tensor_size_list) == n:
            return list(self.tensor_size_list)
        if self.tensor_size is not None:
            return [self.tensor_size] * n
        if self.shard_size is not None and self.shard_size % n == 0:
            return [self.shard_size // n] * n
        raise ValueError(
            f"{n} addresses per shard, and no size for them: give tensor_size_list (one size per address) "
            "or tensor_size in the store's config"
        )

    def _tensors(self, op: str, block_ids, shard_index, rows) -> UcmPipelineStoreTransTask:
        what = "dst_tensor" if op == "load" else "src_tensor"
        keys, owner = self._plan(block_ids, shard_index, rows, what)
        ks, offs, ts = [], [], []
        for i, (key, row) in enumerate(zip(keys, rows)):
            off = 0
            for t in row:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{what}[{i}] must be a list of tensors, got {type(t).__name__}")
                ks.append(key)
                offs.append(off)
                ts.append(t)
                off += t.numel() * t.element_size()
            self._check_shard(off, i, what)
        inner = self.store.load(ks, offs, ts) if op == "load" else self.store.dump(ks, offs, ts, commit=True)
        return self._task(inner, block_ids, owner)

    def _addresses(self, op: str, block_ids, shard_index, addr: Any) -> UcmPipelineStoreTransTask:
        what = "dst_addr" if op == "load" else "src_addr"
        rows = addr.tolist() if hasattr(addr, "tolist") else [list(r) for r in addr]
        keys, owner = self._plan(block_ids, shard_index, rows, what)
        ks, offs, addrs, sizes = [], [], [], []
        for i, (key, row) in enumerate(zip(keys, rows)):
            off = 0
            for a, n in zip(row, self._column_sizes(len(row))):
                ks.append(key)
                offs.append(off)
                addrs.append(int(a))
                sizes.append(n)
                off += n
            self._check_shard(off, i, what)
        if op == "load":
            inner = self.store.fetch_data(ks, offs, addrs, sizes)
        else:
            inner = self.store.dump_data(ks, offs, addrs, sizes, commit=True)
        return self._task(inner, block_ids, owner)

    def _task(self, inner: NfsTask, block_ids: Sequence[Any], owner: dict[bytes, int]) -> UcmPipelineStoreTransTask:
        task = UcmPipelineStoreTransTask(inner.task_id, inner.direction, list(block_ids), _inner=inner, _owner=owner)
        if inner.done:
            self._finish(task)
        return task

    def _finish(self, task: UcmPipelineStoreTransTask) -> None:
        inner = task._inner
        assert inner is not None and inner.done
        failed = {task._owner[k] for k in inner.failed_keys if k in task._owner}
        by_key = dict(zip(inner.keys, inner.status)) if inner.status else {}
        task.status = ["failed"] * len(task.block_ids)
        for k, i in task._owner.items():
            task.status[i] = by_key.get(k, "failed")
        task.failed_block_ids = [task.block_ids[i] for i in sorted(failed)]
        task.done = True

    # ---- UCM's interface ----------------------------------------------------------------

    def cc_store(self) -> int:
        raise NotImplementedError(
            f"{self.CONNECTOR_NAME} has no in-process native store: the store runs in the engine process "
            "(docs/ucm_store.md)"
        )

    def lookup(self, block_ids: List[bytes]) -> List[bool]:
        return self.store.lookup([self._key(b, self.shards - 1, i) for i, b in enumerate(block_ids)])

    def lookup_on_prefix(self, block_ids: List[bytes]) -> int:
        return self.store.lookup_prefix([self._key(b, self.shards - 1, i) for i, b in enumerate(block_ids)]) - 1

    def prefetch(self, block_ids: List[bytes]) -> None:
        return None  # blocks enter the engine's Cache stage when dumped or loaded, not ahead

    def load(self, block_ids: List[bytes], shard_index: List[int], dst_tensor: List[List[torch.Tensor]]) -> Task:
        return self._tensors("load", block_ids, shard_index, dst_tensor)

    def dump(self, block_ids: List[bytes], shard_index: List[int], src_tensor: List[List[torch.Tensor]]) -> Task:
        return self._tensors("dump", block_ids, shard_index, src_tensor)

    def load_data(self, block_ids: List[bytes], shard_index: List[int], dst_addr: Any) -> Task:
        return self._addresses("load", block_ids, shard_index, dst_addr)

    def dump_data(
        self, block_ids: List[bytes], shard_index: List[int], src_addr: Any, prerequisite_handle: int = 0
    ) -> Task:
        # prerequisite_handle: not needed, a dump of CUDA memory records its own event on the current stream.
        return self._addresses("dump", block_ids, shard_index, src_addr)

    def wait(self, task: Task) -> None:
        """Blocks until the task finished (and the engine can no longer touch
        its memory); raises RuntimeError naming the failed blocks' count and
        statuses when any block was not transferred."""
        assert isinstance(task, UcmPipelineStoreTransTask) and task._inner is not None
        if not task.done:
            self.store.wait(task._inner)
            self._finish(task)
        if task.failed_block_ids:
            why = sorted({s for s in task.status if s not in ("ok", "skipped")})
            raise RuntimeError(
                f"{self.CONNECTOR_NAME} {'load' if task.direction == 'S2D' else 'dump'} task {task.task_id}: "
                f"{len(task.failed_block_ids)} of "
                f"{len(task.block_ids)} blocks failed ({', '.join(why)})"
                + (f": {task._inner.error}" if task._inner.error else "")
            )

    def check(self, task: Task) -> bool:
        """Non-blocking: True once the task finished (`failed_block_ids` then says which blocks failed)."""
        assert isinstance(task, UcmPipelineStoreTransTask) and task._inner is not None
        if not task.done and self.store.check(task._inner):
            self._finish(task)
        return task.done

    # ---- beyond UCM's interface -----------------------------------------------------------

    def register_memory(self, tensors: List[torch.Tensor]) -> None:
        """Not in UCM: makes long-lived buffers reachable by raw address
        (load_data/dump_data) and moves CPU ones into shared memory once
        (NfsStore.register_memory)."""
        self.store.register_memory(tensors)

    def close(self) -> None:
        """Not in UCM (its store lives as long as the object): says goodbye to the engine now."""
        self.store.close()


class UcmNfsStoreV1(UcmPipelineStore):
    """What UCM's factory_v1 creates for "UcmNfsStore": the same store, with no store_pipeline required."""

    CONNECTOR_NAME = "UcmNfsStore"
