"""Nothing lands in memory after the shim gave up on it (issue 19, item 5).

Every dump and load carries `deadline_unix_ms` (ucm.deadline), and the shim
reports a task's memory free only once the engine acknowledged a cancel, its
process is gone, or that deadline has passed. Here the engine is stopped
with SIGSTOP so that requests are late: the request, or the rest of a task,
is handled only after SIGCONT, past its deadline. Real engine, real
memory, byte-exact."""

from __future__ import annotations

import os
import secrets
import signal
import time
from contextlib import contextmanager

import pytest
import torch

from conftest import private_sock, stop_engine, write_config
from ucm.store import NfsStore

TIMEOUT_MS = 2000  # loadTimeoutMs: the store gives up on a transfer this long after submitting it


@pytest.fixture
def late_config(tmp_path, storage):
    sock = private_sock(f"late-{secrets.token_hex(4)}")
    cfg = write_config(
        tmp_path / "late.yaml",
        storage,
        endpoint=f"ipc://{sock}",
        clientTimeoutMs=500,
        loadTimeoutMs=TIMEOUT_MS,
        transferStreamNumber=1,
        maxQueueMs=0,
    )
    yield cfg
    stop_engine(f"ipc://{sock}")


@contextmanager
def stopped(pid):
    """The engine frozen (SIGSTOP) for the block; continued whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def engine_pid(store):
    return store.client.raw("health")["pid"]


def settled(client, within_s=30.0):
    """Returns once the engine, running again, has handled what it was sent
    while stopped (one connection's requests are handled in order, so the
    stats reply comes after them) and runs no task any more: what it was
    going to write late, it would have written by now."""
    deadline = time.monotonic() + within_s
    while client.raw("stats")["tasksInFlight"]:
        assert time.monotonic() < deadline, "the engine still runs a task"
        time.sleep(0.05)


def test_load_sent_to_a_stopped_engine_never_lands(late_config):
    """The load request reaches the engine's socket but no reply comes: wait()
    returns (1 failed) only once the deadline has passed, and when the engine
    runs again it refuses the late request: the destination stays zero."""
    with NfsStore(late_config) as store:
        src = torch.randint(1, 1 << 30, (256, 1024), dtype=torch.int32).share_memory_()
        dst = torch.zeros_like(src).share_memory_()
        assert store.wait(store.dump([b"late-load"], [0], [src])) == 0
        assert store.commit([b"late-load"]) == [True]
        assert store.wait(store.load([b"late-load"], [0], [dst])) == 0  # registers dst with the engine
        dst.zero_()
        with stopped(engine_pid(store)):
            t0 = time.monotonic()
            task = store.load([b"late-load"], [0], [dst])
            assert store.wait(task) == 1
            took = time.monotonic() - t0
        assert took >= TIMEOUT_MS / 1000 - 0.02, (
            f"wait() reported the memory free after {took:.2f} s, before the deadline"
        )
        settled(store.client)
        assert torch.count_nonzero(dst) == 0, "the engine wrote memory after the shim gave up on it"
        assert store.client.raw("stats")["errors"].get("expired", 0) >= 1


def test_load_stopped_midway_writes_at_most_its_chunk_after_wait(late_config):
    """A load the engine accepted and then could not finish (frozen midway,
    one transfer thread): wait() returns after the deadline; blocks it
    reports ok hold the right bytes, and once the engine runs again at most
    the chunk it was frozen in lands (its own bytes), nothing more."""
    n, row = 64, 256 * 1024  # 64 blocks of 1 MiB
    with NfsStore(late_config) as store:
        src = torch.randint(1, 1 << 30, (n, row), dtype=torch.int32).share_memory_()
        dst = torch.zeros_like(src).share_memory_()
        ks = [f"mid-{i}".encode() for i in range(n)]
        assert store.wait(store.dump(ks, [0] * n, list(src))) == 0
        assert store.commit(ks) == [True] * n
        assert store.wait(store.load(ks[:1], [0], [dst[0]])) == 0  # registers dst
        dst.zero_()
        pid = engine_pid(store)
        task = store.load(ks, [0] * n, list(dst))
        assert task.task_id > 0
        with stopped(pid):
            failed = store.wait(task)
            snapshot = dst.clone()
        settled(store.client)
        # The one transfer thread may have been frozen inside a copy (between
        # its clock read and the end of the memcpy): running again, it ends
        # that chunk and stops (docs/reliability.md, 25.2). So at most one
        # block (1 MiB, within one 4 MiB chunk) changes after wait(), and only
        # to its own bytes; nothing else is written.
        changed = [i for i in range(n) if not torch.equal(dst[i], snapshot[i])]
        assert len(changed) <= 1, f"the engine wrote {len(changed)} blocks after wait() returned: {changed}"
        for i in changed:
            assert torch.equal(dst[i], src[i]), f"block {i} written after wait() with bytes not its own"
        assert failed == sum(s != "ok" for s in task.status) and failed > 0
        for i, s in enumerate(task.status):
            # A block the client could not confirm (the engine froze before it
            # said) may have landed before wait() returned: its own bytes or
            # none, never others.
            ok = torch.equal(dst[i], src[i])
            assert ok if s == "ok" else ok or torch.equal(dst[i], torch.zeros_like(src[i])), (i, s)


def test_dump_of_a_stopped_engine_is_never_committed(late_config):
    """A dump that times out while the engine is frozen: once wait() has
    reported it failed, the caller reuses the memory; the engine, running
    again, copies nothing (past the deadline), so commit finds nothing to
    commit and no wrong bytes are ever stored under the key."""
    with NfsStore(late_config) as store:
        src = torch.full((256, 1024), 7, dtype=torch.int32).share_memory_()
        assert store.wait(store.dump([b"warm"], [0], [src])) == 0  # registers src
        dumped = store.client.raw("stats")["blocksDumped"]
        with stopped(engine_pid(store)):
            task = store.dump([b"late-dump"], [0], [src])
            assert store.wait(task) == 1
            src.fill_(-1)  # the caller reuses its memory
        settled(store.client)
        assert store.client.raw("stats")["blocksDumped"] == dumped, "the engine copied memory the caller had reused"
        assert store.commit([b"late-dump"]) == [False]
        assert store.lookup([b"late-dump"]) == [False]


# ---- the vLLM connector ---------------------------------------------------------------


def _connector(tiny_model, config_file, nb, **extra):
    from connector_kit import connector

    conn = connector(tiny_model, config_file, num_blocks=nb, **extra)
    caches = {f"l{i}": torch.randint(1, 1 << 30, (nb, 64 * 1024), dtype=torch.int32) for i in range(2)}
    conn.register_kv_caches(caches)
    return conn, caches


def test_connector_load_from_a_stopped_engine_never_lands(tiny_model, late_config):
    """A planned load while the engine is frozen: start_load_kv reports the
    blocks failed (vLLM recomputes them) only once their deadline has passed,
    and the engine, running again, writes none of them."""
    from connector_kit import keys, meta, step, transfer

    conn, caches = _connector(tiny_model, late_config, 8)
    ks = keys(4, "conn-late-load")
    step(conn, meta(saves=[transfer("w", ks, [0, 1, 2, 3])]))
    for _ in range(100):  # the saves land (committed by the engine)
        (sending, _), _ = step(conn, meta(), finished={"w"})
        if sending:
            break
        time.sleep(0.05)
    for v in caches.values():
        v[4:].zero_()
    with stopped(conn.client.raw("health")["pid"]):
        t0 = time.monotonic()
        _, errors = step(conn, meta(loads=[transfer("r", ks, [4, 5, 6, 7])]))
        took = time.monotonic() - t0
    assert errors == {4, 5, 6, 7}
    assert took >= TIMEOUT_MS / 1000 - 0.02, f"blocks reported failed after {took:.2f} s, before the deadline"
    settled(conn.client)
    assert all(torch.count_nonzero(v[4:]) == 0 for v in caches.values()), "the engine wrote blocks vLLM recomputes"
    conn.shutdown()


def test_connector_holds_a_finished_requests_blocks_until_its_dump_deadline(tiny_model, late_config):
    """A finished request whose dump the frozen engine never answered keeps
    its blocks until the dump's deadline (vLLM frees them when told the
    request is done); after that the blocks are reused, and the engine,
    running again, stores none of them."""
    from connector_kit import keys, meta, step, transfer

    conn, caches = _connector(tiny_model, late_config, 8, ucm_save_timeout_ms=2000)
    ks = keys(4, "conn-late-dump")
    step(conn, meta(saves=[transfer("warm", keys(1, "warm"), [7])]))  # the KV caches are registered with the engine
    while not step(conn, meta(), finished={"warm"})[0][0]:
        time.sleep(0.05)
    with stopped(conn.client.raw("health")["pid"]):
        t0 = time.monotonic()
        (sending, _), _ = step(conn, meta(saves=[transfer("s", ks, [0, 1, 2, 3])]), finished={"s"})
        held = []
        while not sending:
            held.append(time.monotonic() - t0)
            time.sleep(0.2)
            (sending, _), _ = step(conn, meta())
        released = time.monotonic() - t0
        assert sending == {"s"}
        for v in caches.values():  # vLLM reuses the blocks
            v[:4].fill_(-1)
    assert released >= 2.0 - 0.02 and held, f"released after {released:.2f} s, before the dump's deadline"
    settled(conn.client)
    with NfsStore(late_config, namespace=conn.namespace) as store:
        assert store.lookup(ks) == [False] * 4, "a dump the connector gave up on was stored"
    conn.shutdown()
