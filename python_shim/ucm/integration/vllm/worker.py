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
made is dropped (a future miss).
"""

from __future__ import annotations

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
from .common import ConnectorOptions, Transfer, UCMConnectorMetadata
from .layout import TensorRuns, block_pieces, block_runs, layout_signature
from .link import EngineLink

if TYPE_CHECKING:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

logger = logging.getLogger("ucm")


class UCMWorker(EngineLink):
    def __init__(self, opts: ConnectorOptions, name: str):
        super().__init__(opts, name)
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.rank = get_tensor_model_parallel_rank() if self.opts.tp_size > 1 else 0
        self.namespace = opts.namespace(self.rank)
        self.regions = RegionRegistry(self.client)
        self.transfers = Transfers(self.client, self.regions, self.namespace, self._request)
        self._layers: list[TensorRuns] = []
        self._block_bytes = 0  # one block's bytes over all layers
        #: why this worker runs without the store (KV cache memory the engine cannot reach), or None
        self._disabled: str | None = None
        self._load_errors: set[int] = set()
        self._dumps: dict[str, list[Pending]] = {}  # req -> dump tasks
        self._saving_w: set[str] = set()
        self._finishing: set[str] = set()
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
        self._call(
            "namespace",
            ns=self.namespace,
            description={
                "model": str(self.opts.vllm_config.model_config.model),
                "block_size": self.opts.block_size,
                "tp_size": self.opts.tp_size,
                "rank": None if self.opts.use_mla else self.rank,
                "layout": layout_signature(layers),
            },
        )

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
        for an event recorded now, after the forward pass on vLLM's stream."""
        if self._disabled is not None or not self._layers or not self._usable():
            return None
        try:
            dl = Deadline(timeout_ms, self._block_bytes, start)
            p, err = self.transfers.submit(
                op, t.keys, [tr.tensor for tr in self._layers], self._shards_of(t.block_ids), dl, commit=op == "dump"
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

    def start_load_kv(self, meta: "KVConnectorMetadata") -> None:
        """Loads this step's planned blocks; returns once each is in place or
        reported failed (with asynchronous loading: once each is submitted)."""
        if not isinstance(meta, UCMConnectorMetadata) or not meta.loads:
            return
        unreported = list(meta.loads)
        running: dict[str, Pending] = {}  # req -> engine task, submitted and not yet finished
        try:
            self._load(unreported, running)
        except Exception as e:  # noqa: BLE001 - a planned load that fails is recomputed, never an error in vLLM
            self._unexpected("load", e)
            for t in unreported:
                p = running.get(t.req_id)
                if p is not None:
                    self._memory_free(p, "load")  # vLLM recomputes these blocks: the engine must not write them later
                self._report_failed(t, list(range(len(t.keys))))

    def _load(self, unreported: list[Transfer], running: dict[str, Pending]) -> None:
        t_start = time.perf_counter()
        count = sum(len(t.keys) for t in unreported)
        start = time.monotonic()
        tasks = []
        for t in list(unreported):
            p = self._submit("load", t, self.config.load_timeout_ms, start)
            tasks.append((t, p))
            if p is not None:
                running[t.req_id] = p
        if self.opts.load_async:
            # Finished (or failed) loads are reported by get_finished.
            for t, p in tasks:
                self._async_loads[t.req_id] = (p, t)
                unreported.remove(t)
            return
        for t, p in tasks:
            failed: list[int] = list(range(len(t.keys)))
            if p is not None:
                r = self.transfers.wait(p, p.deadline.left_ms())
                if r is not None:
                    failed = list(r.get("failed", []))
                else:
                    self._load_timed_out(p, t)
                running.pop(t.req_id, None)
            self._report_failed(t, failed)
            unreported.remove(t)
        logger.debug(
            "UCM: loaded %d block(s) for %d request(s) in %.4f s", count, len(tasks), time.perf_counter() - t_start
        )

    def _load_timed_out(self, p: Pending, t: Transfer) -> None:
        """A load not done by its deadline (or whose engine stopped answering):
        its blocks are recomputed by vLLM and may be reused, so they are
        reported failed only once the engine can no longer write them."""
        if self._memory_free(p, "load"):
            logger.error(
                "UCM: request %s: load task %s timed out and the engine did not answer; its deadline has "
                "passed, vLLM recomputes it",
                t.req_id,
                p.task,
            )
        else:
            logger.warning(
                "UCM: request %s: load did not finish within %d ms; cancelled, vLLM recomputes it",
                t.req_id,
                self.config.load_timeout_ms,
            )

    def _report_failed(self, t: Transfer, failed: list[int]) -> None:
        # Blocks are used in order: everything after the first failure is recomputed too.
        first = min(failed) if failed else len(t.keys)
        self._stats["loaded_blocks"] += first
        self._stats["load_failed_blocks"] += len(t.keys) - first
        if failed:
            self._load_errors.update(t.block_ids[first:])
            if self._disabled is None:  # the store being off was said once already
                logger.warning(
                    "UCM: request %s: %d of %d block(s) could not be loaded; vLLM recomputes them",
                    t.req_id,
                    len(t.keys) - first,
                    len(t.keys),
                )

    def wait_for_save(self, meta: "KVConnectorMetadata") -> None:
        """Hands this step's planned saves to the engine (after the forward pass)."""
        if not isinstance(meta, UCMConnectorMetadata):
            return
        # CPU: the forward pass has finished. GPU: each dump carries an event
        # recorded on the current stream, which the engine waits on.
        for t in meta.saves:
            try:
                self._saving_w.add(t.req_id)
                p = self._submit("dump", t, self.opts.save_timeout_ms)  # None: the save is dropped, a future miss
                if p is not None:
                    self._dumps.setdefault(t.req_id, []).append(p)
            except Exception as e:  # noqa: BLE001 - a save that cannot be made is dropped
                self._unexpected("dump", e)

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

    def _async_load_result(self, p: Pending | None, t: Transfer) -> list[int] | None:
        """The failed blocks of an asynchronous load once it is over, None while
        it runs (or while the engine does not answer and its deadline has not
        passed: vLLM may reuse the blocks as soon as they are reported)."""
        if p is None:
            return list(range(len(t.keys)))
        r = self.transfers.ask(p, "check")
        if r is not None and r.get("done"):
            return list(r.get("failed", []))
        if r is None and not (p.deadline.passed() or p.engine_gone()):
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
            r = self.transfers.ask(p, "check")
            if r is not None and r.get("done"):
                self._count_saves(p.keys, r)
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
            if s in block_status.STORED:
                self._stats["saved_blocks"] += 1
            elif s == block_status.DROPPED:
                self._stats["save_dropped_blocks"] += 1
            else:
                self._stats["save_failed_blocks"] += 1

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
