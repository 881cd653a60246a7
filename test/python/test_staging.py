"""Private CPU tensors through NfsStore's bounded staging pool (issue 29):
calls larger than the pool reuse it as the engine finishes with it, the
pool's memory is touched before the first call, and every byte is the
caller's, against the real engine."""

from __future__ import annotations

import resource
import time

import pytest
import torch

from test_store import keys
from ucm.memory import StagingPool
from ucm.store import NfsStore

MIB = 1 << 20
BUDGET = 128 * MIB


@pytest.fixture
def store(config_file, monkeypatch):
    monkeypatch.setenv("UCM_STAGING_BYTES", "128MiB")
    with NfsStore(config_file) as s:
        peak = [0]
        take = s.staging.take

        def counting_take(n):
            buf = take(n)
            peak[0] = max(peak[0], s.staging.lent)
            return buf

        s.staging.take = counting_take
        s.peak = peak
        yield s


def blocks(n, block=16 * MIB, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, block), dtype=torch.uint8, generator=g)


def test_a_dump_and_a_load_larger_than_the_pool_stay_within_it(store):
    """24 blocks of 16 MiB (384 MiB) through a 128 MiB pool: byte-exact both
    ways, never more than the pool lent at once, and the caller may reuse its
    tensors as soon as dump() returns (the copies are done by then)."""
    n = 24
    src = blocks(n)
    want = src.clone()
    ks = keys(n, "big")
    task = store.dump(ks, [0] * n, [src[i] for i in range(n)])
    src.zero_()  # reused at once, as the contract allows
    assert store.wait(task) == 0
    assert store.commit(ks) == [True] * n
    dst = torch.zeros_like(src)
    task = store.load(ks, [0] * n, [dst[i] for i in range(n)])
    assert store.wait(task) == 0
    assert torch.equal(dst, want)
    assert 0 < store.peak[0] <= BUDGET, f"the pool lent {store.peak[0] / MIB:.0f} MiB at once"
    assert store.staging.lent == 0


def test_loads_queued_behind_each_other_all_arrive(store):
    """Eight loads of 64 MiB submitted at once, waited for newest first (the
    last one's units wait for staging that the first ones hold) and one
    checked until done: every byte arrives, within the pool."""
    n = 32
    src = blocks(n, seed=1)
    ks = keys(n, "queued")
    assert store.wait(store.dump(ks, [0] * n, [src[i] for i in range(n)])) == 0
    assert store.commit(ks) == [True] * n
    dst = torch.zeros_like(src)
    tasks = [store.load(ks[i : i + 4], [0] * 4, [dst[j] for j in range(i, i + 4)]) for i in range(0, n, 4)]
    deadline = time.monotonic() + 60
    while not store.check(tasks[3]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for t in reversed(tasks):
        assert store.wait(t) == 0
    assert torch.equal(dst, src)
    assert store.peak[0] <= BUDGET
    assert store.staging.lent == 0


def test_a_cancelled_load_with_units_not_sent_touches_nothing_of_them(store):
    """A load larger than the pool cancelled at once: its units not sent yet
    are never sent, their tensors stay as they were, and the pool is whole."""
    n = 24
    src = blocks(n, seed=2)
    ks = keys(n, "cancel-queued")
    assert store.wait(store.dump(ks, [0] * n, [src[i] for i in range(n)])) == 0
    assert store.commit(ks) == [True] * n
    dst = torch.full_like(src, 7)
    task = store.load(ks, [0] * n, [dst[i] for i in range(n)])
    assert store.cancel(task) is True
    failed = store.wait(task)
    assert failed >= n - BUDGET // (16 * MIB)  # at most what fits in the pool was sent
    for b, s in enumerate(task.status):
        assert torch.equal(dst[b], src[b] if s == "ok" else torch.full_like(src[b], 7)), (b, s)
    assert store.staging.lent == 0


def test_the_pool_is_touched_before_the_first_copy(store):
    """The pool's memory is made and faulted in on a background thread when
    the store opens: copying into it takes (almost) no page faults."""
    deadline = time.monotonic() + 30
    while sum(b.numel() for b in store.staging._idle) < BUDGET:
        assert time.monotonic() < deadline, "the pool was not prepared within 30 s"
        time.sleep(0.05)
    chunk = store.staging.take(StagingPool.CHUNK)
    data = torch.randint(0, 256, (StagingPool.CHUNK,), dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    chunk.copy_(data)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    store.staging.give(chunk)
    pages = StagingPool.CHUNK // 4096
    assert faults < pages // 20, f"{faults} page faults copying into {pages} pages"
