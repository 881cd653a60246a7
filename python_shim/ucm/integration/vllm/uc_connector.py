"""UnifiedCacheConnectorV1: vLLM's KV connector for the UCM NFS Store.

Use it exactly as the seed says:

    --kv-transfer-config '{"kv_connector": "UnifiedCacheConnectorV1",
      "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
      "kv_role": "kv_both",
      "kv_connector_extra_config": {"UCM_CONFIG_FILE": "/path/ucm_config.yaml"}}'

Scheduler side: turns `request.block_hashes` into keys, asks the engine in
one batched lookup which of the blocks beyond what vLLM already holds are
stored (in every TP rank's namespace), plans loads and saves. Worker side:
registers the KV cache memory with the engine, loads planned blocks before
the forward pass that needs them and hands newly computed blocks to the
engine after the pass that wrote them. The engine moves the bytes.

When the engine is unreachable or slow, every operation degrades to a miss:
vLLM keeps serving, nothing waits past the configured timeouts, and the
connector tries again later (starting the engine if none is running).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ...client import EngineClient, EngineError
from ...config import load_config
from ...launcher import ensure_engine
from ...memory import RegionRegistry, ShardList
from . import stats as ucm_stats
from .layout import TensorRuns, block_runs, layout_signature

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
    from vllm.v1.request import Request

logger = logging.getLogger("ucm")
_warned_hashseed = False

#: bumped when the meaning of stored bytes changes
_FORMAT = "ucm-kv-1"


def _warn_hashseed_once() -> None:
    global _warned_hashseed
    if not _warned_hashseed and os.environ.get("PYTHONHASHSEED") in (None, "", "random"):
        _warned_hashseed = True
        logger.warning(
            "UCM: PYTHONHASHSEED is not set: vLLM's block hashes then differ between processes, so blocks "
            "stored by one vLLM process are never found by another or after a restart. "
            "Export PYTHONHASHSEED (e.g. 123456) before starting vLLM."
        )


@dataclass
class _Transfer:
    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)


@dataclass
class _ReqState:
    request: "Request"
    block_ids: list[int] = field(default_factory=list)
    load_start: int = 0  # first block index loaded from the store
    load_count: int = 0
    saved_upto: int = 0  # block indices below this were handed to the worker for saving
    load_planned: bool = False


class UnifiedCacheConnectorV1(KVConnectorBase_V1):
    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        _warn_hashseed_once()
        ktc = vllm_config.kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        cfg_file = extra.get("UCM_CONFIG_FILE")
        if not cfg_file:
            raise ValueError('kv_connector_extra_config must name the UCM config file: {"UCM_CONFIG_FILE": "/path/to/ucm_config.yaml"}')
        self.config = load_config(cfg_file)
        # A store miss is never an error: failed loads are recomputed, unless the operator chose otherwise.
        if extra.get("ucm_load_failure_policy", "recompute") == "recompute":
            ktc.kv_load_failure_policy = "recompute"
        # Asynchronous loading: the request waits outside the batch while its
        # blocks load, instead of the forward pass waiting for them.
        self.load_async = bool(extra.get("ucm_load_async", self.config.load_async))
        self.block_size = vllm_config.cache_config.block_size
        self.num_blocks = kv_cache_config.num_blocks
        pc = vllm_config.parallel_config
        mc = vllm_config.model_config
        self.tp_size = pc.tensor_parallel_size
        self.use_mla = bool(getattr(mc, "use_mla", False))
        self._model_id = _model_identity(vllm_config)
        self.client = EngineClient(self.config.endpoint, self.config.timeout_ms, name=f"vllm-{role.name.lower()}-{os.getpid()}")
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._stats = ucm_stats.empty()  # since the last get_kv_connector_stats
        if role == KVConnectorRole.SCHEDULER:
            self.namespaces = sorted({self._namespace(r) for r in range(self.tp_size)})
            self._reqs: dict[str, _ReqState] = {}
            self._pending_loads: list[_Transfer] = []
            self._saving: set[str] = set()
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.rank = get_tensor_model_parallel_rank() if self.tp_size > 1 else 0
            self.namespace = self._namespace(self.rank)
            self.regions = RegionRegistry(self.client)
            self._layers: list[TensorRuns] = []
            self._load_errors: set[int] = set()
            self._dumps: dict[str, list[tuple[int, list[bytes]]]] = {}  # req -> [(task, keys)]
            self._saving_w: set[str] = set()
            self._finishing: set[str] = set()
            self._async_loads: dict[str, tuple[int | None, _Transfer, float]] = {}  # req -> (task, transfer, deadline)
        self._connect()

    # ---- engine connection ---------------------------------------------------

    def _namespace(self, rank: int) -> str:
        who = "mla" if self.use_mla else f"tp{self.tp_size}r{rank}"
        digest = hashlib.sha256(f"{_FORMAT}|{self._model_id}|{self.block_size}|{who}".encode()).hexdigest()[:16]
        base = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(str(self._vllm_config.model_config.model).rstrip("/")))[:40] or "model"
        return f"{base}-{who}-{digest}"

    def _connect(self, force: bool = False) -> bool:
        """Makes sure an engine answers (starting one if needed); on failure stays in miss mode for a while."""
        if not force and time.monotonic() < self._retry_at:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # another thread is already at it
        try:
            return self._connect_locked()
        finally:
            self._lock.release()

    def _connect_locked(self) -> bool:
        try:
            ensure_engine(self.config, start_timeout_s=max(5.0, self.config.timeout_ms / 1000))
            return True
        except Exception as e:  # noqa: BLE001 - any failure here means "no store for now"
            self._retry_at = time.monotonic() + 5.0
            logger.warning("UCM: engine unavailable (%s); serving without the store, retrying in 5 s", e)
            return False

    def _call(self, op: str, **args: Any) -> dict[str, Any] | None:
        """A request that degrades to None (a miss) when the engine is down."""
        if time.monotonic() < self._retry_at:
            return None
        try:
            return self.client.call(op, **args)
        except EngineError as e:
            self._failed(op, e)
            return None

    def _failed(self, op: str, e: EngineError) -> None:
        if e.code == "unavailable":
            self._retry_at = time.monotonic() + 2.0
            logger.warning("UCM: %s failed (%s); treating as a miss", op, e)
            threading.Thread(target=self._connect, kwargs={"force": True}, daemon=True).start()
        else:
            logger.warning("UCM: engine refused %s: %s", op, e)

    # ==== scheduler side =========================================================

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._reqs.get(request.request_id) or _ReqState(request)
        self._reqs[request.request_id] = state
        state.load_start = state.load_count = 0
        # Never claim the last prompt token: vLLM must compute at least one.
        max_blocks = (request.num_prompt_tokens - 1) // self.block_size
        start = num_computed_tokens // self.block_size
        hashes = list(request.block_hashes[:max_blocks])
        if start >= len(hashes):
            return 0, False
        r = self._call("lookup", ns=self.namespaces, keys=[bytes(h) for h in hashes[start:]])
        self._stats["lookup_blocks"] += len(hashes) - start
        if r is None:
            self._stats["lookup_errors"] += 1
            return 0, False
        hits = 0
        for f in r["found"]:
            if not f:
                break
            hits += 1
        self._stats["hit_blocks"] += hits
        if hits == 0:
            return 0, False
        state.load_start, state.load_count = start, hits
        return (start + hits) * self.block_size - num_computed_tokens, self.load_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        state = self._reqs.get(request.request_id)
        if state is None or num_external_tokens == 0 or state.load_count == 0 or state.load_planned:
            return
        state.load_planned = True
        block_ids = blocks.get_block_ids()[0]
        s, n = state.load_start, state.load_count
        keys = [bytes(h) for h in request.block_hashes[s:s + n]]
        self._pending_loads.append(_Transfer(request.request_id, keys, list(block_ids[s:s + n])))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = UCMConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_save(meta, state, new.num_computed_tokens, scheduler_output.num_scheduled_tokens.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            self._plan_save(meta, state, cached.num_computed_tokens[i], scheduler_output.num_scheduled_tokens.get(req_id, 0))
        return meta

    def _plan_save(self, meta: UCMConnectorMetadata, state: _ReqState, computed: int, scheduled: int) -> None:
        """Blocks of the prompt that this step completes go to the store (minus those loaded from it)."""
        req = state.request
        full = min((computed + scheduled) // self.block_size, req.num_prompt_tokens // self.block_size,
                   len(req.block_hashes), len(state.block_ids))
        idx = [i for i in range(state.saved_upto, full) if not (state.load_start <= i < state.load_start + state.load_count)]
        state.saved_upto = max(state.saved_upto, full)
        if idx:
            meta.saves.append(_Transfer(req.request_id, [bytes(req.block_hashes[i]) for i in idx], [state.block_ids[i] for i in idx]))
            self._saving.add(req.request_id)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        saving = request.request_id in self._saving
        self._saving.discard(request.request_id)
        # True keeps the blocks allocated until the workers report the saves done.
        return saving, None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ==== worker side ================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = [block_runs(name, t, self.num_blocks) for name, t in kv_caches.items()]
        self._layers = layers
        logger.info("UCM: %d KV cache tensors, %d shard(s) of %d bytes per block per layer; namespace %s",
                    len(layers), len(layers[0].runs), layers[0].runs[0][1], self.namespace)
        self._call("namespace", ns=self.namespace, description={
            "model": str(self._vllm_config.model_config.model), "block_size": self.block_size,
            "tp_size": self.tp_size, "rank": None if self.use_mla else self.rank, "layout": layout_signature(layers)})

    def _shards(self, block_ids: list[int]) -> ShardList:
        per_block = sum(len(tr.runs) for tr in self._layers)
        shards = ShardList(per_block)
        located = [self.regions.locate(tr.tensor) for tr in self._layers]
        for b in block_ids:
            for tr, (rid, base) in zip(self._layers, located):
                for off, n in tr.runs:
                    shards.add(rid, base + b * tr.block_stride + off, n)
        return shards

    def _submit(self, op: str, t: _Transfer) -> int | None:
        if time.monotonic() < self._retry_at:
            return None
        for attempt in (0, 1):
            try:
                extra: dict[str, Any] = {"commit": True} if op == "dump" else {}
                if op == "dump" and self._layers and self._layers[0].tensor.is_cuda:
                    # Recorded after the forward pass on vLLM's stream: the engine
                    # copies the blocks only once that pass has written them.
                    extra["event"] = self.regions.record_event(self._layers[0].tensor.device)
                shards = self._shards(t.block_ids)
                return int(self.client.call(op, ns=self.namespace, keys=t.keys, shards=shards.wire(), **extra)["task"])
            except EngineError as e:
                if e.code == "unknown_region" and attempt == 0:
                    self.regions.forget()  # the session changed under us: register again
                    continue
                self._failed(op, e)
                return None
        return None

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, UCMConnectorMetadata) or not meta.loads:
            return
        t_start = time.perf_counter()
        tasks = [(t, self._submit("load", t)) for t in meta.loads]
        if self.load_async:
            # Finished (or failed) loads are reported by get_finished.
            for t, task in tasks:
                self._async_loads[t.req_id] = (task, t, time.monotonic() + self.config.load_timeout_ms / 1000)
            return
        deadline = time.monotonic() + self.config.load_timeout_ms / 1000
        for t, task in tasks:
            failed: list[int] = list(range(len(t.keys)))
            if task is not None:
                left = max(0, int((deadline - time.monotonic()) * 1000))
                r = self._call("wait", task=task, timeout_ms=left, deadline_ms=left + self.config.timeout_ms)
                if r and r.get("done"):
                    failed = list(r.get("failed", []))
                else:
                    self._cancel_load(task, t)
            self._report_failed(t, failed)
        logger.debug("UCM: loaded %d block(s) for %d request(s) in %.4f s",
                     sum(len(t.keys) for t in meta.loads), len(meta.loads), time.perf_counter() - t_start)

    def _cancel_load(self, task: int, t: _Transfer) -> None:
        """A load that outlived loadTimeoutMs: its blocks are recomputed by vLLM
        and may be reused, so the engine must stop writing them. The engine
        answers `cancel` only once no block of the task can reach memory."""
        r = self._call("cancel", task=task, deadline_ms=self.config.timeout_ms)
        if r is None:
            logger.error("UCM: request %s: load task %s timed out and could not be cancelled; "
                         "the engine is unreachable", t.req_id, task)
        else:
            logger.warning("UCM: request %s: load timed out after %d ms; cancelled, vLLM recomputes it",
                           t.req_id, self.config.load_timeout_ms)

    def _report_failed(self, t: _Transfer, failed: list[int]) -> None:
        # Blocks are used in order: everything after the first failure is recomputed too.
        first = min(failed) if failed else len(t.keys)
        self._stats["loaded_blocks"] += first
        self._stats["load_failed_blocks"] += len(t.keys) - first
        if failed:
            self._load_errors.update(t.block_ids[first:])
            logger.warning("UCM: request %s: %d of %d block(s) could not be loaded; vLLM recomputes them",
                           t.req_id, len(t.keys) - first, len(t.keys))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv returns only after every planned block is in place

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks (all layers) are saved after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, UCMConnectorMetadata):
            return
        # CPU: the forward pass has finished. GPU: each dump carries an event
        # recorded on the current stream, which the engine waits on.
        for t in meta.saves:
            self._saving_w.add(t.req_id)
            task = self._submit("dump", t)
            if task is not None:
                self._dumps.setdefault(t.req_id, []).append((task, t.keys))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._finishing.update(r for r in finished_req_ids if r in self._saving_w)
        done: set[str] = set()
        for req_id in list(self._finishing):
            pending = self._dumps.get(req_id, [])
            still = []
            for task, keys in pending:
                r = self._call("check", task=task)
                if r is not None and not r.get("done"):
                    still.append((task, keys))
                    continue
                self._count_saves(keys, r)
            if still:
                self._dumps[req_id] = still
                continue
            self._dumps.pop(req_id, None)
            self._finishing.discard(req_id)
            self._saving_w.discard(req_id)
            done.add(req_id)
        recved: set[str] = set()
        for req_id, (task, t, deadline) in list(self._async_loads.items()):
            r = self._call("check", task=task) if task is not None else None
            if r is not None and not r.get("done"):
                if time.monotonic() < deadline:
                    continue
                self._cancel_load(task, t)
                r = None
            self._report_failed(t, list(r.get("failed", [])) if r else list(range(len(t.keys))))
            del self._async_loads[req_id]
            recved.add(req_id)
        return (done or None), (recved or None)

    def _count_saves(self, keys: list[bytes], r: dict[str, Any] | None) -> None:
        status = list(r.get("status", [])) if r else []
        if len(status) != len(keys):
            self._stats["save_failed_blocks"] += len(keys)
            return
        for s in status:
            if s in ("ok", "skipped"):
                self._stats["saved_blocks"] += 1
            elif s == "dropped":
                self._stats["save_dropped_blocks"] += 1
            else:
                self._stats["save_failed_blocks"] += 1

    # ---- stats (vLLM logs them as "KV Transfer metrics: ...") -----------------

    def get_kv_connector_stats(self) -> Any:
        if not any(self._stats.values()):
            return None
        out, self._stats = ucm_stats.build(self._stats), ucm_stats.empty()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        return ucm_stats.build(data)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self.client.close()


def _model_identity(vllm_config: "VllmConfig") -> str:
    """Everything that changes the meaning of KV bytes, except the rank."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    import vllm

    parts = [
        str(mc.model), str(getattr(mc, "revision", None)), str(mc.dtype), str(cc.cache_dtype),
        str(mc.get_num_layers(pc)), str(mc.get_num_kv_heads(pc)), str(mc.get_head_size()),
        str(getattr(cc, "prefix_caching_hash_algo", "")), vllm.__version__,
    ]
    return "|".join(parts)
