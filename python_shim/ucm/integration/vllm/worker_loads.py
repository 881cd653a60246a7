"""The worker half's loads: planned blocks brought from the store into vLLM's
KV cache before the forward pass that needs them (or, with asynchronous
loading, while the request waits outside the batch), and what is reported
back: the failed blocks to vLLM (get_block_ids_with_load_errors, which
recomputes them and everything after) and each load's outcome to the
connector's scheduler half (UCMWorkerMetadata), which saves nothing computed
on a load before every worker reported it good.

A load counts as loaded only block by block, in order, each with an `ok`
status in a result that has one per key (`load_failures`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ... import status as block_status
from ...transfer import Pending
from .common import Transfer, UCMConnectorMetadata, UCMWorkerMetadata

if TYPE_CHECKING:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

logger = logging.getLogger("ucm")


class Loads:
    """UCMWorker's loads (a part of it: the attributes below are its own)."""

    _load_errors: set[int]
    _outcomes: dict[int, int]  # load id -> blocks loaded in order, for the scheduler
    _async_loads: dict[str, tuple[Pending | None, Transfer]]  # req -> (task, transfer)

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
                    failed = load_failures(r, len(t.keys))
                else:
                    self._load_timed_out(p, t)
                running.pop(t.req_id, None)
            self._report_failed(t, failed)
            unreported.remove(t)
        logger.debug(
            "UCM: loaded %d block(s) for %d request(s) in %.4f s", count, len(tasks), time.perf_counter() - t_start
        )

    def _load_timed_out(self, p: Pending, t: Transfer) -> None:
        """A load not done by its deadline (or whose engine stopped answering or exited):
        its blocks are recomputed by vLLM and may be reused, so they are
        reported failed only once the engine can no longer write them."""
        if self._memory_free(p, "load"):
            logger.error(
                "UCM: request %s: load task %s timed out and the engine did not answer; its deadline has "
                "passed, vLLM recomputes it",
                t.req_id,
                p.task,
            )
        elif p.engine_gone():
            logger.warning("UCM: request %s: the engine exited during its load; vLLM recomputes it", t.req_id)
        else:
            logger.warning(
                "UCM: request %s: load did not finish within %d ms; cancelled, vLLM recomputes it",
                t.req_id,
                self.config.load_timeout_ms,
            )

    def _report_failed(self, t: Transfer, failed: list[int]) -> None:
        # Blocks are used in order: everything after the first failure is recomputed too.
        first = min(failed) if failed else len(t.keys)
        if t.load_id:
            self._outcomes[t.load_id] = first
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

    def _async_loads_over(self) -> set[str]:
        """The asynchronous loads that ended since the last step (reported to
        vLLM as received; their failed blocks through the load errors)."""
        recved: set[str] = set()
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
        return recved

    def _async_load_result(self, p: Pending | None, t: Transfer) -> list[int] | None:
        """The failed blocks of an asynchronous load once it is over, None while
        it runs (or while the engine does not answer and its deadline has not
        passed: vLLM may reuse the blocks as soon as they are reported)."""
        if p is None:
            return list(range(len(t.keys)))
        r = self.transfers.ask(p, "check")
        if r is not None and r.get("done"):
            return load_failures(r, len(t.keys))
        if r is None and not (p.deadline.passed() or p.engine_gone()):
            return None
        if r is not None and not p.deadline.passed():
            return None
        self._load_timed_out(p, t)
        return list(range(len(t.keys)))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> UCMWorkerMetadata | None:
        """The outcome of each load this worker finished since the last step
        (vLLM merges every worker's and hands them to the scheduler)."""
        if not self._outcomes:
            return None
        out = UCMWorkerMetadata({load_id: (1, ok) for load_id, ok in self._outcomes.items()})
        self._outcomes = {}
        return out


def load_failures(r: dict[str, Any], n: int) -> list[int]:
    """The blocks of a finished load of `n` keys that are not in place: all
    whose status is not `ok`, and all of them when the result does not have
    one status per key (a result the engine could not complete is never
    read as success)."""
    status = r.get("status")
    if not isinstance(status, list) or len(status) != n:
        return list(range(n))
    bad = {i for i, s in enumerate(status) if s != block_status.OK}
    failed = r.get("failed")
    if isinstance(failed, list):
        bad.update(i for i in failed if isinstance(i, int) and 0 <= i < n)
    return sorted(bad)
