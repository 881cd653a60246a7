"""What makes two KV blocks interchangeable, checked where the connector
decides it (issue 24, docs/correctness.md): namespaces per pipeline stage
and per identity, a namespace's physical layout compared on first use,
vLLM features refused at start, and a load result believed only when it
says every block is in place."""

from __future__ import annotations

import logging

import pytest
import torch

from connector_kit import connector, keys, meta, step, transfer, vllm_config, warnings_about


def options(model, config_file, parallel=None, kcc=None, **extra):
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from ucm.integration.vllm.common import ConnectorOptions

    kcc = kcc or KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[])
    return ConnectorOptions.from_vllm(vllm_config(model, config_file, parallel, **extra), kcc)


# ---- namespaces ---------------------------------------------------------------------


def test_pipeline_stages_have_namespaces_of_their_own(tiny_model, config_file):
    """Item 2: with PP=2 each stage holds other layers under the same block
    hashes; one namespace for both let a stage load the other's layers."""
    from ucm.integration.vllm.common import UnsupportedConfig

    one = options(tiny_model, config_file)
    # Not run end to end (vLLM's CPU backend cannot): refused unless the operator opts in.
    with pytest.raises(UnsupportedConfig, match=r"pipeline_parallel_size=2.*ucm_allow_pipeline_parallel"):
        options(tiny_model, config_file, parallel={"pipeline_parallel_size": 2})
    two = options(tiny_model, config_file, parallel={"pipeline_parallel_size": 2}, ucm_allow_pipeline_parallel=True)
    stages = [two.namespace(0, s) for s in range(2)]
    assert len(set(stages)) == 2 and all("pp2s" in ns for ns in stages)
    assert two.all_namespaces() == sorted(stages)  # the scheduler's lookup asks every stage
    assert one.namespace(0) not in stages
    assert two.world_size == 2  # every stage's worker reports each load


@pytest.mark.parametrize(
    "extra,why",
    [
        ({"ucm_weights_version": "step-42"}, "weights replaced in place"),
        ({}, "the KV cache layout"),
    ],
)
def test_what_changes_the_meaning_of_kv_changes_the_namespace(tiny_model, config_file, extra, why):
    from vllm.v1.kv_cache_interface import KVCacheConfig

    base = options(tiny_model, config_file)
    if extra:
        other = options(tiny_model, config_file, **extra)
    else:
        kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[])
        kcc.kv_cache_layout = "LBNHC"
        other = options(tiny_model, config_file, kcc=kcc)
    assert other.namespace(0) != base.namespace(0), why
    # A cache reset starts an epoch of its own.
    assert base.namespace(0, 0, epoch=7) != base.namespace(0)


# ---- vLLM features refused at start ---------------------------------------------------


def test_context_parallelism_is_refused_at_start(tiny_model, config_file):
    from ucm.integration.vllm.common import UnsupportedConfig

    with pytest.raises(UnsupportedConfig, match=r"decode_context_parallel_size=2"):
        options(tiny_model, config_file, parallel={"tensor_parallel_size": 4, "decode_context_parallel_size": 2})


def test_several_kv_cache_groups_are_refused_at_start(tiny_model, config_file):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

    from ucm.integration.vllm.common import UnsupportedConfig

    groups = [
        KVCacheGroupSpec(["l0"], FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)),
        KVCacheGroupSpec(
            ["l1"],
            SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32, sliding_window=64),
        ),
    ]
    kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)
    with pytest.raises(UnsupportedConfig, match=r"2 KV cache groups \(FullAttentionSpec, SlidingWindowSpec\)"):
        options(tiny_model, config_file, kcc=kcc)


def test_hashes_of_other_sized_blocks_are_refused_at_start(tiny_model, config_file):
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from ucm.integration.vllm.common import UnsupportedConfig

    kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[])
    kcc.hash_block_size = 64
    with pytest.raises(UnsupportedConfig, match=r"hashes blocks of 64 tokens but the KV cache block is 32"):
        options(tiny_model, config_file, kcc=kcc)


# ---- the physical layout, compared on first use ----------------------------------------


def caches(order: str, nb: int = 8):
    """Two layers of [blocks, heads, tokens, content] views, heads before tokens in memory (HND) or after (NHD)."""
    out = {}
    for i in range(2):
        if order == "HND":
            t = torch.randn(nb, 2, 32, 64)
        else:
            t = torch.randn(nb, 32, 2, 64).permute(0, 2, 1, 3)
        out[f"model.layers.{i}.self_attn.attn"] = t
    return out


def test_layout_signature_tells_nhd_from_hnd():
    from ucm.integration.vllm.layout import block_runs, layout_signature

    a = [block_runs(n, t, 8) for n, t in caches("HND").items()]
    b = [block_runs(n, t, 8) for n, t in caches("NHD").items()]
    assert [tr.tensor.shape for tr in a] == [tr.tensor.shape for tr in b]  # the same logical shapes
    assert [tr.runs for tr in a] == [tr.runs for tr in b]  # and the same bytes per block
    assert layout_signature(a) != layout_signature(b)


def test_a_namespace_first_described_with_another_layout_is_refused(tiny_model, config_file, caplog):
    """Item 3: a worker whose KV tensors lay a block out otherwise than the
    namespace's first user is refused there by the engine, runs without the
    store (every planned load reported failed, nothing saved), and says so."""
    caplog.set_level(logging.INFO, logger="ucm")
    first = connector(tiny_model, config_file, num_blocks=8)
    first.register_kv_caches(caches("HND"))
    ks = keys(2, "layout")
    step(first, meta(saves=[transfer("a", ks, [0, 1])]), finished={"a"})
    second = connector(tiny_model, config_file, num_blocks=8)
    second.register_kv_caches(caches("NHD"))
    assert second._disabled is not None and "conflict" in second._disabled
    assert warnings_about(caplog, "store is off on this worker")
    _, errors = step(second, meta(loads=[transfer("b", ks, [4, 5])]))
    assert errors == {4, 5}
    stats = second.client.raw("stats")
    assert stats["blocksLoaded"] == 0
    # The namespace keeps its first description; the first worker goes on using it.
    third = connector(tiny_model, config_file, num_blocks=8)
    third.register_kv_caches(caches("HND"))
    assert third._disabled is None
    for c in (first, second, third):
        c.shutdown()


# ---- a load result ------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply,failed",
    [
        ({"done": True, "status": ["ok", "ok", "ok"], "failed": []}, []),
        ({"done": True, "status": ["ok", "corrupt", "ok"], "failed": [1]}, [1]),
        ({"done": True, "status": ["ok", "not_found", "ok"], "failed": []}, [1]),  # the statuses decide
        ({"done": True, "status": [], "failed": []}, [0, 1, 2]),  # item 7: the engine could not say
        ({"done": True, "failed": []}, [0, 1, 2]),
        ({"done": True, "status": ["ok", "ok"], "failed": []}, [0, 1, 2]),
        ({"done": True, "status": ["ok", "skipped", "ok"], "failed": []}, [1]),  # skipped is a dump's word
    ],
)
def test_a_load_is_good_only_when_every_block_says_ok(reply, failed):
    from ucm.integration.vllm.worker_loads import load_failures

    assert load_failures(reply, 3) == failed
