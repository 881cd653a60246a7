"""ucm.store.NfsStore against the real engine, with CPU tensors in shared memory."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

from conftest import engine_pid, private_sock, stop_engine, write_config
from slow_disk import SlowDisk, needs_slow_disk
from store_entries import entries
from ucm.client import EngineClient
from ucm.store import NfsStore


def keys(n, salt="k"):
    return [hashlib.sha256(f"{salt}{i}".encode()).digest() for i in range(n)]


def kv_like(layers=3, blocks=8, block_bytes=4096, fill=True):
    """Per-layer caches shaped [blocks, ...] like vLLM's, as bf16."""
    out = []
    for _ in range(layers):
        t = torch.empty((blocks, block_bytes // 2), dtype=torch.bfloat16)
        if fill:
            t.copy_(torch.randn_like(t, dtype=torch.float32).to(torch.bfloat16))
        else:
            t.zero_()
        out.append(t)
    return out


def test_round_trip(config_file):
    with NfsStore(config_file) as store:
        src = kv_like()
        view = src[1][2]  # a view created before registration
        ks = keys(8)
        task = store.dump(*entries(ks, src, range(8)))
        assert store.wait(task) == 0
        assert task.status == ["ok"] * 8
        assert store.lookup(ks) == [False] * 8  # not visible before commit
        assert store.commit(ks) == [True] * 8
        assert store.lookup(ks + keys(1, "other")) == [True] * 8 + [False]
        # Registration moved the storage into shared memory in place: old views still agree.
        assert view.data_ptr() == src[1][2].data_ptr()
        dst = kv_like(fill=False)
        order = [3, 0, 7]
        task = store.load(*entries([ks[i] for i in order], dst, [0, 1, 2]))
        assert store.wait(task) == 0
        for j, i in enumerate(order):
            for layer in range(3):
                assert torch.equal(dst[layer][j], src[layer][i])


def test_dump_of_stored_block_is_skipped_and_commit_false_discards(config_file):
    with NfsStore(config_file) as store:
        src = kv_like(blocks=4)
        ks = keys(4, "s")
        assert store.wait(store.dump(*entries(ks[:2], src, [0, 1]))) == 0
        store.commit(ks[:2])
        t = store.dump(*entries(ks, src, [0, 1, 2, 3]))
        assert store.wait(t) == 0
        assert t.status == ["skipped", "skipped", "ok", "ok"]
        assert store.commit(ks[2:], success=False) == [False, False]
        assert store.lookup(ks) == [True, True, False, False]


def test_engine_restart_keeps_blocks(config_file, storage):
    src = kv_like(blocks=2)
    ks = keys(2, "restart")
    with NfsStore(config_file) as store:
        assert store.wait(store.dump(*entries(ks, src, [0, 1]))) == 0
        store.commit(ks)
        endpoint = store.config.endpoint
    stop_engine(endpoint)
    with NfsStore(config_file) as store:  # starts a new engine
        assert store.lookup(ks) == [True, True]
        dst = kv_like(blocks=2, fill=False)
        assert store.wait(store.load(*entries(ks, dst, [0, 1]))) == 0
        for a, b in zip(src, dst):
            assert torch.equal(a, b)


def test_store_survives_engine_restart_mid_session(config_file):
    """The same store object reconnects to a new engine and re-registers its memory."""
    with NfsStore(config_file) as store:
        src = kv_like(blocks=2)
        ks = keys(2, "mid")
        assert store.wait(store.dump(*entries(ks, src, [0, 1]))) == 0
        store.commit(ks)
        stop_engine(store.config.endpoint)
        from ucm.launcher import ensure_engine

        ensure_engine(store.config)
        dst = kv_like(blocks=2, fill=False)
        assert store.wait(store.load(*entries(ks, dst, [0, 1]))) == 0
        assert all(torch.equal(a, b) for a, b in zip(src, dst))


def test_corrupted_block_fails_without_wrong_bytes(config_file, storage):
    with NfsStore(config_file) as store:
        src = kv_like(blocks=2)
        ks = keys(2, "bad")
        assert store.wait(store.dump(*entries(ks, src, [0, 1]))) == 0
        store.commit(ks)
        hexkey = ks[1].hex()
        path = os.path.join(storage, store.namespace, hexkey[:2], hexkey)
        with open(path, "r+b") as f:
            f.seek(4096 + 100)
            b = f.read(1)
            f.seek(4096 + 100)
            f.write(bytes([b[0] ^ 0xFF]))
        dst = kv_like(blocks=2, fill=False)
        t = store.load(*entries(ks, dst, [0, 1]))
        assert store.wait(t) == 1
        assert t.failed_keys == [ks[1]]
        assert t.status == ["ok", "corrupt"]
        for a, b in zip(src, dst):
            assert torch.equal(a[0], b[0])
            assert torch.count_nonzero(b[1]) == 0  # untouched
        assert store.lookup(ks) == [True, False]


def test_bad_arguments_name_the_problem(config_file):
    with NfsStore(config_file) as store:
        src = kv_like(blocks=2)
        with pytest.raises(ValueError, match=r"keys\[0\] must be 1 to 64 bytes, got 65"):
            store.lookup([b"x" * 65])
        with pytest.raises(TypeError, match=r"keys\[0\] must be bytes or str, got int"):
            store.lookup([7])
        with pytest.raises(ValueError, match="must be contiguous"):
            store.dump([b"k"], [0], [src[0].t()])
        with pytest.raises(ValueError, match=r"entries 0 \(\[0, 4096\)\) and 1 \(\[10, 4106\)\) overlap"):
            store.dump([b"k", b"k"], [0, 10], [src[0][0], src[1][0]])


def test_unreachable_engine_is_a_miss_not_a_hang(tmp_path, storage):
    from conftest import write_config

    cfg = write_config(tmp_path / "dead.yaml", storage, endpoint=f"ipc://{private_sock('none')}", clientTimeoutMs=300)
    t0 = time.monotonic()
    store = NfsStore(cfg, start_engine=False)
    t = store.dump([b"k"], [0], [kv_like(blocks=1)[0][0]])
    assert t.done and t.failed_keys == [b"k"]
    assert store.lookup([b"k"]) == [False]
    store.close()
    # Bounded by clientTimeoutMs (0.3 s) a call, with room for a loaded machine: never the 30 s of a load deadline.
    assert time.monotonic() - t0 < 5


def engine_idle(endpoint, within_s=30.0):
    """Waits until the engine has no task running (its stats say so)."""
    probe = EngineClient(endpoint, 2000)
    try:
        deadline = time.monotonic() + within_s
        while probe.raw("stats")["tasksInFlight"]:
            assert time.monotonic() < deadline, "the engine still runs a task"
            time.sleep(0.05)
    finally:
        probe.close()


@needs_slow_disk
@pytest.mark.parametrize("memory", ["private", "registered"])
def test_cancelled_load_leaves_the_tensors_alone(tmp_path, memory):
    """A load given up on (cancel, or a wait that timed out) writes nothing
    after the call returns: into registered tensors the engine copies
    directly, so this is the engine's cancel; private ones go through the
    store's staging. A throttled disk (slow_disk.py) keeps the load running
    when it is given up on, whatever the machine's speed."""

    def target(n):
        t = kv_like(layers=2, blocks=n, block_bytes=64 * 1024, fill=False)
        if memory == "registered":
            store.register_memory(t)
        return t

    disk = SlowDisk(128)
    sock = private_sock(f"cancel-{tmp_path.name[-12:]}")
    cfg = write_config(tmp_path / "slow.yaml", disk.mnt, endpoint=f"ipc://{sock}", clientTimeoutMs=10000, maxQueueMs=0)
    try:
        with NfsStore(cfg) as store:
            disk.admit(engine_pid(f"ipc://{sock}"))
            n = 256
            src = kv_like(layers=2, blocks=n, block_bytes=64 * 1024)
            ks = keys(n, "cancel")
            task = store.dump(*entries(ks, src, range(n)))
            assert store.wait(task) == 0
            assert store.commit(ks) == [True] * n
            disk.throttle(read_bps=1 << 20)  # 128 KiB a block: about 8 blocks a second
            dst = target(n)
            task = store.load(*entries(ks, dst, range(n)))
            assert store.cancel(task) is True
            snapshot = [t.clone() for t in dst]
            failed = store.wait(task)
            disk.throttle(read_bps=0)
            engine_idle(f"ipc://{sock}")  # a copy the cancel let through would have landed by now
            assert all(torch.equal(a, b) for a, b in zip(dst, snapshot))
            assert set(task.status) <= {"ok", "cancelled"}
            assert failed == task.status.count("cancelled") > n // 2
            for b, s in enumerate(task.status):
                for layer in range(2):
                    want = src[layer][b] if s == "ok" else torch.zeros_like(src[layer][b])
                    assert torch.equal(dst[layer][b], want)
            # A wait that times out cancels the task before it reports the blocks failed.
            dst2 = target(n)
            disk.throttle(read_bps=1 << 20)
            task = store.load(*entries(ks, dst2, range(n)))
            failed = store.wait(task, timeout_ms=0)
            assert failed > n // 2
            snapshot = [t.clone() for t in dst2]
            disk.throttle(read_bps=0)
            engine_idle(f"ipc://{sock}")
            assert all(torch.equal(a, b) for a, b in zip(dst2, snapshot))
    finally:
        stop_engine(f"ipc://{sock}")
        disk.close()


def test_ucm_flat_connector_config_dict(storage, tmp_path):
    """UCM builds its store from the flat connector-config dict; NfsStore takes it as it is
    (UCM's own keys mapped: use_direct -> odirect, stream_number -> transferStreamNumber)."""
    sock = private_sock("flat")
    flat = {
        "storage_backends": str(storage),
        "transferStreamNumber": 2,
        "use_direct": False,
        "endpoint": f"ipc://{sock}",
    }
    try:
        with NfsStore(flat) as store:
            assert store.config.connector_config["odirect"] is False
            assert store.config.connector_config["transferStreamNumber"] == 2
            src, dst = kv_like(blocks=2), kv_like(blocks=2, fill=False)
            ks = keys(2, "flat")
            assert store.wait(store.dump(*entries(ks, src, [0, 1]))) == 0
            store.commit(ks)
            assert store.wait(store.load(*entries(ks, dst, [0, 1]))) == 0
            assert all(torch.equal(a, b) for a, b in zip(src, dst))
    finally:
        stop_engine(f"ipc://{sock}")


def test_a_client_whose_requests_timed_out_20_times_gets_its_store_back(tmp_path, storage):
    """Issue 24: a request that times out resets the client's socket, and the
    engine used to keep the session of the old socket: after 16 such resets
    the client was answered `busy` at hello until its process ended, all
    misses. Sessions now end with their connection. Each round: the engine
    stopped (SIGSTOP), a request times out, the engine resumed, the next
    request says hello again and is served."""
    import signal
    import time

    from conftest import write_config
    from ucm.client import EngineError, EngineUnavailable

    sock = private_sock("timeouts")
    cfg = write_config(tmp_path / "to.yaml", storage, endpoint=f"ipc://{sock}", clientTimeoutMs=300)
    store = NfsStore(cfg)
    try:
        src = kv_like(blocks=2)
        ks = keys(2, "timeouts")
        assert store.wait(store.dump(*entries(ks[:1], src, [0]))) == 0
        assert store.commit(ks[:1]) == [True]
        engine = store.client.engine_info["pid"]
        for round_ in range(20):
            os.kill(engine, signal.SIGSTOP)
            try:
                with pytest.raises(EngineUnavailable):
                    store.client.call("lookup", ns=store.namespace, keys=ks)
            finally:
                os.kill(engine, signal.SIGCONT)
            found, last = None, None
            deadline = time.monotonic() + 10
            while found is None and time.monotonic() < deadline:
                try:
                    found = store.client.call("lookup", ns=store.namespace, keys=ks)["found"]
                except EngineError as e:  # busy (the bug), or the engine still catching up
                    last = e
                    if e.code == "busy":
                        break
                    time.sleep(0.1)
            assert found == [True, False], f"round {round_}: {last}"
        # It stores again.
        assert store.wait(store.dump(*entries(ks[1:], src, [1]))) == 0
        assert store.commit(ks[1:]) == [True]
        assert store.lookup(ks) == [True, True]
    finally:
        store.close()
        stop_engine(f"ipc://{sock}")
