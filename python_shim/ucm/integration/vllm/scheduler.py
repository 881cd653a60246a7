"""The connector's scheduler half: decides what to load and what to save.

For each new request it finds out which of the blocks beyond those vLLM
already holds are stored in every rank's namespace (a block only some ranks
stored is a miss), and claims the stored prefix; it never claims the
prompt's last token, which vLLM must compute. The lookup never runs inside
vLLM's step: the first ask is answered "not known yet" and the answer comes
from the engine's reply in a later step (lookups.py). Saves are
planned as the KV of blocks becomes complete: the prompt's blocks as the
prefill completes them, generated tokens' blocks in batches while the
request decodes and the rest when it finishes, so that a chat's next turn,
which sends the answer back as prompt, finds them too. Blocks vLLM had in
its own prefix cache and blocks loaded from the store are not saved again.
The plan goes to the workers as each step's metadata; this half moves no
bytes.

A load that fails poisons every block computed on top of it: the forward
pass attends to whatever the failed blocks held, and with tensor
parallelism one rank's failure reaches every rank through the all-reduce.
So while a request's load has not been reported over by every worker
(`UCMWorkerMetadata`, merged by vLLM across ranks and steps), nothing of
that request is saved; once it has, the saves resume from where they
stopped, and after a failure they cover the blocks vLLM recomputes instead
of the ones it computed on the failed load.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from .common import ConnectorOptions, Transfer, UCMConnectorMetadata, UCMWorkerMetadata
from .link import EngineLink
from .lookups import AsyncLookups, LookupPump, prompt_end

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("ucm")

#: how long a load's outcome may take to come back from the workers, beyond
#: loadTimeoutMs, before the request's saves are given up (a lost report
#: must never let KV computed on an unknown load into the store)
OUTCOME_GRACE_S = 30.0
#: how long past a dump's deadline a hold still makes vLLM wait instead of preempting
HOLD_GRACE_S = 5.0


@dataclass
class _ReqState:
    request: "Request"
    block_ids: list[int] = field(default_factory=list)
    load_start: int = 0  # first block index loaded from the store
    load_count: int = 0
    saved_upto: int = 0  # block indices below this were handed to the worker for saving (or need none)
    load_planned: bool = False
    load_id: int = 0  # the planned load whose outcome the workers report (0: none)
    #: a load whose outcome not every worker reported yet: no save until it is known
    load_pending: bool = False
    load_since: float = 0.0
    load_reports: int = 0
    load_ok: int = 0  # least blocks loaded in order over the reports so far
    #: nothing of this request is saved any more (a load's outcome never came)
    saves_off: bool = False
    #: request_finished came while a load's outcome was pending: blocks held until it comes
    finished: bool = False


class UCMScheduler(EngineLink):
    def __init__(self, opts: ConnectorOptions, name: str):
        super().__init__(opts, name)
        #: the cache epoch: 0 until reset_cache, then a random one (see reset_cache)
        self.epoch = 0
        self.namespaces = opts.all_namespaces(self.epoch)
        self._reqs: dict[str, _ReqState] = {}
        self._by_load: dict[int, str] = {}  # load id -> request id, while its outcome is awaited
        self._next_load_id = 1
        self._pending_loads: list[Transfer] = []
        self._final_saves: list[Transfer] = []  # of requests that finished since the last step
        self._released: list[str] = []  # finished requests whose blocks the workers may hand back
        self._saving: set[str] = set()
        #: finished requests whose blocks vLLM keeps for us, and since when
        #: (has_pending_block_frees)
        self._held: dict[str, float] = {}
        self._ns = tuple(self.namespaces)
        self._block_size = opts.block_size
        self._lookups = AsyncLookups(LookupPump(self._call, self._block_size), self.config, self._count, self._ns)
        self._connect()

    def _count(self, field: str, n: int) -> None:
        self._stats[field] += n

    # ---- lookups and loads ------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Answered from a lookup reply that already arrived; (None, False)
        while it is on its way: vLLM skips the request for this step, keeps
        it waiting and asks again in the next (lookups.py). vLLM may ask
        about every waiting request in one step, and for a burst of new
        ones this is the first code to touch each request's fields (each
        touch of a cold object costs about as much as the rest of the call):
        a new request's ask reads only its id and the length of its block
        hashes; the prompt's exact end is reckoned off the step."""
        req_id = request.request_id
        # No request this half answered is unfinished (this one included: a
        # preempted request is asked again while others run): nothing runs,
        # and a new request's reply is awaited for a moment in this step.
        idle = not self._reqs
        # Called for a request with nothing computed: a new one, or one that
        # was preempted and starts over. Either way any earlier plan is void.
        old = self._reqs.pop(req_id, None)
        if old is not None:
            self._by_load.pop(old.load_id, None)
        bs = self._block_size
        start = num_computed_tokens // bs
        hits = 0
        if start == 0:
            # Is anything stored worth asking about? Any full block: the
            # lookup then stops at the prompt's end (prompt_end; a prompt of
            # exactly one block is asked about for nothing, a step late).
            wanted = len(request.block_hashes) > 0
        else:  # vLLM holds a prefix: is there any prompt block past it?
            wanted = start < prompt_end(request, bs)
        # vLLM takes none of a hit for a request that skips reading caches: nothing to look up.
        if wanted and not request.skip_reading_prefix_cache:
            now = time.monotonic()
            # With no engine known to answer, nothing is asked: a miss at once.
            hits = self._lookups.hits(request, start, now, self._up and now >= self._retry_at, idle)
            if hits is None:
                return None, False
            stats = self._stats
            stats["lookup_blocks"] += max(0, prompt_end(request, bs) - start)
            stats["hit_blocks"] += hits
        # The blocks vLLM holds in its own prefix cache were computed (and
        # offered to the store) by the request that computed them.
        state = _ReqState(request, saved_upto=start)
        self._reqs[req_id] = state
        if hits == 0:
            return 0, False
        state.load_start, state.load_count = start, hits
        return (start + hits) * bs - num_computed_tokens, self.opts.load_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        # Scheduled: its lookup is over (a refresh still on its way is dropped).
        self._lookups.forget(request.request_id)
        state = self._reqs.get(request.request_id)
        if state is None or state.load_planned:
            return
        if num_external_tokens == 0:
            # vLLM took none of the hit (skip_reading_prefix_cache): it computes those blocks itself.
            state.load_count = 0
            return
        if state.load_count == 0:
            return
        state.load_planned = True
        block_ids = blocks.get_block_ids()[0]
        s, n = state.load_start, state.load_count
        keys = request.block_hashes[s : s + n]  # a new list (vLLM's BlockHash is bytes)
        state.load_id = self._next_load_id
        self._next_load_id += 1
        state.load_pending, state.load_since, state.load_reports, state.load_ok = True, time.monotonic(), 0, n
        self._by_load[state.load_id] = request.request_id
        self._pending_loads.append(
            Transfer(request.request_id, keys, list(block_ids[s : s + n]), state.load_id, self.epoch)
        )

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        """Each step's worker reports: a load every worker reported is over,
        and its outcome decides what of the request may be saved."""
        for req_id in getattr(connector_output, "finished_sending", None) or ():
            self._held.pop(req_id, None)
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(meta, UCMWorkerMetadata):
            return
        for load_id, (reports, ok) in meta.loads.items():
            req_id = self._by_load.get(load_id)
            state = self._reqs.get(req_id) if req_id is not None else None
            if state is None or state.load_id != load_id or not state.load_pending:
                continue  # a plan made void since (preempted, aborted)
            state.load_reports += reports
            state.load_ok = min(state.load_ok, ok)
            if state.load_reports >= self.opts.world_size:
                self._load_over(state)

    def _load_over(self, state: _ReqState) -> None:
        """Every worker reported the request's load. Blocks from the first one
        that failed on any rank are recomputed by vLLM, and saved as any
        computed block; only the ones that loaded stay out of the saves."""
        self._by_load.pop(state.load_id, None)
        state.load_pending = False
        state.load_count = state.load_ok
        if state.finished:
            self._finish(state)

    def _give_up_stale_loads(self) -> None:
        """A load whose outcome never came (a worker's report lost): nothing
        computed on it is saved, and a finished request's blocks go back."""
        limit = self.config.load_timeout_ms / 1000 + OUTCOME_GRACE_S
        now = time.monotonic()
        for load_id, req_id in list(self._by_load.items()):
            state = self._reqs.get(req_id)
            if state is None or state.load_id != load_id:
                del self._by_load[load_id]
                continue
            if now - state.load_since > limit:
                logger.warning(
                    "UCM: request %s: the workers did not report its load within %.0f s; none of its blocks "
                    "will be saved",
                    req_id,
                    limit,
                )
                del self._by_load[load_id]
                state.load_pending, state.saves_off = False, True
                if state.finished:
                    self._finish(state)

    # ---- saves -----------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        # The lookups vLLM asked for in this step go out together, while the
        # model runs (the next step is answered from their replies).
        self._lookups.pump.kick()
        if not self._up:
            self._reconnect_soon()  # a no-op while the reconnecting thread runs
        self._give_up_stale_loads()
        meta = UCMConnectorMetadata(loads=self._pending_loads, saves=self._final_saves, finished=self._released)
        self._pending_loads, self._final_saves, self._released = [], [], []
        for req_id in scheduler_output.preempted_req_ids or ():
            # vLLM freed its blocks (the workers settle its dumps first, in
            # handle_preemptions) and computes it again from the start; its
            # new plan is made when vLLM asks get_num_new_matched_tokens.
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
            self._plan_save(
                meta, state, new.num_computed_tokens, scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            )
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
            self._plan_save(
                meta, state, cached.num_computed_tokens[i], scheduler_output.num_scheduled_tokens.get(req_id, 0)
            )
        if not scheduler_output.total_num_scheduled_tokens and not self._reqs:
            # Nothing runs, in this step or any other (no request this half
            # answered is unfinished: with vLLM's batch queue an empty step
            # may be scheduled while an earlier batch still runs, whose output
            # must not wait), and vLLM steps again at once: wait a little for
            # the lookups just sent instead of spinning (lookups.py).
            self._lookups.pump.await_reply()
        return meta

    def _plan_save(
        self, meta: UCMConnectorMetadata, state: _ReqState, computed: int, scheduled: int, finished: bool = False
    ) -> None:
        """Blocks whose KV is complete once this step has run go to the store
        (minus those loaded from it): the prompt's at once, generated tokens'
        once `decode_save_blocks` of them wait (all of them when `finished`).
        Nothing while the request's load is not known to have succeeded:
        those blocks are planned once it is (saved_upto stays)."""
        if state.load_pending or state.saves_off:
            return
        req = state.request
        full = min((computed + scheduled) // self.opts.block_size, len(req.block_hashes), len(state.block_ids))
        prompt_full = req.num_prompt_tokens // self.opts.block_size
        if full > prompt_full:
            waiting = full - max(state.saved_upto, prompt_full)
            if self.opts.decode_save_blocks == 0 or (not finished and waiting < self.opts.decode_save_blocks):
                full = prompt_full
        # [saved_upto, full) less the loaded range: at most two spans, taken
        # as slices (this runs for every scheduled request in the step; a
        # loop over its blocks cost about 40 us a request of 128 blocks).
        lo, hi = state.load_start, state.load_start + state.load_count
        spans = (
            ((state.saved_upto, min(full, lo)), (max(state.saved_upto, hi), full))
            if hi > lo
            else ((state.saved_upto, full),)
        )
        keys: list[bytes] = []
        ids: list[int] = []
        for a, b in spans:
            if a < b:
                keys += req.block_hashes[a:b]  # vLLM's BlockHash is bytes
                ids += state.block_ids[a:b]
        state.saved_upto = max(state.saved_upto, full)
        if keys:
            meta.saves.append(Transfer(req.request_id, keys, ids, epoch=self.epoch))
            self._saving.add(req.request_id)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._lookups.forget(request.request_id)  # a reply still on its way is dropped
        state = self._reqs.pop(request.request_id, None)
        if state is not None and state.load_pending:
            # Its load's outcome is still to come (it arrives with this
            # step's worker reports): keep the blocks until it has, then save
            # or not (_load_over).
            state.finished = True
            self._reqs[request.request_id] = state
            self._held.setdefault(request.request_id, time.monotonic())
            return True, None
        if state is not None:
            return self._finish(state), None
        return self._release(request.request_id), None

    def _finish(self, state: _ReqState) -> bool:
        """The request finished: its last blocks are saved (with the next
        step's metadata) and its blocks stay allocated until the workers say
        the dumps are over. (The last token sampled has no KV yet: it never
        went through the model, so num_computed_tokens stops before it.)
        Called from request_finished, or once a pending load's outcome came
        for a request vLLM was already told to keep."""
        req_id = state.request.request_id
        if state.finished:
            self._reqs.pop(req_id, None)
        if state.block_ids:
            final = UCMConnectorMetadata()
            self._plan_save(final, state, state.request.num_computed_tokens, 0, finished=True)
            self._final_saves.extend(final.saves)
        return self._release(req_id, held=state.finished)

    def _release(self, req_id: str, held: bool = False) -> bool:
        """True when vLLM must keep the request's blocks until the workers
        report it (its dumps may still read them, or vLLM was told so
        already: `held`); the workers are told with the next step's
        metadata."""
        held = held or req_id in self._saving
        self._saving.discard(req_id)
        if held:
            self._released.append(req_id)
            self._held.setdefault(req_id, time.monotonic())
        return held

    def has_pending_block_frees(self) -> bool:
        """True while finished requests' blocks are held for their dumps: they
        come back within a step or two (a dump's blocks are released once
        copied into the engine's staging, not once written), so vLLM waits
        for them instead of preempting a running request. A hold older than a
        dump's deadline (with grace) is not counted: never a reason to wait
        for good."""
        if not self._held:
            return False
        limit = self.opts.save_timeout_ms / 1000 + HOLD_GRACE_S
        now = time.monotonic()
        for req_id, since in list(self._held.items()):
            if now - since > limit:
                del self._held[req_id]
        return bool(self._held)

    # ---- invalidation ------------------------------------------------------------

    def reset_cache(self) -> bool:
        """vLLM's reset_prefix_cache(reset_connector=True) (and
        pause_generation(clear_cache=True)), as after a weight update: from
        now on blocks are looked up, loaded and saved in a new cache epoch,
        a random one, so nothing stored before (by this vLLM or any other
        sharing the store) is loaded again, and nothing computed now mixes
        with what was. Dumps already planned keep their own epoch."""
        self.epoch = secrets.randbits(62) + 1
        self.namespaces = self.opts.all_namespaces(self.epoch)
        self._ns = tuple(self.namespaces)
        # What was looked up in the old epoch's namespaces says nothing now.
        self._lookups.reset(self.epoch, self._ns)
        logger.info("UCM: cache reset: blocks stored before are not used any more (cache epoch %x)", self.epoch)
        return True

    def shutdown(self) -> None:
        self._lookups.pump.close()
        super().shutdown()
