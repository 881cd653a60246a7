"""What docs/vllm.md promises of the connector ("What the connector does"),
each against a real engine: a block that fails to load and every later block
of the request are reported through get_block_ids_with_load_errors while the
earlier ones load exact; a save the engine sheds leaves the block unstored,
is counted and releases the request; the hit never includes the block that
holds the last prompt token, also when the prompt fills its last block."""

from __future__ import annotations

import os
import time

import torch

from conftest import private_sock, stop_engine, write_config
from connector_kit import connector, keys, matched, meta, outcomes_counted, step, transfer
from ucm.store import NfsStore

BLOCK = 32


def caches(nb):
    """CPU KV caches of two layers, [blocks, 2, 32, 64] like vLLM's."""
    return {f"l{i}": torch.randn(nb, 2, BLOCK, 64) for i in range(2)}


def saved(conn, req, within_s=60.0):
    """Steps the worker until vLLM would be told `req`'s saves are over (its blocks released)."""
    finished = {req}
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        (sending, _), _ = step(conn, meta(), finished=finished)
        finished = set()
        if sending and req in sending:
            outcomes_counted(conn)  # the writes may end after the blocks went back
            return
        time.sleep(0.05)
    raise AssertionError(f"request {req} was not released within {within_s} s")


def block_file(storage, ns, key):
    h = key.hex()
    return os.path.join(storage, ns, h[:2], h)


def test_a_corrupt_block_fails_with_every_later_one_and_earlier_ones_load_exact(tiny_model, config_file, storage):
    nb = 8
    conn = connector(tiny_model, config_file, num_blocks=nb)
    kv = caches(nb)
    conn.register_kv_caches(kv)
    original = {k: v.clone() for k, v in kv.items()}
    ks = keys(4, "corrupt2of4")
    step(conn, meta(saves=[transfer("w", ks, [1, 2, 3, 4])]))
    saved(conn, "w")
    with NfsStore(config_file, namespace=conn.namespace) as store:
        assert store.lookup(ks) == [True] * 4
    # The request's second block is damaged on disk (one payload byte).
    with open(block_file(storage, conn.namespace, ks[1]), "r+b") as f:
        f.seek(4096 + 100)
        b = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    for v in kv.values():
        v[1:5].zero_()
    _, errors = step(conn, meta(loads=[transfer("r", ks, [1, 2, 3, 4])]))
    assert errors == {2, 3, 4}
    for name, v in kv.items():
        assert torch.equal(v[1], original[name][1])  # before the failure: loaded exact
        assert torch.count_nonzero(v[2]) == 0  # the corrupt block never reached memory
    stats = conn.get_kv_connector_stats().data
    assert (stats["loaded_blocks"], stats["load_failed_blocks"]) == (1, 3), stats
    conn.shutdown()


def test_a_save_the_engine_sheds_leaves_the_block_unstored_is_counted_and_releases_the_request(
    tiny_model, tmp_path, storage
):
    sock = private_sock(f"shed-{tmp_path.name[-12:]}")
    # Second-sight admission sheds the first dump of every block, deterministically.
    cfg = write_config(tmp_path / "shed.yaml", storage, endpoint=f"ipc://{sock}", admitOnSecondSight=True)
    try:
        nb = 8
        conn = connector(tiny_model, cfg, num_blocks=nb)
        conn.register_kv_caches(caches(nb))
        ks = keys(2, "shed")
        step(conn, meta(saves=[transfer("d", ks, [1, 2])]))
        saved(conn, "d")
        with NfsStore(cfg, namespace=conn.namespace) as store:
            assert store.lookup(ks) == [False, False]
        stats = conn.get_kv_connector_stats().data
        assert (stats["save_dropped_blocks"], stats["saved_blocks"], stats["save_failed_blocks"]) == (2, 0, 0), stats
        # Dumped again (a later request with the same prefix), the blocks are stored.
        step(conn, meta(saves=[transfer("e", ks, [1, 2])]))
        saved(conn, "e")
        with NfsStore(cfg, namespace=conn.namespace) as store:
            assert store.lookup(ks) == [True, True]
        conn.shutdown()
    finally:
        stop_engine(f"ipc://{sock}")


def request(token_ids):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256_cbor)
    return Request(
        f"req-{len(token_ids)}",
        token_ids,
        SamplingParams(max_tokens=4),
        None,
        block_hasher=get_request_block_hasher(BLOCK, sha256_cbor),
    )


def test_the_hit_never_holds_the_last_prompt_token_even_when_the_prompt_fills_its_blocks(tiny_model, config_file):
    sched = connector(tiny_model, config_file, role="SCHEDULER")
    exact = request(list(range(100, 100 + 4 * BLOCK)))  # 128 tokens: exactly 4 blocks
    longer = request(list(range(100, 100 + 4 * BLOCK + 1)))  # one token more: a fifth, partial block
    assert len(exact.block_hashes) == 4 and len(longer.block_hashes) == 4
    # Every full block of both prompts is stored, in every namespace the scheduler asks.
    stored = [bytes(h) for h in exact.block_hashes]
    assert stored == [bytes(h) for h in longer.block_hashes]
    src = torch.randn(4, 1024)
    for ns in sched.connector_scheduler.namespaces:
        with NfsStore(config_file, namespace=ns) as store:
            assert store.wait(store.dump(stored, [0] * 4, list(src))) == 0
            assert store.commit(stored) == [True] * 4
    # vLLM must compute at least the last prompt token: with 128 tokens, 3 blocks (96) come from the store.
    assert matched(sched, exact, 0)[0] == (3 * BLOCK, False)
    assert matched(sched, longer, 0)[0] == (4 * BLOCK, False)
    # Part of the prompt already computed: only the rest is claimed.
    assert matched(sched, exact, BLOCK)[0] == (2 * BLOCK, False)
    sched.shutdown()
