"""UcmNfsStore: UCM's NFS store class (ucm.store.nfsstore.nfsstore_connector),
built from UCM's flat connector config, over this package's engine.

    store = UcmNfsStore({"storage_backends": "/mnt/kv", "kv_block_size": 1 << 20,
                         "transferStreamNumber": 32})
    store.create(ids); task = store.dump(ids, offsets, tensors); store.wait(task); store.commit(ids, True)

UCM's keys are mapped to the engine's (`use_direct` -> `odirect`,
`stream_number` -> `transferStreamNumber`, `storage_capacity` -> `capacity`,
`io_direct` -> `odirect`, ...) or warned about once with the reason
(ucm.ucm_keys: the engine's table); keys of this package's own config pass
through, any other key is an error. docs/ucm_store.md has the differences.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import torch

from ... import status as block_status
from ...config import OPTION_KEYS
from ...ucm_keys import say_once, translate
from ..nfs_store import DEFAULT_NS, NfsStore, Task
from ..ucmstore import UcmKVStoreBase

logger = logging.getLogger("ucm")

#: UCM's status for a block that already exists (its Status::DuplicateKey)
EDUPLICATE = -50003
#: UCM's generic error status
ERROR = -1

NfsTask = Task  # UCM's name for the task type of this store

#: UCM keys that describe the caller, not the store (its role, device, block
#: size): arguments of UCM's store object, taken silently here
CALLER_KEYS = frozenset({"role", "device", "transferDeviceId", "kv_block_size", "kvcacheBlockSize", "transferEnable"})


def engine_config(
    flat: Dict[str, Any], connector_name: str = "UcmNfsStore", caller_keys: frozenset[str] = CALLER_KEYS
) -> Dict[str, Any]:
    """This package's config (the seed's YAML as a dict) from UCM's flat
    connector config: UCM's keys (v0.1.0's and today's, ucm.ucm_keys) turned
    into ours, those with no effect here warned about once per process (the
    engine never sees them), `caller_keys` left out. Raises ValueError
    (ConfigError) naming the key for a key nobody documents, and naming both
    when two spellings of one setting disagree."""
    if not isinstance(flat, dict):
        raise TypeError(f"{connector_name} config must be a dict, got {type(flat).__name__}")
    given = {k: v for k, v in flat.items() if k not in caller_keys}
    sb = given.get("storage_backends")
    if isinstance(sb, (list, tuple)):
        given["storage_backends"] = ":".join(str(p) for p in sb if p)
    tr = translate(given, connector_name, "config", OPTION_KEYS)
    say_once(tr.notes, logging.WARNING)
    cc = tr.raw
    if "storage_backends" not in cc:
        raise ValueError(
            f"{connector_name} config needs storage_backends (a directory, or several separated by ':'); "
            f"got keys {sorted(flat)}"
        )
    if cc.get("capacity") == 0:
        del cc["capacity"]  # UCM's 0: no limit, as ours
    # UCM's pipeline keys set no one option of ours: they go on as given, so
    # that the Cache stage (its size, write-behind) is derived from them as
    # from a config file, by the engine and by the launcher alike.
    for k in ("store_pipeline", "cache_buffer_capacity_gb"):
        if given.get(k) is not None:
            cc[k] = given[k]
    return {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": cc}


class UcmNfsStore(UcmKVStoreBase):
    def __init__(self, config: Dict[str, Any]):
        super().__init__(config)
        block_size = config.get("kv_block_size", config.get("kvcacheBlockSize"))
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0
        ):
            raise ValueError(f"UcmNfsStore config kv_block_size must be a positive int, got {block_size!r}")
        role = config.get("role", "worker")
        self.store = NfsStore(
            engine_config(config),
            namespace=DEFAULT_NS,
            block_size=block_size,
            name=f"ucm.UcmNfsStore.{role}",
            prefault_staging=False,  # UCM's callers mostly pass device memory; staging is made at its first use
        )

    def cc_store(self) -> int:
        raise NotImplementedError(
            "UcmNfsStore has no in-process C++ store: the store runs in the engine process (docs/ucm_store.md)"
        )

    def create(self, block_ids: List[str]) -> List[int]:
        """0 per block to dump; EDUPLICATE (-50003, UCM's code) per block already
        stored. Nothing is allocated: a dump writes the whole block file."""
        return [EDUPLICATE if found else 0 for found in self.store.lookup(block_ids)]

    def lookup(self, block_ids: List[str]) -> List[bool]:
        return self.store.lookup(block_ids)

    def prefetch(self, block_ids: List[str]) -> None:
        return None

    def load(self, block_ids: List[str], offset: List[int], dst_tensor: List[torch.Tensor]) -> Task:
        return self.store.load(block_ids, offset, dst_tensor)

    def dump(self, block_ids: List[str], offset: List[int], src_tensor: List[torch.Tensor]) -> Task:
        return self.store.dump(block_ids, offset, src_tensor)

    def fetch_data(self, block_ids: List[str], offset: List[int], dst_addr: List[int], size: List[int]) -> Task:
        return self.store.fetch_data(block_ids, offset, dst_addr, size)

    def dump_data(self, block_ids: List[str], offset: List[int], src_addr: List[int], size: List[int]) -> Task:
        return self.store.dump_data(block_ids, offset, src_addr, size)

    def wait(self, task: Task) -> int:
        """0 when every block succeeded, else the number of failed blocks. As in
        UCM, a dump of a block already stored (or being written by another
        dump) fails: `create` said EDUPLICATE for it, and the bytes given may
        not be the ones stored (NfsStore itself reports such blocks
        `skipped`, a success)."""
        self.store.wait(task)
        return _ucm_failures(task)

    def commit(self, block_ids: List[str], is_success: bool = True) -> None:
        self.store.commit(block_ids, is_success=is_success)

    def check(self, task: Task) -> Tuple[int, bool]:
        if not self.store.check(task):
            return 0, False
        return _ucm_failures(task), True

    def register_memory(self, tensors: List[torch.Tensor]) -> None:
        """Not in UCM: moves long-lived CPU buffers into shared memory once, so
        transfers of them skip the staging copy (NfsStore.register_memory)."""
        self.store.register_memory(tensors)

    def close(self) -> None:
        """Not in UCM (its store lives as long as the object): says goodbye to the engine now."""
        self.store.close()


def _ucm_failures(task: Task) -> int:
    """Failed blocks as UCM counts them: a dump's `skipped` blocks too."""
    n = len(task.failed_keys)
    if task.direction == "D2S":
        n += task.status.count(block_status.SKIPPED)
    return n
