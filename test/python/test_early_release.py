"""A finished request's KV blocks go back to vLLM once its dump has copied
them into the engine's staging, not once the writes end (issue 26, item 4):
the engine's `check` says `released` when no block of a dump reads the
client's memory any more, the worker reports the request's sending finished
then, and the scheduler half tells vLLM to wait for such frees instead of
preempting (`has_pending_block_frees`). The writes go on into a slow disk
(an ext4 whose writes the blkio controller throttles for the engine); what
is stored must be the bytes copied at the time, whatever vLLM writes into
those blocks after it got them back. Real engine, real files, real vLLM
config."""

from __future__ import annotations

import os
import secrets
import time

import torch

from conftest import private_sock, stop_engine, write_config
from slow_disk import SlowDisk, needs_slow_disk

NB = 8  # KV blocks per layer; 2 layers of 256 KiB a block


@needs_slow_disk
def test_blocks_come_back_while_writes_go_on_and_the_stored_bytes_are_the_ones_copied(tiny_model, tmp_path):
    from connector_kit import connector, keys, meta, step, transfer

    disk = SlowDisk(64)
    sock = private_sock(f"early-{secrets.token_hex(4)}")
    conn = None
    try:
        store = os.path.join(disk.mnt, "store")
        os.mkdir(store, 0o700)
        cfg = write_config(tmp_path / "early.yaml", store, endpoint=f"ipc://{sock}", transferStreamNumber=2)
        conn = connector(tiny_model, cfg, num_blocks=NB)
        caches = {f"l{i}": torch.randint(1, 1 << 30, (NB, 64 * 1024), dtype=torch.int32) for i in range(2)}
        conn.register_kv_caches(caches)
        # A first save makes the namespace's directories (unthrottled).
        (sending, _), _ = step(conn, meta(saves=[transfer("warm", keys(1, "early-warm"), [7])]), finished={"warm"})
        for _ in range(200):
            if "warm" in (sending or set()):
                break
            time.sleep(0.05)
            (sending, _), _ = step(conn, meta())
        else:
            raise AssertionError("the warm-up save never finished")
        engine = conn.client.raw("health")["pid"]
        disk.admit(engine)
        disk.throttle(write_bps=512 * 1024)  # 4 blocks of 512 KiB: about 4 s of writes

        ks = keys(4, "early")
        copied = {name: t[0:4].clone() for name, t in caches.items()}
        t0 = time.monotonic()
        (sending, _), _ = step(conn, meta(saves=[transfer("r", ks, [0, 1, 2, 3])]), finished={"r"})
        while not sending or "r" not in sending:
            assert time.monotonic() - t0 < 20, "the request's blocks never came back"
            time.sleep(0.02)
            (sending, _), _ = step(conn, meta())
        back_after = time.monotonic() - t0
        in_flight = conn.client.raw("stats")["tasksInFlight"]
        # vLLM has the blocks back and writes other KV into them at once.
        for t in caches.values():
            t[0:4].fill_(-7)
        assert in_flight >= 1, f"the dump was over when the blocks came back ({back_after:.2f} s): nothing to show"
        assert back_after < 2.0, f"the blocks came back after {back_after:.2f} s, not once copied"

        # The writes end later; what they stored is what was copied, byte for byte.
        while conn.client.raw("stats")["tasksInFlight"]:
            assert time.monotonic() - t0 < 60, "the writes never ended"
            time.sleep(0.1)
        writes_took = time.monotonic() - t0
        assert writes_took > back_after + 1.0, (back_after, writes_took)
        for _ in range(50):  # the trailing dump's outcome is counted in a later step
            step(conn, meta())
            if conn._stats["saved_blocks"] >= 5:
                break
            time.sleep(0.05)
        assert conn._stats["saved_blocks"] == 5, conn._stats  # the warm-up block and these 4
        for t in caches.values():
            t[4:8].zero_()
        _, errors = step(conn, meta(loads=[transfer("l", ks, [4, 5, 6, 7])]))
        assert errors == set()
        for name, t in caches.items():
            assert torch.equal(t[4:8], copied[name]), f"{name}: the stored blocks are not the bytes copied"
    finally:
        if conn is not None:
            conn.shutdown()
        stop_engine(f"ipc://{sock}")
        disk.close()


def test_the_scheduler_asks_vllm_to_wait_for_held_blocks_and_never_for_good(tiny_model, tmp_path, storage):
    """has_pending_block_frees is True while a finished request's blocks are
    held for its dump and False once the workers reported it; a hold whose
    report never comes stops counting after the dump's deadline with grace."""
    from sched_kit import output, prompt, request, schedule, scheduler, vllm_config

    sock = private_sock(f"held-{secrets.token_hex(4)}")
    cfg = write_config(tmp_path / "held.yaml", storage, endpoint=f"ipc://{sock}")
    try:
        sched = scheduler(vllm_config(tiny_model, cfg, prefix_caching=False, ucm_save_timeout_ms=1000), num_blocks=64)
        conn = sched.connector
        assert conn.has_pending_block_frees() is False
        r = request(prompt(32 * 3, seed=5), 32, max_tokens=1)
        sched.add_request(r)
        t0 = time.monotonic()
        while r.request_id not in conn.connector_scheduler._held and time.monotonic() - t0 < 20:
            out = schedule(sched)
            sched.update_from_output(out, output(out))
        assert conn.has_pending_block_frees() is True
        # The workers report the request's sending over: no longer held.
        out = sched.schedule()
        sched.update_from_output(out, output(out, finished_sending={r.request_id}))
        assert conn.has_pending_block_frees() is False
        # A hold nobody reports: counted for save_timeout (1 s) + grace, then not.
        conn.connector_scheduler._held["ghost"] = time.monotonic() - 1.0 - 5.0 - 0.1
        assert conn.has_pending_block_frees() is False
    finally:
        stop_engine(f"ipc://{sock}")
