"""Memory regions live exactly as long as the memory they describe (issue 17,
item 1): a tensor freed and a new one allocated at the same address must
never be handed the old one's region, or the engine reads or writes the old
mapping while wait() says 0. Against the real engine, byte-exact."""

from __future__ import annotations

import gc
import secrets

import pytest
import torch

from conftest import private_sock, write_config
from ucm.store import NfsStore

ROWS, COLS = 64, 1024  # 256 KiB of float32: large enough for the allocator to mmap it


def fresh(kind, store, fill):
    t = torch.full((ROWS, COLS), float(fill)) if fill is not None else torch.zeros(ROWS, COLS)
    if kind == "shared":
        t.share_memory_()
    elif kind == "registered":
        store.register_memory([t])
    return t


@pytest.mark.parametrize("kind", ["private", "shared", "registered"])
def test_reallocated_tensor_gets_its_own_bytes(config_file, kind):
    """The issue's probe, six rounds: dump a torch.full tensor, delete it,
    load into a fresh torch.zeros placed at the freed address. wait() is 0
    and the new tensor holds the stored bytes, every round. Before the fix:
    5 of 6 rounds returned 0 with zeros. Shared and registered tensors have
    regions: the new tensor is made to land on the old one's address (fresh
    ones are allocated until one does), since the bug needs that reuse.
    Private tensors go through staging and never get a region of their own."""
    with NfsStore(config_file) as store:
        for rnd in range(6):
            key = f"probe-{kind}-{rnd}".encode()
            src = fresh(kind, store, rnd + 1)
            freed = src.data_ptr()
            assert store.wait(store.dump([key], [0], [src])) == 0
            assert store.commit([key]) == [True]
            del src
            gc.collect()
            misses = []
            dst = fresh(kind, store, None)
            while kind != "private" and dst.data_ptr() != freed and len(misses) < 32:
                misses.append(dst)
                dst = fresh(kind, store, None)
            if kind == "private":
                assert ("cpu", dst.data_ptr()) not in store.regions._entries
            else:
                assert dst.data_ptr() == freed, f"round {rnd}: no fresh tensor landed on the freed address"
            t = store.load([key], [0], [dst])
            assert store.wait(t) == 0, (t.status, t.error)
            assert torch.equal(dst, torch.full((ROWS, COLS), float(rnd + 1))), (
                f"round {rnd}: wrong bytes after wait() == 0"
            )
            del dst, misses
            gc.collect()


def test_regions_of_dead_storages_are_released(tmp_path, storage):
    """UCM's embed pattern with shared-memory buffers: fresh ones every
    batch. Each dead storage's region is released with the engine, so a
    client limited to 24 regions moves 16 batches of 8 (128 storages)."""
    sock = private_sock(f"reg-{secrets.token_hex(4)}")
    cfg = write_config(
        tmp_path / "reg.yaml", storage, endpoint=f"ipc://{sock}", clientTimeoutMs=3000, maxRegionsPerClient=24
    )
    try:
        with NfsStore(cfg) as store:
            for batch in range(16):
                ids = [f"rel-{batch}-{i}".encode() for i in range(8)]
                src = [torch.full((16, 1024), float(batch * 8 + i)).share_memory_() for i in range(8)]
                t = store.dump(ids, [0] * 8, src)
                assert store.wait(t) == 0, (batch, t.status, t.error)
                assert store.commit(ids) == [True] * 8
                dst = [torch.zeros(16, 1024).share_memory_() for _ in range(8)]
                t = store.load(ids, [0] * 8, dst)
                assert store.wait(t) == 0, (batch, t.status, t.error)
                assert all(torch.equal(a, b) for a, b in zip(src, dst))
                del src, dst
                gc.collect()
            assert len(store.regions._entries) <= 24
    finally:
        from conftest import stop_engine

        stop_engine(f"ipc://{sock}")


def test_embed_fetch_with_fresh_buffers_every_batch(config_file):
    """UCM's nfsstore_embed.py pattern (test/ of UCM, adapted to this size):
    str block ids, per-layer tensors from torch.rand for every batch, embed
    (create, dump, wait, commit), then fetch into torch.empty_like buffers
    made for that batch; byte-exact every batch, and wait() truthful: a
    block that is not stored fails and leaves its buffers untouched."""
    layers, dim, length = 6, 64, 32  # bf16: 4 KiB per layer
    io_size = dim * length * 2
    from ucm.store.nfsstore.nfsstore_connector import UcmNfsStore

    import yaml

    cc = yaml.safe_load(open(config_file))["ucm_connector_config"]
    store = UcmNfsStore({**cc, "kv_block_size": io_size * layers, "io_size": io_size, "role": "worker", "device": 0})
    try:
        for _ in range(4):
            hashes = [secrets.token_hex(16) for _ in range(8)]
            tensors = [[torch.rand(dim, length, dtype=torch.bfloat16) for _ in range(layers)] for _ in hashes]
            assert store.create(hashes) == [0] * 8
            ids, offs, flat = [], [], []
            for h, block in zip(hashes, tensors):
                for j, layer in enumerate(block):
                    ids.append(h)
                    offs.append(j * io_size)
                    flat.append(layer)
            task = store.dump(ids, offs, flat)
            assert task.task_id > 0
            assert store.wait(task) == 0
            store.commit(hashes, True)
            assert store.lookup(hashes) == [True] * 8
            back = [[torch.empty_like(t) for t in row] for row in tensors]
            task = store.load(ids, offs, [t for row in back for t in row])
            assert task.task_id > 0
            assert store.wait(task) == 0
            for row_a, row_b in zip(tensors, back):
                for a, b in zip(row_a, row_b):
                    assert torch.equal(a, b)
        missing = secrets.token_hex(16)
        dst = [torch.zeros(dim, length, dtype=torch.bfloat16) for _ in range(layers)]
        task = store.load([missing] * layers, [j * io_size for j in range(layers)], dst)
        assert store.wait(task) == 1 and task.failed_keys == [missing]
        assert all(torch.count_nonzero(t) == 0 for t in dst)
    finally:
        store.close()
