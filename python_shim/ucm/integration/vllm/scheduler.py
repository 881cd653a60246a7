"""The connector's scheduler half: decides what to load and what to save.

For each new request it asks the engine, in one batched lookup, which of the
blocks beyond those vLLM already holds are stored in every TP rank's
namespace (a block only some ranks stored is a miss), and claims the stored
prefix; it never claims the prompt's last token, which vLLM must compute.
Saves are planned as the KV of blocks becomes complete: the prompt's blocks
as the prefill completes them, generated tokens' blocks in batches while the
request decodes and the rest when it finishes, so that a chat's next turn,
which sends the answer back as prompt, finds them too. Blocks loaded from
the store are never saved again. The plan goes to the workers as each
step's metadata; this half moves no bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from .common import ConnectorOptions, Transfer, UCMConnectorMetadata
from .link import EngineLink

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


@dataclass
class _ReqState:
    request: "Request"
    block_ids: list[int] = field(default_factory=list)
    load_start: int = 0  # first block index loaded from the store
    load_count: int = 0
    saved_upto: int = 0  # block indices below this were handed to the worker for saving
    load_planned: bool = False


class UCMScheduler(EngineLink):
    def __init__(self, opts: ConnectorOptions, name: str):
        super().__init__(opts, name)
        self.namespaces = sorted({opts.namespace(r) for r in range(opts.tp_size)})
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: list[Transfer] = []
        self._final_saves: list[Transfer] = []  # of requests that finished since the last step
        self._saving: set[str] = set()
        self._connect()

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._reqs.get(request.request_id) or _ReqState(request)
        self._reqs[request.request_id] = state
        # Called for a request with nothing computed: a new one, or one that
        # was preempted and starts over. Either way any earlier plan is void.
        state.load_start = state.load_count = 0
        state.load_planned = False
        # Never claim the last prompt token: vLLM must compute at least one.
        max_blocks = (request.num_prompt_tokens - 1) // self.opts.block_size
        start = num_computed_tokens // self.opts.block_size
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
        return (start + hits) * self.opts.block_size - num_computed_tokens, self.opts.load_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        state = self._reqs.get(request.request_id)
        if state is None or num_external_tokens == 0 or state.load_count == 0 or state.load_planned:
            return
        state.load_planned = True
        block_ids = blocks.get_block_ids()[0]
        s, n = state.load_start, state.load_count
        keys = [bytes(h) for h in request.block_hashes[s : s + n]]
        self._pending_loads.append(Transfer(request.request_id, keys, list(block_ids[s : s + n])))

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
        return meta

    def _plan_save(
        self, meta: UCMConnectorMetadata, state: _ReqState, computed: int, scheduled: int, finished: bool = False
    ) -> None:
        """Blocks whose KV is complete once this step has run go to the store
        (minus those loaded from it): the prompt's at once, generated tokens'
        once `decode_save_blocks` of them wait (all of them when `finished`)."""
        req = state.request
        full = min((computed + scheduled) // self.opts.block_size, len(req.block_hashes), len(state.block_ids))
        prompt_full = req.num_prompt_tokens // self.opts.block_size
        if full > prompt_full:
            waiting = full - max(state.saved_upto, prompt_full)
            if self.opts.decode_save_blocks == 0 or (not finished and waiting < self.opts.decode_save_blocks):
                full = prompt_full
        idx = [
            i
            for i in range(state.saved_upto, full)
            if not (state.load_start <= i < state.load_start + state.load_count)
        ]
        state.saved_upto = max(state.saved_upto, full)
        if idx:
            meta.saves.append(
                Transfer(req.request_id, [bytes(req.block_hashes[i]) for i in idx], [state.block_ids[i] for i in idx])
            )
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
