"""UCM's store interface (`ucm.store.ucmstore` in UCM), so that code written
against UCM's stores runs on this one. The names, argument types and return
values follow UCM; where this package differs, docs/ucm_store.md says so.

A block id is a str (UCM's form, e.g. a hex digest) or bytes (vLLM's block
hash); a str's UTF-8 bytes are its key, so "ab" and b"ab" are one block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Tuple

import torch


class Task:
    """A transfer in flight, returned by dump/load/dump_data/fetch_data.
    Implementations add `task_id` (> 0 once submitted)."""


class UcmKVStoreBase(ABC):
    """A KV cache block store: blocks are created, written (dump), committed,
    found (lookup) and read back (load)."""

    def __init__(self, config: Dict[str, Any]):
        self.config = config

    @abstractmethod
    def cc_store(self) -> int:
        """UCM: the address of the C++ store object, for native consumers."""

    @abstractmethod
    def create(self, block_ids: List[str]) -> List[int]:
        """Prepares blocks for a dump: 0 per block to write, non-zero per block
        not to write (already stored, or the store cannot take it)."""

    @abstractmethod
    def lookup(self, block_ids: List[str]) -> List[bool]:
        """True per block that is stored and committed."""

    @abstractmethod
    def prefetch(self, block_ids: List[str]) -> None:
        """A hint that these blocks will be loaded soon."""

    @abstractmethod
    def load(self, block_ids: List[str], offset: List[int], dst_tensor: List[torch.Tensor]) -> Task:
        """Entry i: bytes [offset[i], offset[i] + size of dst_tensor[i]) of block block_ids[i] into dst_tensor[i]."""

    @abstractmethod
    def dump(self, block_ids: List[str], offset: List[int], src_tensor: List[torch.Tensor]) -> Task:
        """Entry i: src_tensor[i] becomes bytes [offset[i], ...) of block block_ids[i] (visible after commit)."""

    @abstractmethod
    def fetch_data(self, block_ids: List[str], offset: List[int], dst_addr: List[int], size: List[int]) -> Task:
        """load() into raw addresses of `size` bytes each."""

    @abstractmethod
    def dump_data(self, block_ids: List[str], offset: List[int], src_addr: List[int], size: List[int]) -> Task:
        """dump() from raw addresses of `size` bytes each."""

    @abstractmethod
    def wait(self, task: Task) -> int:
        """Blocks until the task finished: 0 when every block succeeded, else non-zero."""

    @abstractmethod
    def commit(self, block_ids: List[str], is_success: bool = True) -> None:
        """Makes dumped blocks visible (is_success True) or discards them."""

    @abstractmethod
    def check(self, task: Task) -> Tuple[int, bool]:
        """Non-blocking: (ret, finished); ret as wait() returns once finished."""
