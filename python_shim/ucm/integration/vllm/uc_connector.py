"""UnifiedCacheConnectorV1: vLLM's KV connector for the UCM NFS Store.

Use it exactly as the seed says:

    --kv-transfer-config '{"kv_connector": "UnifiedCacheConnectorV1",
      "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
      "kv_role": "kv_both",
      "kv_connector_extra_config": {"UCM_CONFIG_FILE": "/path/ucm_config.yaml"}}'

Scheduler side: turns `request.block_hashes` into keys, asks the engine in
one batched lookup which of the blocks beyond what vLLM already holds are
stored (in every TP rank's namespace), plans loads and saves (the prompt's
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

from ...client import EngineClient, EngineError, EngineUnavailable, process_gone, say_task_line
from ...config import config_from_extra
from ...deadline import Deadline
from ...launcher import SettingsMismatch, ensure_engine
from ...memory import RegionRegistry, ShardList
from . import stats as ucm_stats
from .layout import TensorRuns, block_pieces, block_runs, layout_signature

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

#: how long handle_preemptions lets a preempted request's dumps run before
#: it cancels them (kv_connector_extra_config "ucm_preempt_wait_ms")
_PREEMPT_WAIT_MS = 1000

#: how long a dump may take before the connector gives up on it
#: (kv_connector_extra_config "ucm_save_timeout_ms"). The engine sheds a dump
#: queued longer than maxQueueMs (5 s by default), so a healthy engine has
#: finished or dropped every dump well before; this bounds how long a
#: finished or preempted request's blocks stay held when the engine stops
#: answering (its deadline is then the only guarantee, see ucm.deadline).
_SAVE_TIMEOUT_MS = 10000

#: blocks of generated tokens are saved once this many are complete and not
#: yet saved (and the rest when the request finishes): one dump call every
#: few blocks of decoding rather than one per step
#: (kv_connector_extra_config "ucm_decode_save_blocks"; 0: only prompt blocks)
_DECODE_SAVE_BLOCKS = 8


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
    #: requests preempted since the last step: their blocks may be handed to
    #: other requests in this very step, so their dumps must end first
    preempted: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    """A dump or load the engine accepted."""

    task: int | None  # None: sent, but the engine's reply (its id) never came
    keys: list[bytes]
    deadline: Deadline
    engine: tuple[int, int] | None  # (pid, start time) of the engine that has it


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
        # The config file named by UCM_CONFIG_FILE, or the config inline (as UCM accepts).
        self.config = config_from_extra(extra)
        # A store miss is never an error: failed loads are recomputed, unless the operator chose otherwise.
        if extra.get("ucm_load_failure_policy", "recompute") == "recompute":
            ktc.kv_load_failure_policy = "recompute"
        # Asynchronous loading: the request waits outside the batch while its
        # blocks load, instead of the forward pass waiting for them.
        self.load_async = bool(extra.get("ucm_load_async", self.config.load_async))
        self.preempt_wait_ms = int(extra.get("ucm_preempt_wait_ms", _PREEMPT_WAIT_MS))
        self.save_timeout_ms = int(extra.get("ucm_save_timeout_ms", _SAVE_TIMEOUT_MS))
        self.decode_save_blocks = int(extra.get("ucm_decode_save_blocks", _DECODE_SAVE_BLOCKS))
        if self.decode_save_blocks < 0:
            raise ValueError(f"kv_connector_extra_config.ucm_decode_save_blocks must be 0 or more, got {self.decode_save_blocks}")
        self.block_size = vllm_config.cache_config.block_size
        self.num_blocks = kv_cache_config.num_blocks
        pc = vllm_config.parallel_config
        mc = vllm_config.model_config
        self.tp_size = pc.tensor_parallel_size
        self.use_mla = bool(getattr(mc, "use_mla", False))
        self._model_id = _model_identity(vllm_config)
        self.client = EngineClient(self.config.endpoint, self.config.timeout_ms, name=f"vllm-{role.name.lower()}-{os.getpid()}")
        self._retry_at = 0.0
        #: why the engine is not used (its settings differ from this config's), or None
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._stats = ucm_stats.empty()  # since the last get_kv_connector_stats
        self._unexpected_at: dict[str, float] = {}  # op -> when an unexpected failure of it was last logged
        if role == KVConnectorRole.SCHEDULER:
            self.namespaces = sorted({self._namespace(r) for r in range(self.tp_size)})
            self._reqs: dict[str, _ReqState] = {}
            self._pending_loads: list[_Transfer] = []
            self._final_saves: list[_Transfer] = []  # of requests that finished since the last step
            self._saving: set[str] = set()
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.rank = get_tensor_model_parallel_rank() if self.tp_size > 1 else 0
            self.namespace = self._namespace(self.rank)
            self.regions = RegionRegistry(self.client)
            self._layers: list[TensorRuns] = []
            #: why this worker runs without the store (KV cache memory the engine cannot reach), or None
            self._disabled: str | None = None
            self._load_errors: set[int] = set()
            self._dumps: dict[str, list[_Pending]] = {}  # req -> dump tasks
            self._saving_w: set[str] = set()
            self._finishing: set[str] = set()
            self._async_loads: dict[str, tuple[_Pending | None, _Transfer]] = {}  # req -> (task, transfer)
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
            self._refused = None
            return True
        except SettingsMismatch as e:
            # Another config's engine: using it would silently ignore ours.
            # All misses until that changes (checked again every minute).
            self._retry_at = time.monotonic() + 60.0
            if self._refused != str(e):
                logger.error("UCM: serving without the store: %s", e)
            self._refused = str(e)
            return False
        except Exception as e:  # noqa: BLE001 - any failure here means "no store for now"
            self._retry_at = time.monotonic() + 5.0
            logger.warning("UCM: engine unavailable (%s); serving without the store, retrying in 5 s", e)
            return False

    def _usable(self) -> bool:
        """False while the engine is known down, or refused for its settings."""
        if time.monotonic() < self._retry_at:
            return False
        return self._refused is None or self._connect()

    def _call(self, op: str, **args: Any) -> dict[str, Any] | None:
        """A request that degrades to None (a miss) when the engine is down."""
        if not self._usable():
            return None
        try:
            return self.client.call(op, **args)
        except EngineError as e:
            self._failed(op, e)
            return None
        except Exception as e:  # noqa: BLE001 - nothing from the store may reach vLLM's forward pass
            self._unexpected(op, e)
            return None

    def _failed(self, op: str, e: EngineError) -> None:
        if e.code == "unavailable":
            self._retry_at = time.monotonic() + 2.0
            logger.warning("UCM: %s failed (%s); treating as a miss", op, e)
            threading.Thread(target=self._connect, kwargs={"force": True}, daemon=True).start()
        else:
            logger.warning("UCM: engine refused %s: %s", op, e)

    def _unexpected(self, op: str, e: BaseException) -> None:
        """A bug or an unforeseen failure (not an engine answer). It is
        logged, with its traceback the first time, at most once a minute per
        operation, and treated as a miss: vLLM must keep serving."""
        now = time.monotonic()
        last = self._unexpected_at.get(op)
        if last is not None and now - last < 60:
            return
        self._unexpected_at[op] = now
        logger.error("UCM: %s failed unexpectedly (%s: %s); treating it as a miss, vLLM recomputes",
                     op, type(e).__name__, e, exc_info=last is None)

    # ==== scheduler side =========================================================

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._reqs.get(request.request_id) or _ReqState(request)
        self._reqs[request.request_id] = state
        # Called for a request with nothing computed: a new one, or one that
        # was preempted and starts over. Either way any earlier plan is void.
        state.load_start = state.load_count = 0
        state.load_planned = False
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
        meta = UCMConnectorMetadata(loads=self._pending_loads, saves=self._final_saves)
        self._pending_loads, self._final_saves = [], []
        for req_id in scheduler_output.preempted_req_ids or ():
            # vLLM freed its blocks (the workers settle its dumps first, in
            # handle_preemptions) and computes it again from the start: plan
            # its saves afresh (the engine skips blocks already stored).
            state = self._reqs.get(req_id)
            if state is not None:
                state.block_ids = []
                state.saved_upto = 0
            meta.preempted.append(req_id)
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

    def _plan_save(self, meta: UCMConnectorMetadata, state: _ReqState, computed: int, scheduled: int,
                   finished: bool = False) -> None:
        """Blocks whose KV is complete once this step has run go to the store
        (minus those loaded from it): the prompt's at once, generated tokens'
        once `decode_save_blocks` of them wait (all of them when `finished`)."""
        req = state.request
        full = min((computed + scheduled) // self.block_size, len(req.block_hashes), len(state.block_ids))
        prompt_full = req.num_prompt_tokens // self.block_size
        if full > prompt_full:
            waiting = full - max(state.saved_upto, prompt_full)
            if self.decode_save_blocks == 0 or (not finished and waiting < self.decode_save_blocks):
                full = prompt_full
        idx = [i for i in range(state.saved_upto, full) if not (state.load_start <= i < state.load_start + state.load_count)]
        state.saved_upto = max(state.saved_upto, full)
        if idx:
            meta.saves.append(_Transfer(req.request_id, [bytes(req.block_hashes[i]) for i in idx], [state.block_ids[i] for i in idx]))
            self._saving.add(req.request_id)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        state = self._reqs.pop(request.request_id, None)
        if state is not None and state.block_ids:
            # The generated blocks not saved yet go with the next step's
            # metadata; the blocks stay allocated until the workers say the
            # dump is over. (The last token sampled has no KV yet: it never
            # went through the model, so num_computed_tokens stops before it.)
            final = UCMConnectorMetadata()
            self._plan_save(final, state, request.num_computed_tokens, 0, finished=True)
            self._final_saves.extend(final.saves)
        saving = request.request_id in self._saving
        self._saving.discard(request.request_id)
        # True keeps the blocks allocated until the workers report the saves done.
        return saving, None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ==== worker side ================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            if not kv_caches:
                raise ValueError("vLLM registered no KV cache tensors")
            layers = [block_runs(name, t, self.num_blocks) for name, t in kv_caches.items()]
            # Export every tensor now, once: memory the engine cannot open
            # (expandable segments, sleep mode's allocator) is found here, not
            # as an exception in the middle of a forward pass.
            for tr in layers:
                self.regions.export(tr.tensor)
        except Exception as e:  # noqa: BLE001 - any reason means "no store on this worker"
            self._disable(str(e))
            return
        self._layers = layers
        logger.info("UCM: %d KV cache tensors, %d shard(s) of %d bytes per block per layer; namespace %s",
                    len(layers), len(layers[0].runs), layers[0].runs[0][1], self.namespace)
        self._call("namespace", ns=self.namespace, description={
            "model": str(self._vllm_config.model_config.model), "block_size": self.block_size,
            "tp_size": self.tp_size, "rank": None if self.use_mla else self.rank, "layout": layout_signature(layers)})

    def _disable(self, reason: str) -> None:
        """All misses from now on, on this worker: nothing is loaded (planned
        loads are reported failed, so vLLM computes those blocks), nothing is
        saved. Said once, with what to change."""
        if self._disabled is None:
            logger.warning("UCM: the store is off on this worker, every block is computed by vLLM: %s", reason)
        self._disabled = reason

    def _shards(self, block_ids: list[int]) -> ShardList:
        located = self.regions.locate_many([tr.tensor for tr in self._layers])  # registers again after an engine restart
        pieces = block_pieces(self._layers, located)
        shards = ShardList(len(pieces))
        for b in block_ids:
            for p in pieces:
                shards.add(p.region, p.base + b * p.stride, p.length)
        return shards

    def _submit(self, op: str, t: _Transfer, timeout_ms: int, start: float | None = None) -> _Pending | None:
        """Hands a load or dump to the engine, with the deadline after which
        the engine may not touch its blocks (ucm.deadline: `timeout_ms` from
        `start`, less one block's copy); None when it cannot (engine down or
        refusing, store off, or anything unexpected): a miss."""
        if self._disabled is not None or not self._layers or not self._usable():
            return None
        for attempt in (0, 1):
            try:
                extra: dict[str, Any] = {"commit": True} if op == "dump" else {}
                if op == "dump" and self._layers[0].tensor.is_cuda:
                    # Recorded after the forward pass on vLLM's stream: the engine
                    # copies the blocks only once that pass has written them.
                    extra["event"] = self.regions.record_event(self._layers[0].tensor.device)
                shards = self._shards(t.block_ids)
                dl = Deadline(timeout_ms, sum(shards.length[:shards.per_block]), start)
                r = self.client.call(op, ns=self.namespace, keys=t.keys, shards=shards.wire(),
                                     deadline_unix_ms=dl.unix_ms, **extra)
                return _Pending(int(r["task"]), t.keys, dl, self.client.engine_identity)
            except EngineUnavailable as e:
                self._failed(op, e)
                if e.sent == op:
                    # Sent and never answered: the engine may run it later, up to its
                    # deadline. Its id is unknown; only the deadline settles it.
                    return _Pending(None, t.keys, dl, self.client.engine_identity)
                return None
            except EngineError as e:
                if e.code == "unknown_region" and attempt == 0:
                    self.regions.forget()  # the session changed under us: register again
                    continue
                self._failed(op, e)
                return None
            except Exception as e:  # noqa: BLE001 - nothing from the store may reach vLLM's forward pass
                self._unexpected(op, e)
                return None
        return None

    def _memory_free(self, p: _Pending, what: str) -> bool:
        """Returns once no block of task `p` can touch vLLM's memory any more:
        the engine acknowledged a cancel, its process is gone, or the task's
        deadline has passed (waited for here: with the engine unreachable,
        the deadline is the only guarantee). True when that took the
        deadline."""
        if self._cancel(p.task):
            return False
        if process_gone(p.engine):
            return False
        if not p.deadline.passed():
            logger.error("UCM: %s task %s could not be cancelled (the engine does not answer); waiting %.1f s for "
                         "its deadline, after which the engine touches none of its blocks", what, p.task,
                         p.deadline.left_ms() / 1000)
            p.deadline.sleep_until()
        return True

    def _ask(self, p: _Pending, op: str, **args: Any) -> dict[str, Any] | None:
        """wait/check of an engine task; None when it cannot be asked (the
        engine is down, or the task's id never came back)."""
        return None if p.task is None else self._call(op, task=p.task, **args)

    def _cancel(self, task: int | None) -> bool:
        """True once the engine acknowledged that nothing of `task` runs any more."""
        if task is None or time.monotonic() < self._retry_at:
            return False  # known down or stuck: asking would hold vLLM for clientTimeoutMs per task
        try:
            self.client.call("cancel", task=task, deadline_ms=self.config.timeout_ms)
            return True
        except EngineError as e:
            if e.code == "unavailable":
                self._failed("cancel", e)
            return False
        except Exception as e:  # noqa: BLE001
            self._unexpected("cancel", e)
            return False

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, UCMConnectorMetadata) or not meta.loads:
            return
        unreported = list(meta.loads)
        running: dict[str, _Pending] = {}  # req -> engine task, submitted and not yet finished
        try:
            self._load(unreported, running)
        except Exception as e:  # noqa: BLE001 - a planned load that fails is recomputed, never an error in vLLM
            self._unexpected("load", e)
            for t in unreported:
                p = running.get(t.req_id)
                if p is not None:
                    self._memory_free(p, "load")  # vLLM recomputes these blocks: the engine must not write them later
                self._report_failed(t, list(range(len(t.keys))))

    def _load(self, unreported: list[_Transfer], running: dict[str, _Pending]) -> None:
        t_start = time.perf_counter()
        count = sum(len(t.keys) for t in unreported)
        start = time.monotonic()
        tasks = []
        for t in list(unreported):
            p = self._submit("load", t, self.config.load_timeout_ms, start)
            tasks.append((t, p))
            if p is not None:
                running[t.req_id] = p
        if self.load_async:
            # Finished (or failed) loads are reported by get_finished.
            for t, p in tasks:
                self._async_loads[t.req_id] = (p, t)
                unreported.remove(t)
            return
        for t, p in tasks:
            failed: list[int] = list(range(len(t.keys)))
            if p is not None:
                left = p.deadline.left_ms()
                r = self._ask(p, "wait", timeout_ms=left, deadline_ms=left + self.config.timeout_ms)
                if r and r.get("done"):
                    say_task_line(r)
                    failed = list(r.get("failed", []))
                else:
                    self._load_timed_out(p, t)
                running.pop(t.req_id, None)
            self._report_failed(t, failed)
            unreported.remove(t)
        logger.debug("UCM: loaded %d block(s) for %d request(s) in %.4f s", count, len(tasks), time.perf_counter() - t_start)

    def _load_timed_out(self, p: _Pending, t: _Transfer) -> None:
        """A load not done by its deadline (or whose engine stopped answering):
        its blocks are recomputed by vLLM and may be reused, so they are
        reported failed only once the engine can no longer write them."""
        if self._memory_free(p, "load"):
            logger.error("UCM: request %s: load task %s timed out and the engine did not answer; its deadline has "
                         "passed, vLLM recomputes it", t.req_id, p.task)
        else:
            logger.warning("UCM: request %s: load did not finish within %d ms; cancelled, vLLM recomputes it",
                           t.req_id, self.config.load_timeout_ms)

    def _report_failed(self, t: _Transfer, failed: list[int]) -> None:
        # Blocks are used in order: everything after the first failure is recomputed too.
        first = min(failed) if failed else len(t.keys)
        self._stats["loaded_blocks"] += first
        self._stats["load_failed_blocks"] += len(t.keys) - first
        if failed:
            self._load_errors.update(t.block_ids[first:])
            if self._disabled is None:  # the store being off was said once already
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
            try:
                self._saving_w.add(t.req_id)
                p = self._submit("dump", t, self.save_timeout_ms)  # None: the save is dropped, a future miss
                if p is not None:
                    self._dumps.setdefault(t.req_id, []).append(p)
            except Exception as e:  # noqa: BLE001 - a save that cannot be made is dropped
                self._unexpected("dump", e)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Called by vLLM's model runner before each step's forward pass, with
        that step's metadata (before it is bound). A preempted request's blocks
        were freed by the scheduler and may already belong to another request
        of this step, which the forward pass is about to write: every dump
        still reading them must end before we return. Each gets a bounded wait
        (so its blocks are usually stored), then is cancelled; the engine
        answers `cancel` only once nothing more of the task reads memory.
        When it cannot answer, this waits for the dump's deadline."""
        if not isinstance(kv_connector_metadata, UCMConnectorMetadata) or not kv_connector_metadata.preempted:
            return
        deadline = time.monotonic() + self.preempt_wait_ms / 1000
        for req_id in kv_connector_metadata.preempted:
            try:
                self._settle_dumps(req_id, deadline)
            except Exception as e:  # noqa: BLE001
                self._unexpected("preemption", e)

    def _settle_dumps(self, req_id: str, deadline: float) -> None:
        pending = self._dumps.pop(req_id, [])
        finished = cancelled = 0
        for p in pending:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            r = self._ask(p, "wait", timeout_ms=left, deadline_ms=left + self.config.timeout_ms)
            if not (r and r.get("done")):
                if self._memory_free(p, "dump"):
                    logger.error("UCM: request %s was preempted and its dump task %s could not be cancelled; its "
                                 "deadline has passed, so none of its blocks reads memory any more", req_id, p.task)
                r = self._ask(p, "check")
                cancelled += 1
            else:
                finished += 1
            self._count_saves(p.keys, r if r and r.get("done") else None)
        if pending:
            logger.info("UCM: request %s was preempted: %d of its dump task(s) finished, %d cancelled",
                        req_id, finished, cancelled)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done: set[str] = set()
        recved: set[str] = set()
        self._finishing.update(r for r in finished_req_ids if r in self._saving_w)
        for req_id in list(self._finishing):
            try:
                if self._saves_pending(req_id):
                    continue
            except Exception as e:  # noqa: BLE001 - give up on its saves rather than hold its blocks forever
                self._unexpected("check", e)
                for p in self._dumps.pop(req_id, []):
                    self._memory_free(p, "dump")  # vLLM frees the blocks next: nothing may read them after
                    self._stats["save_failed_blocks"] += len(p.keys)
            self._dumps.pop(req_id, None)
            self._finishing.discard(req_id)
            self._saving_w.discard(req_id)
            done.add(req_id)
        for req_id, (p, t) in list(self._async_loads.items()):
            try:
                failed = self._async_load_result(p, t)
                if failed is None:
                    continue
            except Exception as e:  # noqa: BLE001 - the load counts as failed: vLLM recomputes it
                self._unexpected("check", e)
                if p is not None:
                    self._memory_free(p, "load")
                failed = list(range(len(t.keys)))
            self._report_failed(t, failed)
            del self._async_loads[req_id]
            recved.add(req_id)
        return (done or None), (recved or None)

    def _async_load_result(self, p: _Pending | None, t: _Transfer) -> list[int] | None:
        """The failed blocks of an asynchronous load once it is over, None while
        it runs (or while the engine does not answer and its deadline has not
        passed: vLLM may reuse the blocks as soon as they are reported)."""
        if p is None:
            return list(range(len(t.keys)))
        r = self._ask(p, "check")
        if r is not None and r.get("done"):
            say_task_line(r)
            return list(r.get("failed", []))
        if r is None and not (p.deadline.passed() or process_gone(p.engine)):
            return None
        if r is not None and not p.deadline.passed():
            return None
        self._load_timed_out(p, t)
        return list(range(len(t.keys)))

    def _saves_pending(self, req_id: str) -> bool:
        """Checks a finishing request's dumps; True while any still runs (or
        may still read its blocks: an engine that does not answer is given
        until the dump's deadline)."""
        still = []
        for p in self._dumps.get(req_id, []):
            r = self._ask(p, "check")
            if r is not None and r.get("done"):
                self._count_saves(p.keys, r)
                continue
            if not (p.deadline.passed() or (r is None and process_gone(p.engine))):
                still.append(p)
                continue
            if r is not None:
                self._cancel(p.task)  # past its deadline: the engine copies nothing more of it anyway
            self._count_saves(p.keys, None)
        if still:
            self._dumps[req_id] = still
            return True
        return False

    def _count_saves(self, keys: list[bytes], r: dict[str, Any] | None) -> None:
        say_task_line(r)
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
        try:
            self.client.close()
        except Exception as e:  # noqa: BLE001
            self._unexpected("shutdown", e)


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
