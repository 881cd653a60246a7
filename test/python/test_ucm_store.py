"""UCM's public store interface over this package (issue 17, items 5 and 6):
the modules, names and return values UCM's code uses, exercised the way
UCM's NFS store scripts use them (their test/ folder: nfsstore_embed.py,
nfsstore_fetch.py, nfsstore_embed_fetch.py; read, not copied). Real engines,
byte-exact."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import stop_engine
from ucm.config import default_endpoint
from ucm.store.factory import UcmConnectorFactory
from ucm.store.nfsstore.nfsstore_connector import EDUPLICATE, NfsTask, UcmNfsStore, engine_config
from ucm.store.ucmstore import Task, UcmKVStoreBase

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture
def flat(storage):
    """UCM's flat connector config for the test's storage directory (the
    engine on its default endpoint, stopped afterwards)."""
    cfg = {
        "storage_backends": str(storage),
        "transferStreamNumber": 4,
        "clientTimeoutMs": 3000,
        "role": "worker",
        "device": 0,
    }
    yield cfg
    stop_engine(default_endpoint(str(storage)))


def blocks_of(layers, dim, length, n, dtype=torch.bfloat16):
    return [[torch.rand(dim, length, dtype=dtype) for _ in range(layers)] for _ in range(n)]


def entries(hashes, tensors, offset_of):
    ids, offs, flat = [], [], []
    for h, block in zip(hashes, tensors):
        for j, t in enumerate(block):
            ids.append(h)
            offs.append(offset_of(j, t))
            flat.append(t)
    return ids, offs, flat


# ---- the interface ------------------------------------------------------------------------


def test_ucm_modules_names_and_return_values(flat):
    store = UcmConnectorFactory.create_connector("UcmNfsStore", {**flat, "kv_block_size": 3 * 4096})
    try:
        assert isinstance(store, UcmKVStoreBase) and isinstance(store, UcmNfsStore)
        with pytest.raises(ValueError, match="unknown store connector 'UcmNoStore'"):
            UcmConnectorFactory.create_connector("UcmNoStore", flat)
        with pytest.raises(ValueError, match="already registered"):
            UcmConnectorFactory.register_connector("UcmNfsStore", "x", "y")
        with pytest.raises(NotImplementedError, match="engine process"):
            store.cc_store()
        assert store.prefetch(["a"]) is None
        ids = [secrets.token_hex(16) for _ in range(3)]
        src = [torch.rand(2048, dtype=torch.bfloat16) for _ in range(9)]
        assert store.create(ids) == [0, 0, 0]
        task = store.dump([i for i in ids for _ in range(3)], [0, 4096, 8192] * 3, src)
        assert isinstance(task, Task) and isinstance(task, NfsTask) and task.task_id > 0
        assert store.wait(task) == 0
        assert store.check(task) == (0, True)
        assert store.commit(ids[:2], True) is None
        store.commit(ids[2:], is_success=False)
        assert store.lookup(ids) == [True, True, False]
        assert store.lookup([i.encode() for i in ids]) == [True, True, False]  # str and bytes name one block
        assert store.create(ids) == [EDUPLICATE, EDUPLICATE, 0]
        dst = [torch.zeros(2048, dtype=torch.bfloat16) for _ in range(9)]
        task = store.load([i for i in ids for _ in range(3)], [0, 4096, 8192] * 3, dst)
        ret, finished = store.check(task)
        while not finished:
            ret, finished = store.check(task)
        assert (ret, finished) == (1, True) and task.failed_keys == [ids[2]]
        assert all(torch.equal(a, b) for a, b in zip(src[:6], dst[:6]))
        assert all(torch.count_nonzero(t) == 0 for t in dst[6:])
    finally:
        store.close()


def test_kv_block_size_prepares_the_cache_stage_when_the_store_opens(flat, caplog):
    """UcmNfsStore with kv_block_size and a Cache stage: the engine hears the
    block's size when the store opens and makes the stage's memory for it
    in the background, before the first dump. A size the engine refuses is
    said at once, naming it."""
    import time

    cfg = {**flat, "store_pipeline": "Cache|Posix", "cache_buffer_capacity_gb": 1 / 64, "kv_block_size": 1 << 20}
    store = UcmNfsStore(cfg)
    try:
        want = (16 << 20) // (4096 + (1 << 20)) * (4096 + (1 << 20))
        deadline = time.monotonic() + 10
        while (tier := store.store.client.call("stats")["tier"])["usedBytes"] < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tier["usedBytes"] == want and tier["blocks"] == 0, tier
        caplog.set_level(logging.WARNING, logger="ucm")
        store.store.expect_block_bytes(1 << 41)
        assert "blocks of 2199023255552 bytes: " in caplog.text and "maxBlockBytes" in caplog.text
    finally:
        store.close()


def test_flat_config_keys_are_mapped_or_warned_about(storage, caplog, monkeypatch):
    from ucm import ucm_keys

    monkeypatch.setattr(ucm_keys, "_said", set())  # each ignored key is said once per process
    caplog.set_level(logging.WARNING, logger="ucm")
    cfg = engine_config(
        {
            "storage_backends": [str(storage), ""],
            "stream_number": 8,
            "use_direct": 1,
            "storage_capacity": 1 << 30,
            "transferTimeoutMs": 9000,
            "io_size": 4096,
            "buffer_number": 512,
            "kv_block_size": 1 << 20,
            "role": "worker",
            "device": 3,
            "fsync": True,
        }
    )
    assert cfg == {
        "ucm_connector_name": "UcmNfsStore",
        "ucm_connector_config": {
            "storage_backends": str(storage),
            "transferStreamNumber": 8,
            "odirect": True,
            "capacity": 1 << 30,
            "loadTimeoutMs": 9000,
            "fsync": True,
        },
    }
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert (
        "config.io_size: 4096 accepted, no effect here: the engine reads and writes each block file in one I/O" in said
    )
    assert "config.buffer_number: 512 accepted, no effect here" in said
    assert "kv_block_size" not in said and "role" not in said  # arguments describing the caller: taken silently
    # UCM's current names in the flat dict too (UcmPipelineStore's config); a key nobody documents is an error.
    assert engine_config({"storage_backends": "/x", "io_direct": False, "posix_capacity_gb": 0}) == {
        "ucm_connector_name": "UcmNfsStore",
        "ucm_connector_config": {"storage_backends": "/x", "odirect": False},
    }
    with pytest.raises(ValueError, match=r"unknown key config.stream_numbr \(value 8\): neither this store nor UCM"):
        engine_config({"storage_backends": "/x", "stream_numbr": 8})
    with pytest.raises(
        ValueError, match=r"sets transferStreamNumber twice: transferStreamNumber=32 and stream_number=8"
    ):
        engine_config({"storage_backends": str(storage), "transferStreamNumber": 32, "stream_number": 8})
    assert engine_config({"storage_backends": "/x", "useDirect": False})["ucm_connector_config"]["odirect"] is False
    with pytest.raises(ValueError, match="needs storage_backends"):
        engine_config({"kv_block_size": 1})


# ---- UCM's scripts' patterns ----------------------------------------------------------------

EMBED = textwrap.dedent("""
    # UCM's nfsstore_embed.py pattern: one process stores, writes the ids down, exits.
    import json, secrets, sys, torch
    from ucm.store.nfsstore.nfsstore_connector import UcmNfsStore
    cfg, out = json.loads(sys.argv[1]), sys.argv[2]
    layers, dim, length, n = 5, 96, 32, 12
    io_size = dim * length * 2
    store = UcmNfsStore({**cfg, "kv_block_size": io_size * layers, "io_size": io_size})
    torch.manual_seed(7)
    hashes = [secrets.token_hex(16) for _ in range(n)]
    for batch in range(0, n, 4):  # fresh buffers every batch
        hs = hashes[batch:batch + 4]
        tensors = [[torch.rand(dim, length, dtype=torch.bfloat16) for _ in range(layers)] for _ in hs]
        assert sum(store.create(hs)) == 0
        ids, offs, flat = [], [], []
        for h, block in zip(hs, tensors):
            for j, t in enumerate(block):
                ids.append(h); offs.append(j * io_size); flat.append(t)
        task = store.dump(ids, offs, flat)
        assert task.task_id > 0
        assert store.wait(task) == 0
        store.commit(hs, True)
    json.dump(hashes, open(out, "w"))
""")

FETCH = textwrap.dedent("""
    # UCM's nfsstore_fetch.py pattern: another process reads the ids back into fresh buffers.
    import json, sys, torch
    from ucm.store.nfsstore.nfsstore_connector import UcmNfsStore
    cfg, hashes = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
    layers, dim, length = 5, 96, 32
    io_size = dim * length * 2
    store = UcmNfsStore({**cfg, "kv_block_size": io_size * layers, "io_size": io_size})
    torch.manual_seed(7)
    for batch in range(0, len(hashes), 4):
        hs = hashes[batch:batch + 4]
        want = [[torch.rand(dim, length, dtype=torch.bfloat16) for _ in range(layers)] for _ in hs]
        assert all(store.lookup(hs))
        got = [[torch.empty_like(t) for t in row] for row in want]
        ids, offs, flat = [], [], []
        for h, block in zip(hs, got):
            for j, t in enumerate(block):
                ids.append(h); offs.append(j * io_size); flat.append(t)
        task = store.load(ids, offs, flat)
        assert task.task_id > 0
        assert store.wait(task) == 0
        for a, b in zip(want, got):
            for x, y in zip(a, b):
                assert torch.equal(x, y), "bytes differ"
    print("fetched", len(hashes))
""")


def run_py(tmp_path, name, code, *args):
    p = tmp_path / name
    p.write_text(code)
    r = subprocess.run([sys.executable, str(p), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("streams,direct", [(2, False), (8, True)])
def test_embed_in_one_process_fetch_in_another(tmp_path, flat, streams, direct):
    cfg = json.dumps({**flat, "transferStreamNumber": None, "stream_number": streams, "use_direct": direct})
    cfg = json.dumps({k: v for k, v in json.loads(cfg).items() if v is not None})
    run_py(tmp_path, "embed.py", EMBED, cfg, str(tmp_path / "hashes.json"))
    assert "fetched 12" in run_py(tmp_path, "fetch.py", FETCH, cfg, str(tmp_path / "hashes.json"))


def test_embed_fetch_over_stream_counts_and_io_modes(tmp_path, storage):
    """UCM's nfsstore_embed_fetch pattern (per-layer [kv, blocks, len, heads,
    dim] caches, K and V of each layer at consecutive offsets, fresh caches
    every round), one process per stream count and I/O mode on one storage
    directory as UCM's run script does: each run gets an engine with its own
    settings (the idle one is replaced) and every byte comes back."""
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "nfsstore_bench.py"),
            "--dir",
            str(storage),
            "--streams",
            "1,4,16",
            "--direct",
            "off,on",
            "--memory",
            "private,shared",
            "--tokens",
            "512",
            "--block-len",
            "64",
            "--layers",
            "4",
            "--heads",
            "2",
            "--head-size",
            "64",
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        results = json.loads(out.read_text())
        assert len(results) == 12
        for res in results:
            assert res["exact"] and res["failed"] == 0, res
            assert res["threads"] == res["streams"], "the engine does not run with the stream count asked for"
        print(r.stdout)
    finally:
        stop_engine(default_endpoint(str(storage)))


# ---- offsets inside a block, raw addresses ------------------------------------------------------


def test_tensor_parallel_shares_of_one_block(flat, storage):
    """UCM's TP ranks each write their share of one block, K then V of every
    layer at layer_size*layer + layer_size/tp*rank. Each rank's share is
    stored as a piece of its own and read back byte-exact by the same split;
    lookup from either rank finds the block; a load asking for another split
    finds nothing (a miss, never wrong bytes); a store that never saw the
    split (UCM's scheduler) reports a miss."""
    tp, layers, io = 2, 3, 2048
    layer_size = 2 * io * tp
    ranks = [UcmNfsStore({**flat, "kv_block_size": layer_size * layers, "device": r}) for r in range(tp)]
    try:
        ids = [secrets.token_hex(16) for _ in range(4)]
        shares = {}
        for r, store in enumerate(ranks):
            kv = [[torch.rand(io // 2, dtype=torch.bfloat16) for _ in range(2 * layers)] for _ in ids]
            off = lambda j, t, r=r: layer_size * (j // 2) + layer_size // tp * r + io * (j % 2)  # noqa: E731
            task = store.dump(*entries(ids, kv, off))
            assert store.wait(task) == 0
            store.commit(ids, True)
            shares[r] = (kv, off)
        for r, store in enumerate(ranks):
            assert store.lookup(ids) == [True] * 4
            kv, off = shares[r]
            back = [[torch.zeros_like(t) for t in row] for row in kv]
            assert store.wait(store.load(*entries(ids, back, off))) == 0
            assert all(torch.equal(a, b) for x, y in zip(kv, back) for a, b in zip(x, y))
        whole = [[torch.zeros(layer_size * layers // 2, dtype=torch.bfloat16)] for _ in ids]
        task = ranks[0].load(*entries(ids, whole, lambda j, t: 0))
        assert ranks[0].wait(task) == 4 and all(torch.count_nonzero(w[0]) == 0 for w in whole)
        scheduler = UcmNfsStore({**flat, "kv_block_size": layer_size * layers, "role": "scheduler", "device": -1})
        assert scheduler.lookup(ids) == [False] * 4
        scheduler.close()
    finally:
        for s in ranks:
            s.close()


def test_dump_data_and_fetch_data_on_raw_addresses(flat):
    store = UcmNfsStore({**flat, "kv_block_size": 8192})
    try:
        ids = [secrets.token_hex(8) for _ in range(2)]
        private = torch.randint(0, 255, (2, 8192), dtype=torch.uint8)  # plain host memory: copied through staging
        shared = torch.randint(0, 255, (2, 8192), dtype=torch.uint8).share_memory_()
        store.register_memory([shared])
        for src, key in ((private, ids[0]), (shared, ids[1])):
            addrs = [src[0].data_ptr(), src[0].data_ptr() + 4096, src[1].data_ptr(), src[1].data_ptr() + 4096]
            task = store.dump_data([key] * 2 + [key + "x"] * 2, [0, 4096] * 2, addrs, [4096] * 4)
            assert store.wait(task) == 0
            store.commit([key, key + "x"])
        buf = ctypes.create_string_buffer(4 * 8192)
        base = ctypes.addressof(buf)
        keys = [ids[0], ids[0] + "x", ids[1], ids[1] + "x"]
        task = store.fetch_data(
            [k for k in keys for _ in range(2)], [0, 4096] * 4, [base + i * 4096 for i in range(8)], [4096] * 8
        )
        assert store.wait(task) == 0
        got = torch.frombuffer(bytearray(buf.raw), dtype=torch.uint8).view(4, 8192)
        assert torch.equal(got[:2], private) and torch.equal(got[2:], shared)
        with pytest.raises(ValueError, match=r"dst_addr\[0\]: address 0x10 \(\+64 bytes\) is neither inside memory"):
            store.fetch_data([ids[0]], [0], [16], [64])
    finally:
        store.close()


def test_kv_connector_extra_config_inline(tiny_model, storage):
    """UCM accepts the store config inline in kv_connector_extra_config,
    without UCM_CONFIG_FILE."""
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from ucm.integration.vllm.uc_connector import UnifiedCacheConnectorV1

    def build(extra):
        vc = VllmConfig(
            model_config=ModelConfig(model=tiny_model, dtype="float32", max_model_len=2048),
            cache_config=CacheConfig(block_size=32),
            kv_transfer_config=KVTransferConfig(
                kv_connector="UnifiedCacheConnectorV1",
                kv_connector_module_path="ucm.integration.vllm.uc_connector",
                kv_role="kv_both",
                kv_connector_extra_config=extra,
            ),
        )
        return UnifiedCacheConnectorV1(
            vc, KVConnectorRole.SCHEDULER, KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[])
        )

    try:
        conn = build(
            {
                "ucm_connector_name": "UcmNfsStore",
                "ucm_load_async": False,
                "ucm_connector_config": {"storage_backends": str(storage), "transferStreamNumber": 2},
            }
        )
        assert conn.config.storage_backends == str(storage) and conn.config.config_file is None
        assert conn._call("lookup", ns=conn.namespaces, keys=[b"k"])["found"] == [False]
        conn.shutdown()
        with pytest.raises(
            ValueError,
            match=r"must name the UCM config file.*or hold the config inline.*got keys \[\'ucm_load_async\'\]",
        ):
            build({"ucm_load_async": True})
    finally:
        stop_engine(default_endpoint(str(storage)))


# ---- commit by key from any client, a second dump fails (issue 27) ---------------------------------------


def test_blocks_dumped_by_workers_are_committed_by_the_scheduler(flat, storage):
    """UCM's v0.1.0 connector has its workers dump and its scheduler commit,
    through store objects of their own (one engine client each): a commit
    names blocks by key, whoever dumped them. Whole blocks (one worker) and
    blocks dumped in pieces by two tensor-parallel ranks both become visible,
    and load back byte-exact; nothing is visible before the commit."""
    tp, layers, io = 2, 2, 2048
    layer_size = 2 * io * tp
    bs = layer_size * layers
    ranks = [UcmNfsStore({**flat, "kv_block_size": bs, "device": r}) for r in range(tp)]
    single = UcmNfsStore({**flat, "kv_block_size": bs, "device": 0})
    scheduler = UcmNfsStore({**flat, "kv_block_size": bs, "role": "scheduler", "device": -1})
    try:
        whole_ids = [secrets.token_hex(16) for _ in range(3)]
        whole = [[torch.rand(bs // 2, dtype=torch.bfloat16)] for _ in whole_ids]
        assert single.wait(single.dump(*entries(whole_ids, whole, lambda j, t: 0))) == 0
        piece_ids = [secrets.token_hex(16) for _ in range(3)]
        shares = {}
        for r, store in enumerate(ranks):
            kv = [[torch.rand(io // 2, dtype=torch.bfloat16) for _ in range(2 * layers)] for _ in piece_ids]
            off = lambda j, t, r=r: layer_size * (j // 2) + layer_size // tp * r + io * (j % 2)  # noqa: E731
            assert store.wait(store.dump(*entries(piece_ids, kv, off))) == 0
            shares[r] = (kv, off)
        assert single.lookup(whole_ids) == [False] * 3
        assert ranks[0].lookup(piece_ids) == [False] * 3
        scheduler.commit(whole_ids + piece_ids + [secrets.token_hex(16)], True)  # and one nobody dumped
        assert single.lookup(whole_ids) == [True] * 3
        back = [[torch.zeros_like(t) for t in b] for b in whole]
        assert single.wait(single.load(*entries(whole_ids, back, lambda j, t: 0))) == 0
        assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, back))
        for r, store in enumerate(ranks):
            assert store.lookup(piece_ids) == [True] * 3
            kv, off = shares[r]
            back = [[torch.zeros_like(t) for t in row] for row in kv]
            assert store.wait(store.load(*entries(piece_ids, back, off))) == 0
            assert all(torch.equal(a, b) for x, y in zip(kv, back) for a, b in zip(x, y))
        # A commit with is_success False from the scheduler discards what the workers dumped.
        gone = [secrets.token_hex(16)]
        assert single.wait(single.dump(*entries(gone, whole[:1], lambda j, t: 0))) == 0
        scheduler.commit(gone, False)
        single.commit(gone, True)  # nothing left to commit
        assert single.lookup(gone) == [False]
    finally:
        for s in [*ranks, single, scheduler]:
            s.close()


def test_a_second_dump_of_a_stored_block_fails_as_in_ucm(flat):
    """UCM reports a dump of a block already stored as failed (`create` said
    EDUPLICATE for it); the stored bytes stay the first ones."""
    store = UcmNfsStore({**flat, "kv_block_size": 8192})
    try:
        ids = [secrets.token_hex(16) for _ in range(3)]
        first = [[torch.rand(4096, dtype=torch.bfloat16)] for _ in ids]
        assert store.wait(store.dump(*entries(ids, first, lambda j, t: 0))) == 0
        store.commit(ids, True)
        other = [[torch.rand(4096, dtype=torch.bfloat16)] for _ in ids]
        task = store.dump(*entries(ids[:2], other[:2], lambda j, t: 0))
        assert store.wait(task) == 2
        assert store.check(task) == (2, True)
        back = [[torch.zeros(4096, dtype=torch.bfloat16)] for _ in ids]
        assert store.wait(store.load(*entries(ids, back, lambda j, t: 0))) == 0
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, back))
    finally:
        store.close()


def test_commit_keys_must_name_one_key_per_block(flat):
    """The protocol's `commit_keys` is checked like `keys`: a bad one is
    refused naming the field, and the engine keeps serving."""
    from ucm.client import EngineClient, EngineError

    store = UcmNfsStore({**flat, "kv_block_size": 8192})
    try:
        c = EngineClient(default_endpoint(flat["storage_backends"]), 3000, name="commit-keys-check")
        shards = {"count": 1, "region": [1, 1], "offset": [0, 0], "length": [1, 1]}  # checked later than commit_keys
        for bad, said in (
            ([b"a"], "commit_keys holds 1 keys, but keys holds 2"),
            ([b"a", b""], "commit_keys[1] must be 1 to 64 bytes"),
            ("ab", "commit_keys must be an array of bin"),
        ):
            with pytest.raises(EngineError, match=said.replace("[", r"\[").replace("]", r"\]")) as e:
                c.call("dump", ns="ck", keys=[b"k1", b"k2"], shards=shards, commit_keys=bad)
            assert e.value.code == "bad_message"
        assert c.call("lookup", ns="ck", keys=[b"k1"])["found"] == [False]
        c.close()
    finally:
        store.close()
