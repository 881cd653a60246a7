"""UCM's current store interface over this package (issue 27): the modules
ucm.store.ucmstore_v1 and ucm.store.factory_v1, and UcmPipelineStore, used
the way UCM's current vLLM connector uses them (ucm/integration/vllm/
ucm_connector.py in UCM's repository; read, not copied): the store created
by name from the factory with the config its `_create_store` builds (the
connector config plus device_id, shard_size, block_size, tensor_size_list,
...), a scheduler-side store that knows only block_size asking
`lookup_on_prefix`, workers writing whole blocks with `dump_data` (one shard)
or layer by layer with one shard per layer, `wait` raising RuntimeError on a
failed task. Real engine, byte-exact."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch

from conftest import private_sock, stop_engine
from ucm.store.factory_v1 import UcmConnectorFactoryV1
from ucm.store.pipeline.connector import UcmNfsStoreV1, UcmPipelineStore, UcmPipelineStoreTransTask
from ucm.store.ucmstore_v1 import Task, UcmKVStoreBaseV1

LAYERS, BLOCKS, TOKENS, HEADS, DIM = 3, 12, 16, 2, 32


@pytest.fixture
def connector_config(storage, tmp_path):
    """ucm_connector_config as UCM's docs write it for Cache|Posix, with this
    test's engine socket; the engine is stopped afterwards."""
    sock = private_sock(f"v1{tmp_path.name[-10:]}")
    cc = {
        "store_pipeline": "Cache|Posix",
        "storage_backends": str(storage),
        "io_direct": False,
        "timeout_ms": 20000,
        "store_health": {"enabled": True},
        "use_gdr": False,
        "endpoint": f"ipc://{sock}",
        "transferStreamNumber": 4,
        "clientTimeoutMs": 3000,
    }
    yield cc
    stop_engine(f"ipc://{sock}")


def kv_caches():
    """vLLM-like CPU KV caches: per layer a K and a V tensor [blocks, tokens, heads, dim]."""
    return [[torch.randn(BLOCKS, TOKENS, HEADS, DIM) for _ in range(2)] for _ in range(LAYERS)]


def block_bytes_of(t):
    return t[0].numel() * t[0].element_size()


def store_config(cc, role, layerwise=False, caches=None):
    """The config UCM's connector hands its store (_create_store): the
    connector config, storage_backends as a list, unique_id, and per role the
    caller's layout."""
    config = dict(cc)
    config.setdefault("share_buffer_enable", False)
    config["storage_backends"] = config["storage_backends"].split(":")
    config["unique_id"] = "engine-0"
    per_layer = [block_bytes_of(t) for t in caches[0]] if caches else [TOKENS * HEADS * DIM * 4] * 2
    if role == "worker":
        config["device_id"] = 0
        config["tensor_size_list"] = per_layer if layerwise else per_layer * LAYERS
        config["shard_size"] = sum(per_layer) if layerwise else sum(per_layer) * LAYERS
        config["block_size"] = sum(per_layer) * LAYERS
        config["local_rank_size"] = 1
    else:
        config["block_size"] = sum(per_layer) * LAYERS
    config["posix_gc_enable"] = role != "worker"
    return config


def addresses(caches, block_ids, layer=None):
    """Per block, the address of each tensor's block (all layers, or one): UCM's extract_block_addrs."""
    layers = range(LAYERS) if layer is None else [layer]
    return [[t[b].data_ptr() for l in layers for t in caches[l]] for b in block_ids]


def test_v1_modules_factory_and_whole_block_round_trip(connector_config):
    """UCMDirectConnector's way: one shard per block (shard_index 0), raw
    addresses from dump_data/load_data, the scheduler's lookup_on_prefix."""
    caches = kv_caches()
    original = [[t.clone() for t in layer] for layer in caches]
    worker = UcmConnectorFactoryV1.create_connector(
        "UcmPipelineStore", store_config(connector_config, "worker", caches=caches)
    )
    sched = UcmConnectorFactoryV1.create_connector("UcmPipelineStore", store_config(connector_config, "scheduler"))
    try:
        assert isinstance(worker, UcmKVStoreBaseV1) and isinstance(worker, UcmPipelineStore)
        assert worker.store.config.connector_config["odirect"] is False  # io_direct
        assert worker.store.config.load_timeout_ms == 20000  # timeout_ms
        with pytest.raises(ValueError, match="unknown store connector 'UcmNoStore'"):
            UcmConnectorFactoryV1.create_connector("UcmNoStore", {})
        with pytest.raises(ValueError, match="already registered"):
            UcmConnectorFactoryV1.register_connector("UcmPipelineStore", "x", "y")
        with pytest.raises(NotImplementedError, match="engine process"):
            worker.cc_store()
        ids = [secrets.token_bytes(16) for _ in range(4)]
        assert sched.lookup_on_prefix(ids) == -1
        assert worker.prefetch(ids) is None
        # dump_data as UCM's wait_for_save calls it: all blocks, shard 0, a 2-D array of addresses, an event handle.
        task = worker.dump_data(ids[:3], [0] * 3, np.array(addresses(caches, [1, 2, 3]), dtype=np.uint64), 0)
        assert isinstance(task, Task) and isinstance(task, UcmPipelineStoreTransTask) and task.task_id > 0
        assert worker.wait(task) is None
        assert worker.check(task) is True and task.failed_block_ids == []
        # No commit in this interface: the blocks are visible, to the scheduler's store too.
        assert sched.lookup(ids) == [True, True, True, False]
        assert sched.lookup_on_prefix(ids) == 2
        assert sched.lookup_on_prefix([ids[3]] + ids[:3]) == -1
        for layer in caches:
            for t in layer:
                t.zero_()
        task = worker.load_data(ids[:3], [0] * 3, addresses(caches, [7, 8, 9]))
        while not worker.check(task):
            pass
        worker.wait(task)
        for l in range(LAYERS):
            for j in range(2):
                assert torch.equal(caches[l][j][7:10], original[l][j][1:4])
                assert torch.count_nonzero(caches[l][j][1:4]) == 0
        # A block that is not stored: wait raises (UCM's connector then recomputes), check only says finished.
        task = worker.load_data([ids[3]], [0], addresses(caches, [10]))
        with pytest.raises(RuntimeError, match=r"load task \d+: 1 of 1 blocks failed \(not_found\)"):
            worker.wait(task)
        assert worker.check(task) is True and task.failed_block_ids == [ids[3]]
        assert torch.count_nonzero(caches[0][0][10]) == 0
    finally:
        worker.close()
        sched.close()


def test_v1_layerwise_shards_and_the_last_one_makes_the_block_visible(connector_config):
    """UCMLayerWiseConnector's way: a shard per layer (shard_index = layer),
    dumped and loaded layer by layer with tensors; the block is found once
    its last shard is written, as in UCM's Posix store."""
    caches = kv_caches()
    original = [[t.clone() for t in layer] for layer in caches]
    worker = UcmConnectorFactoryV1.create_connector(
        "UcmPipelineStore", store_config(connector_config, "worker", layerwise=True, caches=caches)
    )
    sched = UcmConnectorFactoryV1.create_connector("UcmPipelineStore", store_config(connector_config, "scheduler"))
    try:
        assert worker.shards == LAYERS
        ids = [secrets.token_bytes(16) for _ in range(2)]
        slots = [4, 5]
        for layer in range(LAYERS):
            worker.wait(worker.dump(ids, [layer] * 2, [[t[b] for t in caches[layer]] for b in slots]))
            assert sched.lookup(ids) == [layer == LAYERS - 1] * 2
        assert sched.lookup_on_prefix(ids) == 1
        for layer in caches:
            for t in layer:
                t.zero_()
        tasks = [
            worker.load(ids, [layer] * 2, [[t[b] for t in caches[layer]] for b in (0, 11)]) for layer in range(LAYERS)
        ]
        for t in tasks:
            worker.wait(t)
        for l in range(LAYERS):
            for j in range(2):
                assert torch.equal(caches[l][j][0], original[l][j][4])
                assert torch.equal(caches[l][j][11], original[l][j][5])
        with pytest.raises(ValueError, match=r"shard_index\[0\] must be an int from 0 to 2"):
            worker.dump(ids[:1], [LAYERS], [[t[0] for t in caches[0]]])
        with pytest.raises(ValueError, match=r"src_tensor\[0\] holds \d+ bytes; a shard is shard_size"):
            worker.dump(ids[:1], [0], [[caches[0][0][0]]])
    finally:
        worker.close()
        sched.close()


def test_a_worker_store_prepares_the_cache_stage_for_its_shard_before_any_dump(connector_config):
    """A worker's store tells the engine its shard's size when it opens
    (NfsStore.expect_block_bytes): the Cache stage makes its memory for
    block files of that size in the background, before the first dump, as
    vLLM's registration does for our own connector. A scheduler's store,
    which dumps nothing, tells it nothing."""
    import time

    cc = dict(connector_config, cache_buffer_capacity_gb=1 / 64)  # a 16 MiB stage
    caches = kv_caches()
    sched = UcmConnectorFactoryV1.create_connector("UcmPipelineStore", store_config(cc, "scheduler"))
    try:
        time.sleep(0.5)
        assert sched.store.client.call("stats")["tier"]["usedBytes"] == 0
        worker = UcmConnectorFactoryV1.create_connector(
            "UcmPipelineStore", store_config(cc, "worker", layerwise=True, caches=caches)
        )
    except BaseException:
        sched.close()
        raise
    try:
        file_bytes = 4096 + worker.shard_size  # a block file: its header, then one shard
        want = (16 << 20) // file_bytes * file_bytes
        deadline = time.monotonic() + 10
        while (tier := worker.store.client.call("stats")["tier"])["usedBytes"] < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tier["usedBytes"] == want and tier["blocks"] == 0, tier
    finally:
        worker.close()
        sched.close()


def test_v1_config_is_checked_as_the_yaml_is(connector_config, storage):
    """The store's flat config goes through the same key table as the YAML:
    UCM's other pipelines and keys nobody documents are refused; the V1
    factory's UcmNfsStore needs no store_pipeline; module_path names a class
    of the caller's."""
    with pytest.raises(ValueError, match=r'store_pipeline is "Mooncake", which this store does not provide'):
        UcmPipelineStore({**connector_config, "store_pipeline": "Mooncake"})
    with pytest.raises(ValueError, match=r"store_pipeline is required with ucm_connector_name \"UcmPipelineStore\""):
        UcmPipelineStore({k: v for k, v in connector_config.items() if k != "store_pipeline"})
    with pytest.raises(ValueError, match=r"unknown key config.posix_io_depth \(value 8\)"):
        UcmPipelineStore({**connector_config, "posix_io_depth": 8})
    plain = {k: v for k, v in connector_config.items() if k != "store_pipeline"}
    store = UcmConnectorFactoryV1.create_connector("UcmNfsStore", plain)
    other = UcmConnectorFactoryV1.create_connector(
        "UcmPipelineStore", connector_config, module_path="ucm.store.pipeline.connector"
    )
    try:
        assert type(store) is UcmNfsStoreV1 and type(other) is UcmPipelineStore
        assert store.lookup([b"k" * 16]) == [False]
    finally:
        store.close()
        other.close()
    with pytest.raises(TypeError, match="not a UcmKVStoreBaseV1"):
        UcmConnectorFactoryV1.create_connector(
            "UcmNfsStore", plain, module_path="ucm.store.nfsstore.nfsstore_connector"
        )
