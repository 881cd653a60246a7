"""UCM's current store interface (`ucm.store.ucmstore_v1` in UCM), beside
its v0.1.0 one (ucm.store.ucmstore), so that code written against either runs
on this store. The names, arguments and return values follow UCM's; where
this package differs, docs/ucm_store.md says so.

What changed from v0.1.0: block ids are bytes (vLLM's block hashes); a block
is made of shards of equal size (`shard_size`; `block_size` / `shard_size`
of them, e.g. one per layer), and a transfer names for each block one shard
(`shard_index`) and the tensors or addresses that hold it, one after the
other; a block is visible once its last shard is written (no create, no
commit); `wait` returns nothing and raises on failure; `lookup_on_prefix`
answers how far the stored prefix of a run of blocks goes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List

import torch


class Task:
    """A transfer in flight, returned by load/dump/load_data/dump_data and
    handed back to wait/check. Implementations add `task_id`."""


class UcmKVStoreBaseV1(ABC):
    """A KV cache block store, UCM's current interface."""

    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config

    @abstractmethod
    def cc_store(self) -> int:
        """UCM: the address of the native store object, for native consumers."""

    @abstractmethod
    def lookup(self, block_ids: List[bytes]) -> List[bool]:
        """True per block that is stored."""

    @abstractmethod
    def lookup_on_prefix(self, block_ids: List[bytes]) -> int:
        """The index of the last block of the stored prefix of `block_ids`
        (every block up to it is stored), -1 when the first is not."""

    @abstractmethod
    def prefetch(self, block_ids: List[bytes]) -> None:
        """A hint that these blocks will be loaded soon."""

    @abstractmethod
    def load(self, block_ids: List[bytes], shard_index: List[int], dst_tensor: List[List[torch.Tensor]]) -> Task:
        """Block i's shard shard_index[i] into the tensors dst_tensor[i], one after the other."""

    @abstractmethod
    def dump(self, block_ids: List[bytes], shard_index: List[int], src_tensor: List[List[torch.Tensor]]) -> Task:
        """The tensors src_tensor[i], one after the other, become shard shard_index[i] of block i."""

    @abstractmethod
    def load_data(self, block_ids: List[bytes], shard_index: List[int], dst_addr: Any) -> Task:
        """load() into raw addresses: dst_addr[i][j] (a list of lists, or a 2-D array) of tensor j's size."""

    @abstractmethod
    def dump_data(
        self, block_ids: List[bytes], shard_index: List[int], src_addr: Any, prerequisite_handle: int = 0
    ) -> Task:
        """dump() from raw addresses; `prerequisite_handle`: an event the copy waits for (0: none)."""

    @abstractmethod
    def wait(self, task: Task) -> None:
        """Blocks until the task finished; raises RuntimeError when it failed."""

    @abstractmethod
    def check(self, task: Task) -> bool:
        """Non-blocking: True once the task finished."""
