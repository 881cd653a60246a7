"""UnifiedCacheConnectorV1 driven directly, as vLLM's model runner drives it,
against a real engine: the connector built from a real VllmConfig (a tiny
local model), KV caches registered, metadata bound, hooks called in vLLM's
order. Covers what a full vLLM run cannot make happen on demand: KV cache
memory the engine cannot open, failures nobody expected, and a request
preempted while its blocks are still being dumped."""

from __future__ import annotations

import logging

import pytest
import torch

from connector_kit import connector, keys, meta, step, transfer, warnings_about
from ucm.store import NfsStore


# ---- KV cache memory the engine cannot open (finding 2) ----------------------------


@pytest.mark.parametrize("kind,advice", [("expandable", "expandable_segments"), ("cumem", "--enable-sleep-mode")])
def test_unexportable_kv_cache_means_all_misses(tiny_model, config_file, cuda_emu, caplog, kind, advice):
    """expandable_segments:True (torch exports type 'e') and sleep mode's
    allocator (torch cannot export at all): one warning at registration,
    then every planned load is reported failed (vLLM recomputes), saves are
    dropped, finished requests are released, and nothing raises."""
    caplog.set_level(logging.INFO, logger="ucm")
    nb = 16
    conn = connector(tiny_model, config_file, num_blocks=nb)
    alloc = cuda_emu.alloc(2 * nb * 2 * 32 * 64 * 4, kind=kind)
    caches = {
        f"model.layers.{i}.self_attn.attn": cuda_emu.tensor(
            (nb, 2, 32, 64), torch.float32, alloc=alloc, offset=i * nb * 2 * 32 * 64 * 4
        )
        for i in range(2)
    }
    conn.register_kv_caches(caches)
    warned = warnings_about(caplog, "store is off on this worker")
    assert len(warned) == 1 and advice in warned[0].getMessage()
    ks = keys(3, "unexportable")
    for _ in range(2):
        (sending, recving), errors = step(
            conn, meta(loads=[transfer("r1", ks, [4, 5, 6])], saves=[transfer("r2", ks, [1, 2, 3])]), finished={"r2"}
        )
        assert errors == {4, 5, 6}
        assert sending == {"r2"}
    assert len(warnings_about(caplog, "store is off on this worker")) == 1
    assert not warnings_about(caplog, "could not be loaded")  # said once, not per request
    stats = conn.client.raw("stats")
    assert stats.get("blocksDumped", 0) == 0 and stats.get("blocksLoaded", 0) == 0
    conn.shutdown()


def test_unexpected_errors_never_reach_vllm(tiny_model, config_file, caplog):
    """Anything that is not an engine answer (a bug, a socket error) inside
    the worker hooks becomes a logged miss: loads reported failed, saves
    dropped, requests released, no exception out of any hook."""
    caplog.set_level(logging.INFO, logger="ucm")
    nb = 8
    # A client that raises cannot cancel "d"'s dump when it is preempted, so
    # handle_preemptions waits for that dump's deadline: keep it short.
    conn = connector(tiny_model, config_file, num_blocks=nb, ucm_save_timeout_ms=1500)
    caches = {f"l{i}": torch.randn(nb, 2, 32, 64) for i in range(2)}
    conn.register_kv_caches(caches)
    ks = keys(4, "unexpected")
    # Saves that go through, so that later steps have engine tasks to check and settle.
    (sending, _), errors = step(conn, meta(saves=[transfer("a", ks[:2], [0, 1]), transfer("d", ks[2:], [6, 7])]))
    assert errors == set() and conn._dumps.get("a") and conn._dumps.get("d")

    def broken(*args, **kwargs):
        raise RuntimeError("socket exploded")

    conn.client.call = conn.client.send = broken
    # "a" finishes (its dump is checked), "d" is preempted (its dump settled),
    # a load and a save are planned: all with a client that raises.
    (sending, recving), errors = step(
        conn,
        meta(loads=[transfer("b", ks[:2], [2, 3])], saves=[transfer("c", ks[:2], [4, 5])], preempted=["d"]),
        finished={"a", "c"},
    )
    assert errors == {2, 3}
    assert sending == {"a", "c"}
    (sending, recving), errors = step(conn, meta(loads=[transfer("e", ks[:2], [2, 3])]), finished={"d"})
    assert errors == {2, 3} and sending == {"d"}
    logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the first one with its traceback
    assert all("socket exploded" in r.getMessage() for r in logged)


# ---- preemption (finding 5) ---------------------------------------------------------


@pytest.mark.parametrize("wait_ms", [0, 20000])
def test_preempted_request_dumps_end_before_its_blocks_are_reused(tiny_model, config_file, caplog, wait_ms):
    """vLLM calls handle_preemptions before the forward pass that may write a
    preempted request's freed blocks. With no wait the dumps are cancelled,
    with a long one they finish; either way, once it returns, overwriting
    the KV cache (vLLM reusing the blocks) changes no stored block: every
    block stored holds the bytes it had when it was dumped."""
    caplog.set_level(logging.INFO, logger="ucm")
    nb, row = 96, 128 * 1024  # 96 blocks, 2 layers of 512 KiB each per block: 96 MiB queued at once
    conn = connector(tiny_model, config_file, num_blocks=nb, ucm_preempt_wait_ms=wait_ms)
    caches = {f"l{i}": torch.randint(-(2**31), 2**31 - 1, (nb, row), dtype=torch.int32) for i in range(2)}
    conn.register_kv_caches(caches)
    original = {k: v.clone() for k, v in caches.items()}
    ks = keys(nb, f"preempt{wait_ms}")
    step(conn, meta(saves=[transfer("victim", ks, range(nb))]))
    assert conn._dumps.get("victim")  # submitted, running in the engine
    pending = conn._dumps["victim"][0]
    conn.handle_preemptions(meta(preempted=["victim"]))
    task = pending.task  # the engine's answer to the dump, taken while the preemption settled it
    assert task is not None
    for v in caches.values():  # another request's forward pass writes the freed blocks
        v.fill_(-1)
    assert "victim" not in conn._dumps
    r = conn.client.call("wait", task=task, timeout_ms=30000, deadline_ms=40000)
    assert r["done"]
    status = r["status"]
    if wait_ms:
        assert status == ["ok"] * nb
    assert set(status) <= {"ok", "cancelled"}
    stored = [k for k, s in zip(ks, status) if s == "ok"]
    if stored:
        with NfsStore(config_file, namespace=conn.namespace) as store:
            assert all(store.lookup(stored))
            dst = [torch.zeros(len(stored), row, dtype=torch.int32) for _ in range(2)]
            K, O, T = [], [], []
            for j, k in enumerate(stored):
                for layer in range(2):
                    K.append(k)
                    O.append(layer * row * 4)
                    T.append(dst[layer][j])
            assert store.wait(store.load(K, O, T)) == 0
            idx = [ks.index(k) for k in stored]
            for layer in range(2):
                assert torch.equal(dst[layer], original[f"l{layer}"][idx]), (
                    "a stored block holds bytes written after the preemption"
                )
    assert any("was preempted" in rec.getMessage() for rec in caplog.records)
    # The request is released as soon as it finishes: nothing of it is pending.
    (sending, _), _ = step(conn, meta(), finished={"victim"})
    assert sending == {"victim"}
    conn.shutdown()


def test_scheduler_tells_workers_which_requests_were_preempted(tiny_model, config_file):
    from vllm.v1.core.sched.output import SchedulerOutput

    conn = connector(tiny_model, config_file, role="SCHEDULER")
    out = SchedulerOutput.make_empty()
    out.preempted_req_ids = {"x", "y"}
    m = conn.build_connector_meta(out)
    assert sorted(m.preempted) == ["x", "y"]
    assert conn.build_connector_meta(SchedulerOutput.make_empty()).preempted == []
    conn.shutdown()
