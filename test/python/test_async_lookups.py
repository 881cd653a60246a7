"""Lookups off the scheduler's step (issue 30), on vLLM's real scheduler
(sched_kit.py) or the connector driven as vLLM drives it (connector_kit.py),
and a real engine: a new request is answered from a reply that arrived (a
step later), never by waiting for the engine; the asks of one step go as one
lookup and each request gets its own part of the reply; a reply that comes
after its request was aborted, rescheduled or the cache epoch changed is
never applied; an engine that does not answer makes a miss within the
client timeout while running requests go on."""

from __future__ import annotations

import os
import signal
import time

import pytest

import sched_kit as sk
from ucm.integration.vllm.common import UCMWorkerMetadata
from conftest import engine_pid, private_sock, stop_engine, write_config
from connector_kit import connector, empty_step, matched

BLOCK = 32


@pytest.fixture
def slow_config(tmp_path, storage):
    """A config whose client timeout is `ms`, with an engine of its own."""
    made = []

    def make(ms):
        sock = private_sock(f"al-{tmp_path.name[-10:]}")
        made.append(f"ipc://{sock}")
        return write_config(tmp_path / "slow.yaml", storage, endpoint=f"ipc://{sock}", clientTimeoutMs=ms)

    yield make
    for endpoint in made:
        stop_engine(endpoint)


class Paused:
    """The engine stopped (SIGSTOP) for the with-block, continued after it whatever happens."""

    def __init__(self, endpoint):
        self.pid = engine_pid(endpoint)
        assert self.pid is not None

    def __enter__(self):
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGCONT)


def until(cond, within_s=30.0, what="condition"):
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {within_s} s"
        time.sleep(0.005)


def ask_of(conn, req_id):
    return conn.connector_scheduler._lookups._asks.get(req_id)


def world(tiny_model, config_file, running=True):
    """vLLM's scheduler with the connector, its engine's session open, and a
    request decoding (running) when `running`."""
    sched = sk.scheduler(sk.vllm_config(tiny_model, config_file, BLOCK))
    first = sk.request(sk.prompt(2 * BLOCK + 3, seed=1), BLOCK, max_tokens=3000 if running else 1)
    sched.add_request(first)
    out = sk.schedule(sched)  # its lookup is answered: the link's session with the engine is open
    assert first.request_id in out.num_scheduled_tokens
    sched.update_from_output(out, sk.output(out))
    return sched, first


def test_a_new_request_is_answered_a_step_later_without_holding_the_running_one(tiny_model, config_file):
    sched, first = world(tiny_model, config_file)
    conn = sched.connector
    req = sk.request(sk.prompt(6 * BLOCK + 5, seed=2), BLOCK)
    sk.store_blocks(config_file, conn.connector_scheduler.namespaces, [bytes(h) for h in req.block_hashes[:4]])
    sched.add_request(req)
    out = sched.schedule()
    # The running request gets its token; the new one waits for its lookup reply.
    assert list(out.num_scheduled_tokens) == [first.request_id]
    assert req in sched.waiting and sk.planned(out)["loads"] == []
    sched.update_from_output(out, sk.output(out))
    ask = ask_of(conn, req.request_id)
    until(lambda: ask.found is not None, what="the lookup reply")
    # The next step is answered from the reply that arrived: the load is planned there.
    out = sched.schedule()
    assert req.request_id in out.num_scheduled_tokens
    assert [sk.block_index(req, t.keys) for t in sk.planned(out)["loads"]] == [[0, 1, 2, 3]]
    assert ask_of(conn, req.request_id) is None  # scheduled: its lookup is over


def test_while_nothing_runs_a_new_request_is_answered_without_spinning(tiny_model, config_file):
    # vLLM's engine core steps again at once when a step ran nothing; that
    # loop held the GIL, and the lookup thread got it only at Python's
    # switch interval (5 ms) to send and again to post: dozens of empty
    # steps and about 6 ms of TTFT for a request arriving at an idle server.
    sched, _ = world(tiny_model, config_file, running=False)
    conn = sched.connector
    counts = []
    for seed in range(3, 8):
        req = sk.request(sk.prompt(6 * BLOCK + 5, seed=seed), BLOCK, max_tokens=1)
        sk.store_blocks(config_file, conn.connector_scheduler.namespaces, [bytes(h) for h in req.block_hashes[:4]])
        sched.add_request(req)
        steps = 0
        while True:  # as the engine core: no pause between steps
            out = sched.schedule()
            steps += 1
            if req.request_id in out.num_scheduled_tokens or steps > 1000:
                break
            sched.update_from_output(out, sk.output(out))
        # Nothing runs: the first ask waits (up to 5 ms) for its reply, and
        # so does an empty step; the request is scheduled at once, or a step later.
        assert steps <= 3, f"{steps} steps before the request was scheduled"
        counts.append(steps)
        loads = sk.planned(out)["loads"]
        assert [sk.block_index(req, t.keys) for t in loads] == [[0, 1, 2, 3]]
        # The worker reports the load done; the request finishes.
        sched.update_from_output(out, sk.output(out, worker_meta=UCMWorkerMetadata({loads[0].load_id: (1, 4)})))
        out = sk.schedule(sched)
        sched.update_from_output(out, sk.output(out, finished_sending=set(sk.planned(out)["finished"]) or None))
        assert not conn.connector_scheduler._reqs  # nothing unfinished: the next ask may wait
    assert min(counts) == 1, counts  # answered within the step that first asked


def test_asks_of_one_step_go_as_one_lookup_and_each_request_gets_its_own_part(tiny_model, config_file):
    sched, first = world(tiny_model, config_file)  # one request runs: asks are answered a step later
    conn = sched.connector
    pump = conn.connector_scheduler._lookups.pump
    reqs = [sk.request(sk.prompt(5 * BLOCK + 1, seed=10 + i), BLOCK) for i in range(5)]
    for i, r in enumerate(reqs):  # request i has its first i blocks stored
        sk.store_blocks(config_file, conn.connector_scheduler.namespaces, [bytes(h) for h in r.block_hashes[:i]])
        sched.add_request(r)
    sent = pump.sent
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == [first.request_id]  # every new one skipped: none known yet
    until(lambda: all(ask_of(conn, r.request_id).found is not None for r in reqs), what="the replies")
    assert pump.sent == sent + 1
    sched.update_from_output(out, sk.output(out))
    out = sk.schedule(sched)
    loads = {
        t.req_id: sk.block_index(next(r for r in reqs if r.request_id == t.req_id), t.keys)
        for t in sk.planned(out)["loads"]
    }
    assert loads == {r.request_id: list(range(i)) for i, r in enumerate(reqs) if i > 0}


def test_a_reply_after_the_request_was_aborted_is_dropped(tiny_model, config_file):
    sched, _ = world(tiny_model, config_file, running=False)
    conn = sched.connector
    req = sk.request(sk.prompt(4 * BLOCK + 1, seed=3), BLOCK)
    sk.store_blocks(config_file, conn.connector_scheduler.namespaces, [bytes(h) for h in req.block_hashes])
    from vllm.v1.request import RequestStatus

    with Paused(conn.config.endpoint):
        sched.add_request(req)
        out = sched.schedule()  # asked; its lookup goes to an engine that does not answer yet
        assert out.total_num_scheduled_tokens == 0
        ask = ask_of(conn, req.request_id)
        until(lambda: conn.connector_scheduler._lookups.pump.sent > 1, what="the lookup sent")
        sched.finish_requests(req.request_id, RequestStatus.FINISHED_ABORTED)
        assert ask_of(conn, req.request_id) is None
    until(lambda: ask.found is not None, what="the late reply")
    assert ask.found == bytes([1] * 4) and not ask.error  # the reply came, with the hits...
    assert req.request_id not in sched.requests  # ...and changed nothing
    assert req.request_id not in conn.connector_scheduler._reqs
    # A new request under the same id, whose blocks are not stored, gets its own answer.
    again = sk.request(sk.prompt(4 * BLOCK + 1, seed=4), BLOCK)
    again.request_id = req.request_id
    sched.add_request(again)
    out = sk.schedule(sched)
    assert again.request_id in out.num_scheduled_tokens and sk.planned(out)["loads"] == []
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0


def test_an_engine_that_does_not_answer_makes_a_miss_within_the_timeout(tiny_model, slow_config):
    timeout_s = 1.5
    cfg = slow_config(int(timeout_s * 1000))
    sched, first = world(tiny_model, cfg)
    conn = sched.connector
    req = sk.request(sk.prompt(4 * BLOCK + 1, seed=5), BLOCK)
    sk.store_blocks(cfg, conn.connector_scheduler.namespaces, [bytes(h) for h in req.block_hashes])
    slowest, ask = 0.0, None
    with Paused(conn.config.endpoint):
        sched.add_request(req)
        t0 = time.monotonic()
        while req in sched.waiting:
            assert time.monotonic() - t0 < timeout_s + 30, "still waiting long after the client timeout"
            s0 = time.monotonic()
            out = sched.schedule()
            slowest = max(slowest, time.monotonic() - s0)
            ask = ask or ask_of(conn, req.request_id)
            # The running request is served every step meanwhile.
            assert first.request_id in out.num_scheduled_tokens
            sched.update_from_output(out, sk.output(out))
            time.sleep(0.01)
        waited = time.monotonic() - t0
    # Scheduled as a miss (nothing loaded) once the timeout passed, not before.
    assert waited >= timeout_s
    assert sk.planned(out)["loads"] == [] and req.request_id in out.num_scheduled_tokens
    # No step waited for the engine (a synchronous lookup would have taken the whole timeout).
    assert slowest < timeout_s / 2, slowest
    assert ask.error  # answered by the expiry, not by a reply


def test_a_rescheduled_request_and_a_new_cache_epoch_look_up_anew(tiny_model, config_file):
    conn = connector(tiny_model, config_file, role="SCHEDULER")
    req = sk.request(sk.prompt(4 * BLOCK + 1, seed=6), BLOCK)
    sk.store_blocks(config_file, conn.connector_scheduler.namespaces, [bytes(h) for h in req.block_hashes])
    assert matched(conn, req, 0)[0] == (4 * BLOCK, False)
    # Scheduled, then preempted and asked again from the start: a new lookup, not the old reply.
    conn.update_state_after_alloc(req, _Blocks(list(range(1, 6))), 4 * BLOCK)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    assert matched(conn, req, 0)[0] == (4 * BLOCK, False)
    # A reply of the old epoch, answered or still on its way, is never used after reset_cache.
    other = sk.request(sk.prompt(4 * BLOCK + 1, seed=7), BLOCK)
    sk.store_blocks(config_file, conn.connector_scheduler.namespaces, [bytes(h) for h in other.block_hashes])
    assert conn.get_num_new_matched_tokens(other, 0) == (None, False)
    conn.build_connector_meta(empty_step())
    until(lambda: ask_of(conn, other.request_id).found is not None, what="the reply")
    assert conn.reset_cache()
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    assert matched(conn, req, 0)[0] == (0, False)
    assert matched(conn, other, 0)[0] == (0, False)
    conn.shutdown()


def test_an_old_answer_is_refreshed_without_holding_the_request(tiny_model, config_file):
    from ucm.integration.vllm import lookups

    conn = connector(tiny_model, config_file, role="SCHEDULER")
    req = sk.request(sk.prompt(4 * BLOCK + 1, seed=8), BLOCK)
    assert matched(conn, req, 0)[0] == (0, False)
    sk.store_blocks(config_file, conn.connector_scheduler.namespaces, [bytes(h) for h in req.block_hashes])
    time.sleep(lookups.REFRESH_S + 0.1)
    answers = []
    deadline = time.monotonic() + 30
    while not answers or answers[-1] != (4 * BLOCK, False):
        assert time.monotonic() < deadline, answers
        answers.append(conn.get_num_new_matched_tokens(req, 0))
        conn.build_connector_meta(empty_step())
        time.sleep(0.005)
    # Every ask was answered: the old answer until the fresh one came.
    assert set(answers) <= {(0, False), (4 * BLOCK, False)}, answers
    conn.shutdown()


class _Blocks:
    """What update_state_after_alloc reads of vLLM's KVCacheBlocks."""

    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def test_a_reply_as_bytes_or_as_booleans_is_taken_and_anything_else_is_a_miss():
    """The pump asks for `bits` (a byte a key); an engine from before that
    answers booleans, taken the same way. A reply of the wrong length, or
    with any other value, says nothing: its asks become misses."""
    from ucm.integration.vllm.lookups import _found_bits

    assert _found_bits(b"\x01\x01\x00", 3) == b"\x01\x01\x00"
    assert _found_bits([True, True, False], 3) == b"\x01\x01\x00"
    assert _found_bits(b"", 0) == b""
    for bad in (b"\x01\x00", b"\x01\x02\x00", [True, False], [True, None, False], "110", None, {"found": 1}):
        assert _found_bits(bad, 3) is None, bad
