"""A worker's dump is sent without waiting for the engine's answer (issue 26).

vLLM's step ends with `wait_for_save`; the engine answers a dump only once
it knows which of the blocks are stored already (a stat per unknown key on
its lookup threads), and on a busy node its process may wait for a core
before it reads the request at all. So the worker sends the dump and goes
on; the engine's answer (the task id, or a refusal) is taken by the first
question about the task: a finishing request's check, a preemption's wait.
These tests hold the engine still (SIGSTOP) or kill it while a dump's
answer is outstanding: the step does not wait, the blocks are stored
byte-exact once the engine runs again, a refusal frees the memory at once
and a dead engine's dumps release their request at once. Real engine, real
sockets, real memory."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import torch

from connector_kit import connector, keys, meta, step, transfer
from ucm.deadline import Deadline
from ucm.shards import ShardList
from ucm.store import NfsStore

NB, ROW = 8, 16 * 1024  # 8 blocks, 2 layers of 64 KiB each per block


@contextmanager
def stopped(pid):
    """The engine frozen (SIGSTOP) for the block; continued whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def worker(tiny_model, config_file, **extra):
    conn = connector(tiny_model, config_file, num_blocks=NB, **extra)
    caches = {f"l{i}": torch.randint(-(2**31), 2**31 - 1, (NB, ROW), dtype=torch.int32) for i in range(2)}
    conn.register_kv_caches(caches)
    return conn, caches


def stored_bytes(config_file, namespace, ks, block_ids, caches):
    """True when every key is stored with the bytes of its block in `caches`."""
    with NfsStore(config_file, namespace=namespace) as store:
        if not all(store.lookup(ks)):
            return False
        dst = [torch.zeros(len(ks), ROW, dtype=torch.int32) for _ in range(2)]
        K, O, T = [], [], []
        for j, k in enumerate(ks):
            for layer in range(2):
                K.append(k)
                O.append(layer * ROW * 4)
                T.append(dst[layer][j])
        if store.wait(store.load(K, O, T)) != 0:
            return False
        return all(torch.equal(dst[layer], caches[f"l{layer}"][list(block_ids)]) for layer in range(2))


def finish(conn, req, within_s=20.0):
    """Steps with `req` finished until the worker releases it; the seconds that took."""
    t0 = time.monotonic()
    while True:
        (sending, _), _ = step(conn, meta(), finished={req})
        if sending and req in sending:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within_s, f"{req} not released within {within_s} s"
        time.sleep(0.01)


def test_a_step_with_saves_does_not_wait_for_the_engine(tiny_model, config_file):
    """The engine is frozen across the step that saves: the step returns at
    once (a dump that waited for its answer would hold it for
    clientTimeoutMs, 3 s here, and then drop the save). Once the engine
    runs again the request is released, its blocks stored byte-exact."""
    conn, caches = worker(tiny_model, config_file)
    ks = keys(4, "deferred")
    step(conn, meta(saves=[transfer("warm", keys(1, "warm"), [7])]))  # namespace described, memory registered
    finish(conn, "warm")
    with stopped(conn.client.engine_identity[0]):
        t0 = time.monotonic()
        step(conn, meta(saves=[transfer("r", ks, [0, 1, 2, 3])]))
        took = time.monotonic() - t0
    assert took < 1.0, f"a step with saves waited {took:.2f} s for a frozen engine"
    pending = conn._dumps["r"][0]
    assert pending.task is None and pending.reply is not None  # answer not taken yet
    finish(conn, "r")
    assert pending.task is not None and not pending.refused
    assert stored_bytes(config_file, conn.namespace, ks, [0, 1, 2, 3], caches)
    assert conn.client.raw("stats")["blocksDumped"] >= 5
    conn.shutdown()


def test_a_refused_dump_frees_its_memory_at_once_and_the_next_one_is_stored(tiny_model, config_file, caplog):
    """A dump the engine refuses (a shard outside its registered memory) is
    known refused only when its answer is taken: it then counts as ended
    with every block failed (nothing of it ran), settles at once without a
    cancel or its deadline, and the connection serves the next dump."""
    conn, caches = worker(tiny_model, config_file)
    step(conn, meta(saves=[transfer("warm", keys(1, "warm2"), [7])]))
    finish(conn, "warm")

    def outside(located):
        out = ShardList(1)
        region, base = located[0]
        out.add(region, base + (1 << 40), ROW * 4)  # far past the end of the region
        return out

    bad = keys(1, "refused")
    p, err = conn.transfers.submit(
        "dump", bad, [caches["l0"]], outside, Deadline(20000, ROW * 8), commit=True, defer=True
    )
    assert err is None and p is not None and p.task is None
    t0 = time.monotonic()
    assert conn.transfers.settle(p) == "cancelled"
    assert time.monotonic() - t0 < 1.0
    assert p.refused and conn.transfers.ask(p, "check")["status"] == []
    assert any("engine refused dump" in r.getMessage() for r in caplog.records)
    ks = keys(2, "after-refusal")
    step(conn, meta(saves=[transfer("r", ks, [2, 3])]))
    finish(conn, "r")
    assert stored_bytes(config_file, conn.namespace, ks, [2, 3], caches)
    conn.shutdown()


def test_a_dump_whose_engine_died_before_answering_releases_its_request(tiny_model, config_file):
    """The engine is killed while the dump's answer is outstanding (frozen,
    then SIGKILL): the request is released within a second of the death
    (nothing of a dead engine can touch vLLM's memory), its blocks counted
    failed, and nothing raises."""
    conn, caches = worker(tiny_model, config_file, ucm_save_timeout_ms=20000)
    step(conn, meta(saves=[transfer("warm", keys(1, "warm3"), [7])]))
    finish(conn, "warm")
    pid = conn.client.engine_identity[0]
    os.kill(pid, signal.SIGSTOP)
    step(conn, meta(saves=[transfer("r", keys(4, "killed"), [0, 1, 2, 3])]))
    os.kill(pid, signal.SIGKILL)
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z":
        time.sleep(0.01)
    took = finish(conn, "r")
    assert took < 1.0, f"the request was held {took:.2f} s after its engine died"
    assert conn._stats["save_failed_blocks"] >= 4
    conn.shutdown()


def test_a_dump_answered_long_before_it_is_asked_about_keeps_its_answer(tiny_model, config_file):
    """A request that decodes for longer than clientTimeoutMs (3 s here) has
    its dump's answer taken only when it finishes: the engine answered long
    before, and nothing read the socket since. That answer is the dump's (it
    once was declared lost unread: the connection was replaced, every other
    outstanding answer lost with it, and the dumps counted failed). The
    session is kept and the blocks are stored byte-exact."""
    conn, caches = worker(tiny_model, config_file)
    step(conn, meta(saves=[transfer("warm", keys(1, "warm4"), [7])]))
    finish(conn, "warm")
    epoch = conn.client.epoch
    ks = keys(4, "answered-long-ago")
    step(conn, meta(saves=[transfer("r", ks, [0, 1, 2, 3])]))
    pending = conn._dumps["r"][0]
    assert pending.task is None and pending.reply is not None  # answer not taken yet
    time.sleep(3.5)  # a long decode: the answer waits on the socket past its due time
    finish(conn, "r")
    assert pending.task is not None and not pending.refused
    assert conn.client.epoch == epoch, "the connection was replaced"
    assert conn._stats["save_failed_blocks"] == 0
    assert stored_bytes(config_file, conn.namespace, ks, [0, 1, 2, 3], caches)
    conn.shutdown()
