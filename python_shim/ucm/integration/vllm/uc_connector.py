"""UnifiedCacheConnectorV1: vLLM's KV connector for the UCM NFS Store.

Use it exactly as the seed says:

    --kv-transfer-config '{"kv_connector": "UnifiedCacheConnectorV1",
      "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
      "kv_role": "kv_both",
      "kv_connector_extra_config": {"UCM_CONFIG_FILE": "/path/ucm_config.yaml"}}'

Scheduler side: turns `request.block_hashes` into keys, asks the engine
which of the blocks beyond what vLLM already holds are stored (in every TP
rank's namespace; off vLLM's step, answered a step later), plans loads and
saves (the prompt's
blocks as the prefill completes them; the blocks of generated tokens in
batches while the request decodes and the rest when it finishes, so that a
chat's next turn, which sends the answer back as prompt, finds them too).
Worker side:
registers the KV cache memory with the engine, loads planned blocks before
the forward pass that needs them and hands newly computed blocks to the
engine after the pass that wrote them. The engine moves the bytes.

When the engine is unreachable or slow, every operation degrades to a miss:
vLLM keeps serving, nothing waits past the configured timeouts, and the
connector tries again later (starting the engine if none is running).

This class only routes vLLM's calls, as vLLM's own connectors do: the
scheduler process gets a `UCMScheduler` (scheduler.py), each worker a
`UCMWorker` (worker.py); common.py reads the options both use, link.py
holds the engine connection policy and ucm.transfer the transfers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import stats as ucm_stats
from .common import ConnectorOptions, Transfer, UCMConnectorMetadata, UCMWorkerMetadata, warn_hashseed_once
from .scheduler import UCMScheduler
from .worker import UCMWorker

try:  # vLLM >= 0.30 labels external hits by tier
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover
    CacheHitSource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["UnifiedCacheConnectorV1", "UCMConnectorMetadata", "UCMWorkerMetadata"]

_Transfer = Transfer  # the name tests and older code import from here


class UnifiedCacheConnectorV1(KVConnectorBase_V1):
    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        warn_hashseed_once()
        opts = ConnectorOptions.from_vllm(vllm_config, kv_cache_config)
        self.config = opts.config
        name = f"vllm-{role.name.lower()}-{os.getpid()}"
        self.connector_scheduler: UCMScheduler | None = None
        self.connector_worker: UCMWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = UCMScheduler(opts, name)
            # vLLM may ask about every waiting request in one step: no routing call in between.
            self.get_num_new_matched_tokens = self.connector_scheduler.get_num_new_matched_tokens  # type: ignore[method-assign]
        else:
            self.connector_worker = UCMWorker(opts, name)
        self._side: UCMScheduler | UCMWorker = self.connector_scheduler or self.connector_worker  # type: ignore[assignment]
        self.client = self._side.client

    def __getattr__(self, name: str) -> Any:
        # Diagnostics and tests read a half's state through the connector
        # (conn.namespace, conn._dumps), as when it was one class.
        if name.startswith("__") or name == "_side":
            raise AttributeError(name)
        return getattr(self._side, name)

    # ==== scheduler side =========================================================

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def has_pending_block_frees(self) -> bool:
        return self.connector_scheduler.has_pending_block_frees() if self.connector_scheduler is not None else False

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_connector_output(connector_output)

    def reset_cache(self) -> bool | None:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.reset_cache()

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ==== worker side ================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.connector_worker is not None
        self.connector_worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self.connector_worker is not None
        self.connector_worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv returns only after every planned block is in place

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks (all layers) are saved after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        assert self.connector_worker is not None
        self.connector_worker.wait_for_save(self._get_connector_metadata())

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self.connector_worker is not None
        self.connector_worker.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.connector_worker is not None
        return self.connector_worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.connector_worker is not None
        return self.connector_worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> Any:
        assert self.connector_worker is not None
        return self.connector_worker.build_connector_worker_meta()

    # ==== both ========================================================================

    def get_kv_connector_stats(self) -> Any:
        return self._side.get_kv_connector_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        return ucm_stats.build(data)

    def shutdown(self) -> None:
        self._side.shutdown()
