"""An engine that cannot start, and one that dies under a transfer (issue 29,
items 2 and 3; issue 26).

The engine's own reason for refusing to start (a storage directory that does
not exist, or that every user may write) reaches the caller in one line: in
NfsStore's exception, and in the vLLM connector's log, said once however
often it retries. A connector whose engine cannot start costs vLLM's steps
nothing: they never wait for an engine that is not there, and a directory
that appears later (an NFS mount coming up) is used without a restart. A
wait on a task whose engine was killed returns, failed, within a second of
the kill, not at the task's deadline. Real engines, sockets and files."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time

import pytest
import torch

import sched_kit as sk
from conftest import engine_pid, private_sock, stop_engine, write_config
from connector_kit import connector, empty_step, keys, meta, step, transfer
from procs import wait_gone
from ucm.launcher import EngineStartError
from ucm.store import NfsStore

BLOCK = 32


@pytest.fixture
def endpoint():
    ep = f"ipc://{private_sock(f'ef-{secrets.token_hex(4)}')}"
    yield ep
    stop_engine(ep)


def config(tmp_path, storage, endpoint, **extra):
    return write_config(tmp_path / "ucm.yaml", storage, endpoint=endpoint, clientTimeoutMs=2000, **extra)


# ---- the reason in the exception (item 2) ---------------------------------------------------


def test_a_storage_directory_that_does_not_exist_is_named_in_the_exception(tmp_path, endpoint):
    absent = tmp_path / "not-mounted" / "kv"
    cfg = config(tmp_path, absent, endpoint)
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert "\n" not in msg
    assert f'directory "{absent}" does not exist' in msg, msg
    assert raised.value.config_error
    assert "engine.log" in msg  # where to read more


def test_a_storage_directory_every_user_may_write_is_named_in_the_exception(tmp_path, endpoint):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    cfg = config(tmp_path, shared, endpoint)
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert "\n" not in msg
    assert f'directory "{shared}" is writable by every user (mode 1777); chmod o-w it' in msg, msg


def test_the_reason_comes_from_this_start_not_from_an_earlier_one_in_the_same_log(tmp_path, endpoint, monkeypatch):
    """UCM_ENGINE_LOG is appended to: what an earlier engine wrote there is
    never taken for this one's reason."""
    log = tmp_path / "engine.log"
    log.write_text("[UCMNFSSTORE] [E] config error: an earlier engine's reason\n")
    monkeypatch.setenv("UCM_ENGINE_LOG", str(log))
    absent = tmp_path / "absent"
    cfg = config(tmp_path, absent, endpoint)
    monkeypatch.setenv("UCM_ENGINE_CMD", "false")  # exits at once and says nothing
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert "wrote no reason" in msg and "earlier" not in msg, msg
    assert not raised.value.config_error
    monkeypatch.delenv("UCM_ENGINE_CMD")
    with pytest.raises(EngineStartError) as raised:
        NfsStore(cfg)
    msg = str(raised.value)
    assert f'directory "{absent}" does not exist' in msg and "earlier" not in msg, msg
    assert str(log) in msg


def test_an_engine_that_crashes_at_startup_gives_its_exception(tmp_path, storage, endpoint, monkeypatch):
    """Not a refusal of the engine's own but a crash (Node.js prints the
    stack): the exception's line is the reason."""
    crash = tmp_path / "crash.js"
    crash.write_text('console.log("starting");\nthrow new TypeError("the addon is missing a symbol");\n')
    monkeypatch.setenv("UCM_ENGINE_CMD", f"node {crash}")
    with pytest.raises(EngineStartError) as raised:
        NfsStore(config(tmp_path, storage, endpoint))
    assert "engine exited at startup: TypeError: the addon is missing a symbol (" in str(raised.value)


# ---- the connector with an engine that cannot start (item 2, issue 26) ----------------------


def reason_records(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_the_connector_says_why_once_and_no_step_waits_for_the_retries(tiny_model, tmp_path, endpoint, caplog):
    """The scheduler and a worker whose engine cannot start: the engine's
    reason logged once by each, at error level; steps over several retries
    answer every new request a miss at once and never wait for the engine
    (the client timeout is 2 s: a step that sent a hello would take it)."""
    caplog.set_level(logging.DEBUG, logger="ucm")
    absent = tmp_path / "not-mounted" / "kv"
    cfg = config(tmp_path, absent, endpoint)
    why = f'directory "{absent}" does not exist'
    sched = connector(tiny_model, cfg, role="SCHEDULER")
    nb = 8
    worker = connector(tiny_model, cfg, num_blocks=nb)
    try:
        worker.register_kv_caches({f"l{i}": torch.randn(nb, 2, 32, 64) for i in range(2)})
        said = reason_records(caplog, why)
        assert len(said) == 2 and all(r.levelno == logging.ERROR for r in said), [r.getMessage() for r in said]
        assert all("serving without the store" in r.getMessage() for r in said)
        ks = keys(2, "nostart")
        slowest, steps, t0 = 0.0, 0, time.monotonic()
        # The first retries come 2 s and 6 s after the start.
        while time.monotonic() - t0 < 7.5:
            req = sk.request(sk.prompt(4 * BLOCK + 1, seed=steps), BLOCK)
            s0 = time.monotonic()
            assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # a miss, never "ask again"
            sched.build_connector_meta(empty_step())
            (sending, _), errors = step(
                worker, meta(loads=[transfer("l", ks, [0, 1])], saves=[transfer("s", ks, [2, 3])]), finished={"s"}
            )
            slowest = max(slowest, time.monotonic() - s0)
            assert errors == {0, 1} and sending == {"s"}
            steps += 1
            time.sleep(0.02)
        retries = [r for r in caplog.records if "still no engine" in r.getMessage()]
        assert len(retries) >= 3, (
            "the two halves retry about four times in 7.5 s"
        )  # so 'once' is not for want of retries
        assert len(reason_records(caplog, why)) == 2
        assert slowest < 0.5, f"a step took {slowest:.2f} s"
        print(f"{steps} steps, slowest {slowest * 1000:.1f} ms, {len(retries)} retries")
    finally:
        sched.shutdown()
        worker.shutdown()


def test_a_storage_directory_that_appears_later_is_used_without_a_restart(tiny_model, tmp_path, endpoint, caplog):
    """The directory (an NFS mount coming up) appears after the connector
    was built: the retry off the step starts the engine, steps stay fast
    meanwhile, and lookups go to it from then on."""
    caplog.set_level(logging.INFO, logger="ucm")
    later = tmp_path / "mounted-later"
    cfg = config(tmp_path, later, endpoint)
    sched = connector(tiny_model, cfg, role="SCHEDULER")
    try:
        assert len(reason_records(caplog, "does not exist")) == 1
        later.mkdir()
        t0, slowest, answer = time.monotonic(), 0.0, (0, False)
        while answer == (0, False):
            assert time.monotonic() - t0 < 30, "the engine was not started once the directory appeared"
            req = sk.request(sk.prompt(4 * BLOCK + 1, seed=100), BLOCK)
            s0 = time.monotonic()
            answer = sched.get_num_new_matched_tokens(req, 0)  # None once the engine is up: asked, off the step
            sched.build_connector_meta(empty_step())
            slowest = max(slowest, time.monotonic() - s0)
            time.sleep(0.02)
        assert answer == (None, False)
        assert slowest < 0.5, f"a step took {slowest:.2f} s"
        assert engine_pid(endpoint) is not None
        assert len([r for r in caplog.records if "answers again" in r.getMessage()]) == 1
    finally:
        sched.shutdown()


# ---- a wait on a task of a dead engine (item 3) ---------------------------------------------


@pytest.mark.parametrize("memory,when", [("shared", "during"), ("private", "during"), ("shared", "before")])
def test_a_wait_on_a_load_returns_within_a_second_of_the_engine_being_killed(tmp_path, storage, endpoint, memory, when):
    """SIGKILL while a 512 MiB load runs (loadTimeoutMs 40 s), while wait()
    waits for it or before wait() is called: wait() reports it failed within
    a second of the kill (or of its call), not at the deadline. The memory is
    free then (the engine's process is gone); nothing but blocks' own bytes
    landed in it. The next call starts an engine again."""
    n, row = 128, 1 << 20  # 128 blocks of 4 MiB
    cfg = config(tmp_path, storage, endpoint, loadTimeoutMs=40000, transferStreamNumber=1)
    with NfsStore(cfg) as store:
        src = torch.randint(1, 1 << 30, (n, row), dtype=torch.int32)
        dst = torch.zeros_like(src)
        if memory == "shared":
            src.share_memory_()
            dst.share_memory_()
        ks = [f"kill-{memory}-{i}".encode() for i in range(n)]
        assert store.wait(store.dump(ks, [0] * n, list(src))) == 0
        assert store.commit(ks) == [True] * n
        pid = engine_pid(endpoint)
        task = store.load(ks, [0] * n, list(dst))
        killed: list[float] = []

        def kill():
            time.sleep(0.15)
            os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())

        killer = threading.Thread(target=kill)
        killer.start()
        if when == "before":
            killer.join()
            assert wait_gone(pid)
            time.sleep(0.2)
            killed[0] = time.monotonic()  # measured from the call
        failed = store.wait(task)
        returned = time.monotonic()
        killer.join()
        assert wait_gone(pid)
        assert failed > 0, "the load finished before the kill: make it larger"
        took = returned - killed[0]
        print(f"{memory}, {when}: wait() returned in {took * 1000:.0f} ms, {failed} of {n} blocks failed")
        assert took < 1.0, f"wait() returned {took:.1f} s after the engine was killed"
        # A block the engine was copying when it died holds part of its bytes; none holds any other.
        assert bool(((dst == src) | (dst == 0)).all()), "bytes that are no block's own landed"
        assert store.lookup(ks[:1]) == [True]  # a new engine, started by this call
