"""The shim's GPU path, end to end, without a GPU.

torch's CUDA runtime is emulated in this process (cuda_emu.py: tensors on
`cuda:i` over shared memory, torch's exact `_share_cuda_` tuple and 66-byte
handle, interprocess events); the engine is the real engine process with the
production CUDA backend built against the emulated CUDA runtime
(native/build-emu, selected with UCM_NATIVE_ADDON). Our code, shim and
engine, is the code under test, unchanged. This stands in for a run on a
real GPU; it does not replace one (bench/gpu_validate.py does that).

Tests that need no engine GPU path (handle parsing, refusals, the engine's
environment) run without the emulated addon; the others are skipped, with
the reason, until it is built.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import pytest
import torch

import cuda_emu as ce
from conftest import private_sock, stop_engine, write_config
from store_entries import entries
from ucm.client import EngineClient
from ucm.memory import RegionRegistry, UnsupportedMemory, cuda_ipc_handle
from ucm.store import NfsStore

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EMU_ADDON = os.path.join(ROOT, "native", "build-emu", "Release", "ucm_native.node")
GPU_A, GPU_B = "0000:01:00.0", "0000:41:00.0"
needs_emu_engine = pytest.mark.skipif(
    not os.path.exists(EMU_ADDON),
    reason=f"the engine addon over the emulated CUDA runtime is not built ({EMU_ADDON}; "
    "`UCM_CUDA_EMU=1 npx cmake-js compile --directory native --out native/build-emu`, as test/run_all.sh does)",
)

LAYERS, BLOCKS, ROW = 2, 8, 8 * 1024 + 72  # bf16 elements per block per layer: 16,528 bytes, not a multiple of 16


def keys(n, salt):
    return [hashlib.sha256(f"{salt}{i}".encode()).digest() for i in range(n)]


def gpu_cache(rt, device=0, fill=True, alloc=None, offset=0):
    """Per-layer KV caches [blocks, row] on the emulated GPU `device`."""
    out = []
    for layer in range(LAYERS):
        t = rt.tensor(
            (BLOCKS, ROW),
            torch.bfloat16,
            device=device,
            alloc=alloc,
            offset=offset + layer * BLOCKS * ROW * 2 if alloc is not None else 0,
        )
        if fill:
            t.copy_(torch.randn(BLOCKS, ROW).to(torch.bfloat16))
        out.append(t)
    return out


def same(a, b, blocks_a=None, blocks_b=None):
    blocks_a = list(range(BLOCKS)) if blocks_a is None else blocks_a
    blocks_b = blocks_a if blocks_b is None else blocks_b
    return all(torch.equal(x.host()[blocks_a], y.host()[blocks_b]) for x, y in zip(a, b))


def stats(endpoint):
    c = EngineClient(endpoint, 2000)
    try:
        return c.raw("stats")
    finally:
        c.close()


def health(endpoint):
    c = EngineClient(endpoint, 2000)
    try:
        return c.raw("health")["status"]
    finally:
        c.close()


@pytest.fixture
def emu_node(tmp_path, storage, monkeypatch, cuda_emu):
    """Makes configs whose engine (started by the store, as in production)
    runs on the emulated node; `fail` injects CUDA errors into it."""
    made = []

    def make(fail=None, **opts):
        sock = private_sock(f"emu-{tmp_path.name[-10:]}-{len(made)}")
        settings = dict(
            endpoint=f"ipc://{sock}",
            clientTimeoutMs=3000,
            loadTimeoutMs=20000,
            pinnedStagingBytes=8 << 20,
            maxQueueMs=0,
            clientCheckMs=100,
            cudaEventTimeoutMs=20000,
        )
        cfg = write_config(tmp_path / f"emu{len(made)}.yaml", storage, **{**settings, **opts})
        monkeypatch.setenv("UCM_NATIVE_ADDON", EMU_ADDON)
        monkeypatch.setenv("UCM_CUDA_EMU_TRACE", str(tmp_path / "cuda-trace.txt"))
        monkeypatch.setenv("UCM_ENGINE_LOG", str(tmp_path / "engine.log"))
        if fail:
            monkeypatch.setenv("UCM_CUDA_EMU_FAIL", fail)
        else:
            monkeypatch.delenv("UCM_CUDA_EMU_FAIL", raising=False)
        made.append(f"ipc://{sock}")
        return cfg

    yield make
    for endpoint in made:
        stop_engine(endpoint)


def engine_log(tmp_path, showing, within_s=20.0):
    """The engine's log once it shows `showing` (the engine writes it on its own time)."""
    p = tmp_path / "engine.log"
    deadline = time.monotonic() + within_s
    while True:
        text = p.read_text() if p.exists() else ""
        if showing in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


# ---- the shim alone: torch's handle format and what cannot be exported --------------


def test_region_spec_from_torchs_66_byte_handle(cuda_emu):
    alloc = cuda_emu.alloc(1 << 20, device=1)
    t = cuda_emu.tensor((16, 256), torch.bfloat16, alloc=alloc, offset=4096)  # a storage inside an allocation
    raw = t.untyped_storage()._share_cuda_()[1]
    assert len(raw) == 66 and raw[:2] == b"\x02c"
    spec = RegionRegistry(None).export(t[3])  # a view: the whole storage is exported
    assert spec == {
        "medium": "cuda",
        "device": 1,
        "pci_bus_id": GPU_B,
        "handle": alloc.handle,
        "offset": 4096,
        "size": 16 * 256 * 2,
    }
    assert len(spec["handle"]) == 64
    assert cuda_ipc_handle(alloc.handle) == alloc.handle  # torch before the versioned format: passed through


def test_unexportable_memory_is_refused_with_what_to_change(cuda_emu, tmp_path, storage):
    cfg = write_config(tmp_path / "none.yaml", storage, endpoint=f"ipc://{private_sock('none')}", clientTimeoutMs=300)
    store = NfsStore(cfg, start_engine=False)
    ok = cuda_emu.tensor((2, 64), torch.bfloat16)
    exp = cuda_emu.tensor((2, 64), torch.bfloat16, kind="expandable")
    raw = exp.untyped_storage()._share_cuda_()[1]
    assert len(raw) == 78 and raw[:2] == b"\x02e"
    with pytest.raises(UnsupportedMemory, match=r"tensors\[1\]: .*expandable segment.*unset PYTORCH_CUDA_ALLOC_CONF"):
        store.dump([b"k", b"k"], [0, 128], [ok[0], exp[0]])
    cumem = cuda_emu.tensor((2, 64), torch.bfloat16, kind="cumem")
    with pytest.raises(UnsupportedMemory, match=r"tensors\[0\]: torch cannot export .*--enable-sleep-mode"):
        store.load([b"k"], [0], [cumem[1]])
    with pytest.raises(UnsupportedMemory, match="unknown CUDA handle format"):
        cuda_ipc_handle(b"\x03c" + b"\0" * 64)
    store.close()


def test_engine_starts_with_every_gpu_of_the_node(config_file, monkeypatch):
    """vLLM gives each worker its own CUDA_VISIBLE_DEVICES; the engine, started
    by whichever process comes first, must not inherit it."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    with NfsStore(config_file) as store:
        pid = store.client.raw("health")["pid"]
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    assert b"CUDA_VISIBLE_DEVICES" not in env
    assert env.get(b"CUDA_DEVICE_ORDER") == b"PCI_BUS_ID"


# ---- through the engine's GPU path ---------------------------------------------------


@needs_emu_engine
@pytest.mark.parametrize("method", ["batch", "kernel"])
def test_dump_and_load_byte_exact(emu_node, cuda_emu, method):
    cuda_emu.auto_complete = True  # the GPU is idle: events complete as they are recorded
    with NfsStore(emu_node(cudaCopy=method)) as store:
        src = gpu_cache(cuda_emu)
        ks = keys(BLOCKS, f"rt-{method}")
        task = store.dump(*entries(ks, src, range(BLOCKS)))
        assert store.wait(task) == 0, (task.status, task.error)
        assert store.commit(ks) == [True] * BLOCKS
        dst = gpu_cache(cuda_emu, fill=False)
        order = [5, 0, 7]
        task = store.load(*entries([ks[i] for i in order], dst, [0, 1, 2]))
        assert store.wait(task) == 0, (task.status, task.error)
        assert same(dst, src, [0, 1, 2], order)
        assert all(torch.count_nonzero(d.host()[3:]) == 0 for d in dst)  # nothing else written


@needs_emu_engine
def test_cache_stage_gpu_path(emu_node, cuda_emu, storage):
    """With the Cache stage on, a GPU dump is kept in the tier once
    committed and a GPU load of it is served from there, byte-exact, with the
    block files gone from the disk; a block read from the directory enters
    the tier and serves the next load."""
    cuda_emu.auto_complete = True
    with NfsStore(emu_node(hostCacheBytes="64MiB")) as store:
        tier = lambda: stats(store.config.endpoint)["tier"]  # noqa: E731
        src = gpu_cache(cuda_emu)
        ks = keys(BLOCKS, "tier-gpu")
        assert store.wait(store.dump(*entries(ks, src, range(BLOCKS)))) == 0
        assert store.commit(ks) == [True] * BLOCKS
        assert tier()["blocks"] == BLOCKS
        for root, _, files in os.walk(storage):  # another node evicted them all
            for f in files:
                if len(f) == 64:
                    os.unlink(os.path.join(root, f))
        dst = gpu_cache(cuda_emu, fill=False)
        order = [5, 0, 7]
        task = store.load(*entries([ks[i] for i in order], dst, [0, 1, 2]))
        assert store.wait(task) == 0, (task.status, task.error)
        assert same(dst, src, [0, 1, 2], order)
        assert tier()["hits"] == 3
    # One engine a storage directory: each phase stops its own before the next.
    stop_engine(store.config.endpoint)
    # A new engine (an empty tier) over blocks stored on disk: the first load
    # reads the files, the second is served from the tier.
    with NfsStore(emu_node()) as plain:
        ks2 = keys(2, "tier-gpu-disk")
        src = gpu_cache(cuda_emu)
        assert plain.wait(plain.dump(*entries(ks2, src, [1, 2]))) == 0
        assert plain.commit(ks2) == [True, True]
    stop_engine(plain.config.endpoint)
    with NfsStore(emu_node(hostCacheBytes="64MiB")) as store:
        for want_hits in (0, 2):
            dst = gpu_cache(cuda_emu, fill=False)
            assert store.wait(store.load(*entries(ks2, dst, [3, 4]))) == 0
            assert same(dst, src, [3, 4], [1, 2])
            assert stats(store.config.endpoint)["tier"]["hits"] == want_hits


@needs_emu_engine
def test_write_behind_gpu_path(emu_node, cuda_emu, storage):
    """With write-behind, a GPU dump is answered once its blocks are in the
    tier (gathered through a pinned share, copied into a tier buffer), served
    from there, and written to the directory after: its files appear, and a
    new engine without a tier loads them byte-exact."""
    cuda_emu.auto_complete = True

    def block_files():
        return sorted(f for _, _, files in os.walk(storage) for f in files if len(f) == 64)

    ks = keys(BLOCKS, "behind-gpu")
    with NfsStore(emu_node(hostCacheBytes="64MiB", writeBehind=True)) as store:
        tier = lambda: stats(store.config.endpoint)["tier"]  # noqa: E731
        src = gpu_cache(cuda_emu)
        assert store.wait(store.dump(*entries(ks, src, range(BLOCKS)))) == 0
        assert store.commit(ks) == [True] * BLOCKS
        dst = gpu_cache(cuda_emu, fill=False)
        task = store.load(*entries(ks, dst, range(BLOCKS)))
        assert store.wait(task) == 0, (task.status, task.error)
        assert same(dst, src)
        assert tier()["hits"] == BLOCKS
        deadline = time.monotonic() + 10
        while tier()["unwritten"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tier()["written"], tier()["shed"], tier()["writeFailed"]) == (BLOCKS, 0, 0)
        assert block_files() == sorted(k.hex() for k in ks)
    stop_engine(store.config.endpoint)
    with NfsStore(emu_node()) as plain:
        dst = gpu_cache(cuda_emu, fill=False)
        assert plain.wait(plain.load(*entries(ks, dst, range(BLOCKS)))) == 0
        assert same(dst, src)


@needs_emu_engine
def test_event_not_completed_holds_the_dump_back(emu_node, cuda_emu):
    """The dump names an event recorded after the forward pass; until the GPU
    completes it, the engine must not read. Bytes the "forward pass" writes
    before completion are the ones stored."""
    with NfsStore(emu_node()) as store:
        src = gpu_cache(cuda_emu)
        ks = keys(BLOCKS, "event")
        task = store.dump(*entries(ks, src, range(BLOCKS)))
        assert task.task_id is not None and cuda_emu.pending_events() == 1
        time.sleep(0.3)
        assert not store.check(task)
        for t in src:  # the rest of the forward pass
            t.copy_(torch.randn(BLOCKS, ROW).to(torch.bfloat16))
        cuda_emu.complete_events()
        assert store.wait(task) == 0, (task.status, task.error)
        store.commit(ks)
        dst = gpu_cache(cuda_emu, fill=False)
        cuda_emu.auto_complete = True
        assert store.wait(store.load(*entries(ks, dst, range(BLOCKS)))) == 0
        assert same(dst, src)


@needs_emu_engine
def test_load_lands_after_the_work_queued_before_it(emu_node, cuda_emu):
    """vLLM may queue work on its stream that writes the blocks a load fills
    (zeroing new blocks) before it calls start_load_kv. The load carries an
    event recorded then: the engine writes the loaded bytes only once the
    GPU completed it, so that work cannot wipe the loaded KV (issue 24)."""
    with NfsStore(emu_node()) as store:
        src = gpu_cache(cuda_emu)
        ks = keys(BLOCKS, "zeroing")
        cuda_emu.auto_complete = True
        assert store.wait(store.dump(*entries(ks, src, range(BLOCKS)))) == 0
        store.commit(ks)
        dst = gpu_cache(cuda_emu, fill=False)
        cuda_emu.auto_complete = False
        task = store.load(*entries(ks, dst, range(BLOCKS)))
        assert cuda_emu.pending_events() == 1
        time.sleep(0.3)
        assert not store.check(task)  # waiting for the GPU
        for t in dst:  # the work queued before the load: zeroing its blocks
            t.zero_()
        cuda_emu.complete_events()
        assert store.wait(task) == 0, (task.status, task.error)
        assert same(dst, src)


@needs_emu_engine
def test_two_clients_exporting_one_allocation(emu_node, cuda_emu):
    """Two processes' worth of clients register storages of the same
    cudaMalloc allocation (same handle): the engine maps it once, both
    work, and the mapping outlives the first client."""
    cuda_emu.auto_complete = True
    cfg = emu_node()
    per_cache = LAYERS * BLOCKS * ROW * 2
    alloc = cuda_emu.alloc(2 * per_cache)
    a = gpu_cache(cuda_emu, alloc=alloc, offset=0)
    b = gpu_cache(cuda_emu, fill=False, alloc=alloc, offset=per_cache)
    s1, s2 = NfsStore(cfg, name="client-1"), NfsStore(cfg, name="client-2")
    try:
        ks = keys(BLOCKS, "shared")
        assert s1.wait(s1.dump(*entries(ks, a, range(BLOCKS)))) == 0
        s1.commit(ks)
        t = s2.load(*entries(ks, b, range(BLOCKS)))
        assert s2.wait(t) == 0, (t.status, t.error)
        assert same(b, a)
        s1.close()  # releases its regions; the allocation stays mapped for client 2
        for x in b:
            x.zero_()
        t = s2.load(*entries(ks, b, range(BLOCKS)))
        assert s2.wait(t) == 0, (t.status, t.error)
        assert same(b, a)
    finally:
        s1.close()
        s2.close()


@needs_emu_engine
def test_region_lands_on_its_gpu_by_bus_id(emu_node, cuda_emu, monkeypatch, tmp_path):
    """A client with CUDA_VISIBLE_DEVICES=1 calls GPU 0000:41:00.0 its device 0;
    the engine (which sees both GPUs) numbers it 1. Different bytes on each
    GPU: each load must bring back the bytes of the GPU they were dumped from."""
    cuda_emu.auto_complete = True
    cfg = emu_node()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    worker = ce.EmuRuntime(auto_complete=True)  # what that worker process sees
    ce.install(worker, monkeypatch.setattr)
    try:
        assert worker.bus_id(0) == GPU_B and torch.cuda.device_count() == 1
        s1 = NfsStore(cfg, name="worker-cvd-1")  # starts the engine, from a process that sees one GPU
        on_b = gpu_cache(worker, device=0)
        kb = keys(BLOCKS, "gpu-b")
        assert s1.wait(s1.dump(*entries(kb, on_b, range(BLOCKS)))) == 0
        s1.commit(kb)
        # Only GPU B has been touched: one engine context, on the engine's ordinal 1 for it.
        assert (tmp_path / "cuda-trace.txt").read_text().split("\n")[0] == f"context 1 {GPU_B}"

        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        ce.install(cuda_emu, monkeypatch.setattr)  # a process that sees both GPUs
        s2 = NfsStore(cfg, name="worker-all")
        on_a = gpu_cache(cuda_emu, device=0)
        ka = keys(BLOCKS, "gpu-a")
        assert s2.wait(s2.dump(*entries(ka, on_a, range(BLOCKS)))) == 0
        s2.commit(ka)
        to_a, to_b = gpu_cache(cuda_emu, device=0, fill=False), gpu_cache(cuda_emu, device=1, fill=False)
        assert s2.wait(s2.load(*entries(kb, to_a, range(BLOCKS)))) == 0
        assert s2.wait(s2.load(*entries(ka, to_b, range(BLOCKS)))) == 0
        assert same(to_a, on_b) and same(to_b, on_a)

        ce.install(worker, monkeypatch.setattr)  # back in the CVD=1 worker: load A's blocks onto its device 0 (GPU B)
        back = gpu_cache(worker, device=0, fill=False)
        assert s1.wait(s1.load(*entries(ka, back, range(BLOCKS)))) == 0
        assert same(back, on_a)
        contexts = set((tmp_path / "cuda-trace.txt").read_text().split())
        assert {"0", GPU_A, "1", GPU_B} <= contexts
        s1.close()
        s2.close()
    finally:
        worker.close()


@needs_emu_engine
def test_connector_gpu_path(emu_node, cuda_emu, tiny_model):
    """The vLLM connector's worker side on emulated GPU KV caches laid out as
    vLLM 0.32 does (LBNHC): saves with an event, loads, byte-exact."""
    from connector_kit import connector, meta, outcomes_counted, step, transfer

    cfg = emu_node()
    nb = 12
    conn = connector(tiny_model, cfg, num_blocks=nb)
    alloc = cuda_emu.alloc(2 * nb * 16 * 2 * 64 * 2 * 2)
    page = 2 * 16 * 2 * 64 * 2  # heads 2, tokens 16, K+V 2 * 64 bf16
    # One allocation, layer after layer; within a block, tokens before heads (LBNHC).
    caches = {}
    for layer in range(2):
        whole = cuda_emu.tensor((nb, 16, 2, 128), torch.bfloat16, alloc=alloc, offset=layer * nb * page)
        whole.copy_(torch.randn(nb, 16, 2, 128).to(torch.bfloat16))
        caches[f"model.layers.{layer}.self_attn.attn"] = whole.permute(0, 2, 1, 3)  # logical [B, H, N, C]
    conn.register_kv_caches(caches)
    assert len(conn._layers[0].runs) == 1  # a block of a layer is one shard
    ks = keys(4, "connector-gpu")
    step(conn, meta(saves=[transfer("r1", ks, [1, 2, 3, 4])]))
    assert cuda_emu.pending_events() == 1
    cuda_emu.complete_events()
    deadline = time.monotonic() + 20
    while True:
        (sending, _), _ = step(conn, meta(), finished={"r1"})
        if sending == {"r1"} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sending == {"r1"}
    outcomes_counted(conn)  # the writes may end after the blocks went back
    assert conn.get_kv_connector_stats().data["saved_blocks"] == 4
    cuda_emu.auto_complete = True  # the load's own event (recorded before it) completes at once
    _, errors = step(conn, meta(loads=[transfer("r2", ks, [8, 9, 10, 11])]))
    assert errors == set()
    for v in caches.values():
        assert torch.equal(v.host()[8:12], v.host()[1:5])
    conn.shutdown()


@needs_emu_engine
def test_the_kv_cache_is_opened_by_the_engine_at_registration(emu_node, cuda_emu, tiny_model, tmp_path):
    """Opening CUDA IPC handles (a GPU context in the engine) happens when
    vLLM registers the KV cache, not in the first forward pass that loads or
    saves (issue 26)."""
    from connector_kit import connector

    conn = connector(tiny_model, emu_node(), num_blocks=4)
    trace = tmp_path / "cuda-trace.txt"
    assert not trace.exists() or "context" not in trace.read_text()
    conn.register_kv_caches({f"l{i}": cuda_emu.tensor((4, 2, 16, 128), torch.bfloat16) for i in range(2)})
    assert conn._disabled is None
    assert trace.exists() and trace.read_text().startswith("context 0 "), "no GPU context before the first transfer"
    conn.shutdown()


@needs_emu_engine
def test_registration_prepares_the_cache_stage_for_the_block_size(emu_node, cuda_emu, tiny_model):
    """With a Cache stage, vLLM's registration of the KV cache tells the
    engine the size of a block, and the stage prepares its memory for blocks
    of that size before the first request (host_tier.h), not during the first
    dumps."""
    from connector_kit import connector

    conn = connector(tiny_model, emu_node(hostCacheBytes="8MiB"), num_blocks=4)
    conn.register_kv_caches({f"l{i}": cuda_emu.tensor((4, 2, 16, 128), torch.bfloat16) for i in range(2)})
    assert conn._disabled is None
    file_bytes = 4096 + 2 * (2 * 16 * 128 * 2)  # header + 2 layers of one block
    deadline = time.monotonic() + 10
    while True:
        tier = conn.client.raw("stats")["tier"]
        if tier["usedBytes"] == (8 << 20) // file_bytes * file_bytes or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert tier["usedBytes"] == (8 << 20) // file_bytes * file_bytes
    assert tier["blocks"] == 0 and tier["pending"] == 0
    conn.shutdown()


@needs_emu_engine
def test_kv_blocks_larger_than_a_staging_share_are_refused_at_registration(emu_node, cuda_emu, tiny_model, caplog):
    """A GPU block moves through one transfer stream's share of the
    engine's pinned staging; a block larger than that share would fail on
    every dump and load. The connector says so at registration, with the
    sizes, and runs without the store (issue 26)."""
    from connector_kit import connector, keys, meta, step, transfer

    caplog.set_level(logging.INFO, logger="ucm")
    cfg = emu_node(pinnedStagingBytes=1 << 20)  # 4 streams: 256 KiB a share
    nb = 4
    conn = connector(tiny_model, cfg, num_blocks=nb)
    caches = {f"model.layers.{i}.self_attn.attn": cuda_emu.tensor((nb, 16, 128, 128), torch.bfloat16) for i in range(2)}
    conn.register_kv_caches(caches)  # a block: 2 layers x 512 KiB
    assert conn._disabled is not None
    assert "1048576 bytes (all 2 layers)" in conn._disabled and "258048 bytes" in conn._disabled, conn._disabled
    assert "pinnedStagingBytes 1048576 / transferStreamNumber 4" in conn._disabled
    _, errors = step(conn, meta(loads=[transfer("r", keys(2, "big"), [0, 1])]))
    assert errors == {0, 1}  # recomputed, never attempted
    assert conn.client.raw("stats").get("loadTasks", 0) == 0
    conn.shutdown()


@needs_emu_engine
def test_preempted_dump_waiting_for_its_event_never_reads_reused_blocks(emu_node, cuda_emu, tiny_model):
    """A request is preempted while its dump still waits for the event of the
    forward pass that wrote its blocks. handle_preemptions cancels it (no
    wait); the next forward pass, queued after that, writes the freed blocks
    and only then does the GPU complete the event. No block may be stored
    with those new bytes: each ends cancelled, or stored with the old ones."""
    from connector_kit import connector, meta, step, transfer

    cfg = emu_node()
    nb = 8
    conn = connector(tiny_model, cfg, num_blocks=nb, ucm_preempt_wait_ms=0)
    caches = {f"model.layers.{i}.self_attn.attn": cuda_emu.tensor((nb, 2, 16, 128), torch.bfloat16) for i in range(2)}
    for v in caches.values():
        v.copy_(torch.randn(nb, 2, 16, 128).to(torch.bfloat16))
    before = {k: v.host().clone() for k, v in caches.items()}
    conn.register_kv_caches(caches)
    ks = keys(nb, "preempt-gpu")
    step(conn, meta(saves=[transfer("victim", ks, range(nb))]))
    pending = conn._dumps["victim"][0]
    time.sleep(0.2)  # the engine's threads are waiting for the event now
    conn.handle_preemptions(meta(preempted=["victim"]))
    task = pending.task  # (the dump's answer, taken while the preemption settled it)
    assert task is not None
    for v in caches.values():  # the next forward pass reuses the blocks...
        v.fill_(7.0)
    cuda_emu.complete_events()  # ...and then the GPU gets to the event
    r = conn.client.call("wait", task=task, timeout_ms=20000, deadline_ms=30000)
    assert r["done"] and set(r["status"]) <= {"ok", "cancelled"}
    stored = [i for i, s in enumerate(r["status"]) if s == "ok"]
    if stored:
        dst = {k: cuda_emu.tensor((nb, 2, 16, 128), torch.bfloat16) for k in caches}
        conn.register_kv_caches(dst)
        cuda_emu.auto_complete = True
        _, errors = step(conn, meta(loads=[transfer("check", [ks[i] for i in stored], stored)]))
        assert errors == set()
        for k in caches:
            assert torch.equal(dst[k].host()[stored], before[k][stored]), (
                "a block was stored with bytes written after the preemption"
            )
    conn.shutdown()


# ---- CUDA failures: a block status or a refused registration, never a crash ----------

REGISTRATION_FAULTS = ["cudaIpcOpenMemHandle=cudaErrorInvalidValue", "cudaSetDevice=cudaErrorInvalidValue"]
BLOCK_FAULTS = [
    ("cudaHostAlloc", "batch"),
    ("cudaStreamCreateWithFlags", "batch"),
    ("cudaEventQuery", "batch"),
    ("LaunchCopyPieces", "kernel"),
]


@needs_emu_engine
@pytest.mark.parametrize("fault", REGISTRATION_FAULTS)
def test_registration_fault_is_a_failed_task(emu_node, cuda_emu, fault):
    cuda_emu.auto_complete = True
    with NfsStore(emu_node(fail=fault)) as store:
        src = gpu_cache(cuda_emu)
        ks = keys(2, "regfault")
        task = store.dump(*entries(ks, src, [0, 1]))
        assert task.done and task.failed_keys == ks
        assert "unsupported" in task.error and fault.split("=")[1] in task.error
        assert health(store.config.endpoint) == "serving"


@needs_emu_engine
def test_event_registration_fault_is_a_failed_task(emu_node, cuda_emu):
    cuda_emu.auto_complete = True
    with NfsStore(emu_node(fail="cudaIpcOpenEventHandle=cudaErrorInvalidResourceHandle")) as store:
        src = gpu_cache(cuda_emu)
        ks = keys(2, "evfault")
        task = store.dump(*entries(ks, src, [0, 1]))
        assert task.done and task.failed_keys == ks and "cudaErrorInvalidResourceHandle" in task.error
        assert store.lookup(ks) == [False, False]
        assert health(store.config.endpoint) == "serving"


@needs_emu_engine
@pytest.mark.parametrize("call,method", BLOCK_FAULTS)
def test_copy_fault_is_a_block_status(emu_node, cuda_emu, tmp_path, call, method):
    cuda_emu.auto_complete = True
    with NfsStore(emu_node(fail=f"{call}=cudaErrorIllegalAddress", cudaCopy=method)) as store:
        src = gpu_cache(cuda_emu)
        ks = keys(2, f"copyfault-{call}")
        task = store.dump(*entries(ks, src, [0, 1]))
        assert store.wait(task) == 2
        assert task.status == ["io_error", "io_error"]
        store.commit(ks)
        assert store.lookup(ks) == [False, False]
        dst = gpu_cache(cuda_emu, fill=False)
        task = store.load(*entries(ks, dst, [0, 1]))
        assert store.wait(task) == 2
        assert all(torch.count_nonzero(d.host()) == 0 for d in dst)
        assert health(store.config.endpoint) == "serving"
    log = engine_log(tmp_path, "cudaErrorIllegalAddress")
    assert "cudaErrorIllegalAddress" in log
    assert "copy kernel instead" not in log  # a failure is not a missing feature: no silent switch


@needs_emu_engine
def test_driver_without_batched_copies_falls_back_to_the_kernel(emu_node, cuda_emu, tmp_path):
    cuda_emu.auto_complete = True
    with NfsStore(emu_node(fail="cudaMemcpyBatchAsync=cudaErrorNotSupported", cudaCopy="batch")) as store:
        src = gpu_cache(cuda_emu)
        ks = keys(BLOCKS, "fallback")
        assert store.wait(store.dump(*entries(ks, src, range(BLOCKS)))) == 0
        store.commit(ks)
        dst = gpu_cache(cuda_emu, fill=False)
        assert store.wait(store.load(*entries(ks, dst, range(BLOCKS)))) == 0
        assert same(dst, src)
    assert engine_log(tmp_path, "copy kernel instead").count("copy kernel instead") == 1
