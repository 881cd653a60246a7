"""vLLM's real scheduler with the UCM connector, driven step by step as
vLLM's engine core drives it, with the model's side played by the test: the
test says what each step's forward pass reported (tokens, failed blocks,
the workers' UCMWorkerMetadata). The connector's scheduler half talks to a
real engine. Used to check what the connector plans around loads that fail,
which a real vLLM run can only make happen by chance.

The connector answers a new request's lookup a step late (its reply arrives
while the model runs: lookups.py), so `schedule` steps as vLLM's engine core
does until that reply is in."""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import torch

_ids = itertools.count(1)


def vllm_config(
    model: str,
    config_file: str,
    block_size: int = 32,
    tp: int = 1,
    prefix_caching: bool = True,
    max_model_len: int = 4096,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 4096,
    **extra,
):
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig

    mc = ModelConfig(model=model, dtype="float32", max_model_len=max_model_len, seed=0)
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching)
    cache.kv_cache_layout = "LBHNC"  # resolved by the engine core before the connector exists
    return VllmConfig(
        model_config=mc,
        cache_config=cache,
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        ),
        kv_transfer_config=KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1",
            kv_connector_module_path="ucm.integration.vllm.uc_connector",
            kv_role="kv_both",
            kv_connector_extra_config={"UCM_CONFIG_FILE": config_file, **extra},
        ),
    )


def scheduler(vc: Any, num_blocks: int = 256):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    bs = vc.cache_config.block_size
    kcc = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["l0", "l1"], FullAttentionSpec(block_size=bs, num_kv_heads=2, head_size=32, dtype=torch.float32)
            )
        ],
    )
    kcc.kv_cache_layout = "LBHNC"
    vc.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(
        vllm_config=vc,
        kv_cache_config=kcc,
        structured_output_manager=StructuredOutputManager(vc),
        block_size=bs,
        log_stats=False,
    )


def schedule(sched, within_s: float = 30.0):
    """sched.schedule(), run again (after an empty step, as vLLM's engine
    core runs one) while a step scheduled nothing and vLLM holds back a
    waiting request it skipped because the connector did not know yet what
    the store holds for it. An empty step must plan nothing: a plan there
    would be lost to the test."""
    deadline = time.monotonic() + within_s
    while True:
        out = sched.schedule()
        if out.total_num_scheduled_tokens or not sched.deferred_waiting or time.monotonic() > deadline:
            return out
        plan = planned(out)
        assert not (plan["loads"] or plan["saves"] or plan["finished"]), plan
        sched.update_from_output(out, output(out))
        time.sleep(0.002)


def request(tokens: list[int], block_size: int, max_tokens: int = 8):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sp.update_from_generation_config({}, 2)
    return Request(
        request_id=f"r{next(_ids)}",
        prompt_token_ids=list(tokens),
        sampling_params=sp,
        pooling_params=None,
        block_hasher=get_request_block_hasher(block_size, sha256),
    )


def output(sched_out, token: int = 7, invalid: set[int] | None = None, worker_meta: Any = None, finished_sending=None):
    """What the model runner (all workers, merged) returns for a step."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    req_ids = list(sched_out.num_scheduled_tokens)
    # A request still in its prefill samples nothing (its token is discarded by vLLM anyway).
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[token] for _ in req_ids],
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=None,
        kv_connector_output=KVConnectorOutput(
            finished_sending=finished_sending,
            invalid_block_ids=invalid or set(),
            kv_connector_worker_meta=worker_meta,
        ),
    )


def planned(sched_out) -> dict[str, list]:
    """The connector's plan of one step: {"loads": [(req, [block index...])], "saves": [...]}, by block index
    within each request (the tests name blocks by position, not by vLLM's ids)."""
    meta = sched_out.kv_connector_metadata
    return {"loads": list(meta.loads), "saves": list(meta.saves), "finished": list(meta.finished)}


def block_index(req, keys: list[bytes]) -> list[int]:
    """Positions of `keys` among the request's block hashes."""
    hashes = [bytes(h) for h in req.block_hashes]
    return [hashes.index(k) for k in keys]


def store_blocks(config_file, namespaces, keys):
    """Stores a small block under each key in every namespace (what the scheduler's lookup finds)."""
    from ucm.store import NfsStore

    for ns in namespaces:
        with NfsStore(config_file, namespace=ns) as store:
            src = [torch.full((64,), i, dtype=torch.uint8) for i in range(len(keys))]
            assert store.wait(store.dump(keys, [0] * len(keys), src)) == 0
            assert all(store.commit(keys))


def prompt(n_tokens, seed):
    rng = random.Random(seed)
    return [rng.randrange(16, 2500) for _ in range(n_tokens)]
