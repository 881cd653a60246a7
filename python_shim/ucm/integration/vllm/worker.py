"""The connector's worker half: moves the blocks the scheduler planned.

It registers vLLM's KV cache memory with the engine, has the planned blocks
loaded before the forward pass that needs them (or, with asynchronous
loading, while the request waits outside the batch) and hands the blocks a
pass completed to the engine after that pass. The engine moves the bytes;
ucm.transfer submits and follows each task.

vLLM may hand a block to another request as soon as it is reported: a
failed load's blocks, a finished or preempted request's blocks. So a task is
reported over only once none of its blocks can be touched any more (the
engine finished or acknowledged a cancel, its process is gone, or the task's
deadline has passed). Nothing raises into vLLM: a load that cannot be made
is reported failed (vLLM recomputes those blocks), a save that cannot be
made is dropped (a future miss). A load counts as loaded only block by block,
in order, each with an `ok` status in a result that has one per key; each
planned load's outcome goes back to the scheduler (UCMWorkerMetadata), which
saves nothing computed on a load before every worker reported it good.

Before its first transfer in a namespace the worker describes its blocks
there (model, ranks, every KV tensor's physical layout); a namespace that
its first user described otherwise is refused by the engine, and this worker
then runs without the store rather than read bytes laid out another way.
"""

from __future__ import annotations

from collections import deque

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from ... import status as block_status
from ...client import EngineError
from ...deadline import Deadline
from ...memory import RegionRegistry
from ...shards import ShardList
from ...transfer import Pending, Transfers
from .common import ConnectorOptions, Transfer, UCMConnectorMetadata, identity_parts
from .layout import TensorRuns, block_pieces, block_runs, layout_signature
from .link import EngineLink
from .worker_loads import Loads

if TYPE_CHECKING:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

logger = logging.getLogger("ucm")


#: dumps past their request (their blocks back with vLLM, writes going on)
#: asked about per step, for their outcome only
TRAILING_CHECKS_PER_STEP = 8

#: a dump whose blocks are all copied into the engine's staging releases its
#: request's KV blocks to vLLM only if its writes still run this long after
EARLY_RELEASE_AFTER_S = 0.2


class UCMWorker(Loads, EngineLink):
    def __init__(self, opts: ConnectorOptions, name: str):
        super().__init__(opts, name)
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        self.rank = get_tensor_model_parallel_rank() if self.opts.tp_size > 1 else 0
        self.stage = get_pp_group().rank_in_group if self.opts.pp_size > 1 else 0
        self.namespace = opts.namespace(self.rank, self.stage)
        self.regions = RegionRegistry(self.client)
        self._by_epoch: dict[int, Transfers] = {}  # cache epoch -> the transfers of its namespace
        self._description: dict[str, Any] | None = None  # what this worker's blocks are (set at registration)
        self._described: set[str] = set()  # namespaces the engine accepted the description of
        self._outcomes: dict[int, int] = {}  # load id -> blocks loaded in order, for the scheduler
        self._layers: list[TensorRuns] = []
        self._block_bytes = 0  # one block's bytes over all layers
        #: why this worker runs without the store (KV cache memory the engine cannot reach), or None
        self._disabled: str | None = None
        self._load_errors: set[int] = set()
        self._dumps: dict[str, list[Pending]] = {}  # req -> dump tasks
        self._finishing: set[str] = set()  # finished requests whose blocks vLLM keeps until reported
        #: dumps whose blocks are all in the engine's staging (the request's KV blocks went back to vLLM) and
        #: whose writes go on: checked a few a step, only to count their outcome
        self._trailing: deque[Pending] = deque()
        self._released_at: dict[int, float] = {}  # id(dump) -> when the engine first said it was released
        self._async_loads: dict[str, tuple[Pending | None, Transfer]] = {}  # req -> (task, transfer)
        self._connect()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            if not kv_caches:
                raise ValueError("vLLM registered no KV cache tensors")
            layers = [block_runs(name, t, self.opts.num_blocks) for name, t in kv_caches.items()]
            # Export every tensor now, once: memory the engine cannot open
            # (expandable segments, sleep mode's allocator) is found here, not
            # as an exception in the middle of a forward pass.
            for tr in layers:
                self.regions.export(tr.tensor)
        except Exception as e:  # noqa: BLE001 - any reason means "no store on this worker"
            self._disable(str(e))
            return
        self._layers = layers
        self._block_bytes = sum(n for tr in layers for _, n in tr.runs)
        logger.info(
            "UCM: %d KV cache tensors, %d shard(s) of %d bytes per block per layer; namespace %s",
            len(layers),
            len(layers[0].runs),
            layers[0].runs[0][1],
            self.namespace,
        )
        pc = self.opts.vllm_config.parallel_config
        self._description = {
            "format": 2,
            "identity": identity_parts(self.opts.vllm_config, self.opts.kv_cache_config, self.opts.weights_version),
            "block_size": self.opts.block_size,
            "tp_size": self.opts.tp_size,
            "rank": None if self.opts.use_mla else self.rank,
            "pp_size": pc.pipeline_parallel_size,
            "stage": self.stage,
            "layout": layout_signature(layers),
        }
        if self._describe(self.namespace):
            self._register_now()

    def _register_now(self) -> None:
        """Registers the KV cache memory with the engine now, at startup:
        opening CUDA IPC handles (and a GPU context in the engine) takes long
        enough that it must not happen in the first forward pass that loads
        or saves. The block's size goes with it, so that a Cache stage prepares
        its memory now too. A failure here is only logged: the first transfer
        tries again."""
        try:
            self.regions.locate_many([tr.tensor for tr in self._layers], block_bytes=self._block_bytes)
        except Exception as e:  # noqa: BLE001 - the first transfer registers them, or fails as a miss
            logger.warning("UCM: could not register the KV cache with the engine yet (%s); the first transfer will", e)

    def _describe(self, ns: str) -> bool:
        """True once the engine accepted this worker's description of `ns`
        (asked once per namespace; again after a refusal that was not about
        the description, such as the engine being down)."""
        if ns in self._described:
            return True
        if self._description is None or not self._usable():
            return False
        try:
            self.client.call("namespace", ns=ns, description=self._description)
        except EngineError as e:
            if e.code == "conflict":
                self._disable(
                    f"{e}. Blocks of another KV cache layout or configuration are stored under this namespace; "
                    "use another storage directory for this deployment, or remove that namespace's directory"
                )
            else:
                self._failed("namespace", e)
            return False
        except Exception as e:  # noqa: BLE001
            self._unexpected("namespace", e)
            return False
        self._described.add(ns)
        self._check_staging()
        return self._disabled is None

    def _check_staging(self) -> None:
        """GPU blocks move through one transfer stream's share of the
        engine's pinned staging: KV caches whose block (all layers) is larger
        would fail every transfer, so the store is turned off at once, with
        the sizes, instead."""
        limit = (self.client.engine_info or {}).get("maxDeviceBlockBytes")
        cuda = any(tr.tensor.device.type == "cuda" for tr in self._layers)
        if not cuda or not isinstance(limit, int) or self._block_bytes <= limit:
            return
        settings = self.client.engine_info.get("settings") or {}
        self._disable(
            f"a KV block of this worker is {self._block_bytes} bytes (all {len(self._layers)} layers), more than "
            f"the {limit} bytes one transfer stream's share of the engine's pinned staging holds "
            f"(pinnedStagingBytes {settings.get('pinnedStagingBytes')} / transferStreamNumber "
            f"{settings.get('transferStreamNumber')}, less a block header); raise pinnedStagingBytes to at least "
            f"{self._block_bytes + 4096} x transferStreamNumber"
        )

    def _transfers(self, epoch: int) -> Transfers | None:
        """The transfers in cache epoch `epoch`'s namespace, once described there."""
        ns = self.namespace if epoch == 0 else self.opts.namespace(self.rank, self.stage, epoch)
        if not self._describe(ns):
            return None
        t = self._by_epoch.get(epoch)
        if t is None:
            t = self._by_epoch[epoch] = Transfers(self.client, self.regions, ns, self._request, self._failed)
        return t

    @property
    def transfers(self) -> Transfers:
        """The transfers of epoch 0 (what tests and diagnostics look at)."""
        t = self._by_epoch.get(0)
        if t is None:
            t = self._by_epoch[0] = Transfers(self.client, self.regions, self.namespace, self._request, self._failed)
        return t

    def _disable(self, reason: str) -> None:
        """All misses from now on, on this worker: nothing is loaded (planned
        loads are reported failed, so vLLM computes those blocks), nothing is
        saved. Said once, with what to change."""
        if self._disabled is None:
            logger.warning("UCM: the store is off on this worker, every block is computed by vLLM: %s", reason)
        self._disabled = reason

    def _shards_of(self, block_ids: list[int]):
        """The shards of `block_ids`, given where the engine found each layer's tensor."""

        def shards(located: list[tuple[int, int]]) -> ShardList:
            pieces = block_pieces(self._layers, located)
            out = ShardList(len(pieces))
            for b in block_ids:
                for p in pieces:
                    out.add(p.region, p.base + b * p.stride, p.length)
            return out

        return shards

    def _submit(self, op: str, t: Transfer, timeout_ms: int, start: float | None = None) -> Pending | None:
        """Hands a load or dump to the engine, with the deadline after which
        the engine may not touch its blocks (ucm.deadline: `timeout_ms` from
        `start`, less one block's copy); None when it cannot (engine down or
        refusing, store off, or anything unexpected): a miss. A dump is
        committed by the engine as soon as it is stored; on a GPU it waits
        for an event recorded now, after the forward pass on vLLM's stream.
        A dump is sent without waiting for the engine's answer (its task id,
        or a refusal: the save dropped), which the first question about it
        takes: vLLM's step does not wait for the engine's process to be
        scheduled and to check which of the blocks are stored already."""
        if self._disabled is not None or not self._layers or not self._usable():
            return None
        try:
            transfers = self._transfers(t.epoch)
            if transfers is None:
                return None
            dl = Deadline(timeout_ms, self._block_bytes, start)
            p, err = transfers.submit(
                op,
                t.keys,
                [tr.tensor for tr in self._layers],
                self._shards_of(t.block_ids),
                dl,
                commit=op == "dump",
                defer=op == "dump",
            )
        except Exception as e:  # noqa: BLE001 - nothing from the store may reach vLLM's forward pass
            self._unexpected(op, e)
            return None
        if err is not None:
            self._failed(op, err)
        return p

    def _request(self, op: str, **args: Any) -> dict[str, Any] | None:
        """A request about a submitted task (ucm.transfer asks through this).
        A cancel is not sent to an engine known down or stuck (that would hold
        vLLM for clientTimeoutMs per task), and its refusal is no news: the
        task's deadline settles it."""
        if op != "cancel":
            return self._call(op, **args)
        if self._down():
            return None
        try:
            return self.client.call(op, **args)
        except EngineError as e:
            if e.code == "unavailable":
                self._failed(op, e)
            return None
        except Exception as e:  # noqa: BLE001
            self._unexpected(op, e)
            return None

    def _memory_free(self, p: Pending, what: str) -> bool:
        """Returns once no block of task `p` can touch vLLM's memory any more:
        the engine acknowledged a cancel, its process is gone, or the task's
        deadline has passed (waited for here: with the engine unreachable,
        the deadline is the only guarantee). True when that took the
        deadline."""

        def waiting(p: Pending) -> None:
            logger.error(
                "UCM: %s task %s could not be cancelled (the engine does not answer); waiting %.1f s for "
                "its deadline, after which the engine touches none of its blocks",
                what,
                p.task,
                p.deadline.left_ms() / 1000,
            )

        return self.transfers.settle(p, waiting) == "deadline"

    def wait_for_save(self, meta: "KVConnectorMetadata") -> None:
        """Hands this step's planned saves to the engine (after the forward pass)."""
        if not isinstance(meta, UCMConnectorMetadata):
            return
        # CPU: the forward pass has finished. GPU: each dump carries an event
        # recorded on the current stream, which the engine waits on.
        for t in meta.saves:
            try:
                p = self._submit("dump", t, self.opts.save_timeout_ms)  # None: the save is dropped, a future miss
                if p is not None:
                    self._dumps.setdefault(t.req_id, []).append(p)
            except Exception as e:  # noqa: BLE001 - a save that cannot be made is dropped
                self._unexpected("dump", e)
        # Finished requests whose blocks vLLM keeps for us: reported by
        # get_finished once their dumps (submitted above at the latest) end.
        self._finishing.update(meta.finished)

    def handle_preemptions(self, kv_connector_metadata: "KVConnectorMetadata") -> None:
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
        deadline = time.monotonic() + self.opts.preempt_wait_ms / 1000
        for req_id in kv_connector_metadata.preempted:
            try:
                self._settle_dumps(req_id, deadline)
            except Exception as e:  # noqa: BLE001
                self._unexpected("preemption", e)

    def _settle_dumps(self, req_id: str, deadline: float) -> None:
        pending = self._dumps.pop(req_id, [])
        finished = cancelled = 0
        for p in pending:
            r = self.transfers.wait(p, max(0, int((deadline - time.monotonic()) * 1000)))
            if r is None:
                if self._memory_free(p, "dump"):
                    logger.error(
                        "UCM: request %s was preempted and its dump task %s could not be cancelled; its "
                        "deadline has passed, so none of its blocks reads memory any more",
                        req_id,
                        p.task,
                    )
                r = self.transfers.ask(p, "check")
                cancelled += 1
            else:
                finished += 1
            self._count_saves(p.keys, r if r and r.get("done") else None)
        if pending:
            logger.info(
                "UCM: request %s was preempted: %d of its dump task(s) finished, %d cancelled",
                req_id,
                finished,
                cancelled,
            )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done: set[str] = set()
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
            done.add(req_id)
        self._count_trailing()
        return (done or None), (self._async_loads_over() or None)

    def _count_trailing(self, most: int = TRAILING_CHECKS_PER_STEP) -> None:
        """Outcomes of dumps whose request's blocks went back to vLLM before
        their writes ended (saved_blocks and friends count them once known);
        a few a step, oldest first."""
        for _ in range(min(most, len(self._trailing))):
            p = self._trailing.popleft()
            r = self.transfers.ask(p, "check")
            if r is not None and r.get("done"):
                self._count_saves(p.keys, r)
            elif p.deadline.passed() or (r is None and p.engine_gone()):
                self._count_saves(p.keys, None)
            else:
                self._trailing.append(p)

    def _saves_pending(self, req_id: str) -> bool:
        """Checks a finishing request's dumps; True while any still runs (or
        may still read its blocks: an engine that does not answer is given
        until the dump's deadline)."""
        still = []
        for p in self._dumps.get(req_id, []):
            r = self.transfers.ask(p, "check")
            if r is not None and r.get("done"):
                self._released_at.pop(id(p), None)
                self._count_saves(p.keys, r)
                continue
            if r is not None and r.get("released") is True:
                # Every block is in the engine's staging (or failed): nothing
                # reads the KV blocks any more, vLLM may have them back while
                # the writes go on. Only for writes still running a while
                # after that (slow storage): a quick one is simply waited for,
                # so the blocks are stored (found by a lookup) when vLLM
                # hears the request is over.
                since = self._released_at.setdefault(id(p), time.monotonic())
                if time.monotonic() - since >= EARLY_RELEASE_AFTER_S:
                    self._released_at.pop(id(p), None)
                    self._trailing.append(p)
                    continue
                still.append(p)
                continue
            if not (p.deadline.passed() or (r is None and p.engine_gone())):
                still.append(p)
                continue
            if r is not None:
                self.transfers.cancel(p)  # past its deadline: the engine copies nothing more of it anyway
            self._count_saves(p.keys, None)
        if still:
            self._dumps[req_id] = still
            return True
        return False

    def _count_saves(self, keys: list[bytes], r: dict[str, Any] | None) -> None:
        status = list(r.get("status", [])) if r else []
        if len(status) != len(keys):
            self._stats["save_failed_blocks"] += len(keys)
            return
        for s in status:
            if s == block_status.OK:
                self._stats["saved_blocks"] += 1
            elif s == block_status.SKIPPED:
                self._stats["save_skipped_blocks"] += 1
            elif s == block_status.DROPPED:
                self._stats["save_dropped_blocks"] += 1
            else:
                self._stats["save_failed_blocks"] += 1
