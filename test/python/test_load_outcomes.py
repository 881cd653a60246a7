"""What the connector plans around a load from the store, on vLLM's real
scheduler (sched_kit.py) and a real engine: nothing computed on top of a
load is saved before every worker reported that load good, blocks vLLM held
in its own prefix cache are not saved again, and after a load that failed
the blocks vLLM recomputes are saved instead (issue 24, item 1)."""

from __future__ import annotations

import pytest

import sched_kit as sk
from ucm.integration.vllm.common import UCMWorkerMetadata

BLOCK = 32


def saved_blocks(req, plan):
    return sorted(i for t in plan["saves"] if t.req_id == req.request_id for i in sk.block_index(req, t.keys))


def cached_prefix(sched, tokens):
    """Runs a request of `tokens` to its end, so that its full blocks stay in vLLM's prefix cache."""
    r = sk.request(tokens, BLOCK, max_tokens=1)
    sched.add_request(r)
    for _ in range(4):
        if not sched.has_requests():
            return r
        out = sk.schedule(sched)
        # The workers report a finished request's blocks free once its dumps end (none run here).
        sched.update_from_output(out, sk.output(out, finished_sending=set(sk.planned(out)["finished"]) or None))
    raise AssertionError("the request did not finish")


@pytest.fixture
def world(tiny_model, config_file):
    """Blocks 0-3 of a prompt in vLLM's prefix cache, blocks 4-6 in the store, 7-9 in neither."""

    def make(tp=1):
        sched = sk.scheduler(sk.vllm_config(tiny_model, config_file, BLOCK, tp=tp))
        conn = sched.connector
        tokens = sk.prompt(10 * BLOCK + 5, seed=tp)
        cached_prefix(sched, tokens[: 4 * BLOCK + 1])
        req = sk.request(tokens, BLOCK)
        keys = [bytes(h) for h in req.block_hashes]
        sk.store_blocks(config_file, conn.connector_scheduler.namespaces, keys[4:7])
        sched.add_request(req)
        return sched, req

    yield make


def test_nothing_computed_on_a_load_is_saved_in_its_step(world):
    sched, req = world()
    out = sk.schedule(sched)
    plan = sk.planned(out)
    assert [sk.block_index(req, t.keys) for t in plan["loads"]] == [[4, 5, 6]]
    # The blocks vLLM had (0-3) are not dumped again; 7-9, computed on the
    # loaded blocks in this very step, wait for the load's outcome.
    assert saved_blocks(req, plan) == []
    load_id = plan["loads"][0].load_id
    sched.update_from_output(out, sk.output(out, worker_meta=UCMWorkerMetadata({load_id: (1, 3)})))
    out = sched.schedule()
    assert saved_blocks(req, sk.planned(out)) == [7, 8, 9]


def test_after_a_failed_load_the_recomputed_blocks_are_saved(world):
    sched, req = world()
    out = sk.schedule(sched)
    load = sk.planned(out)["loads"][0]
    # Block 5 (the second loaded) failed: vLLM recomputes from it.
    failed_id = load.block_ids[1]
    sched.update_from_output(
        out, sk.output(out, invalid={failed_id}, worker_meta=UCMWorkerMetadata({load.load_id: (1, 1)}))
    )
    assert req.num_computed_tokens == 5 * BLOCK  # vLLM's own rollback
    saves = []
    for _ in range(3):
        out = sched.schedule()
        saves += saved_blocks(req, sk.planned(out))
        sched.update_from_output(out, sk.output(out))
    # Only what vLLM computed after the rollback: blocks 5-9 (4 loaded fine).
    assert saves == [5, 6, 7, 8, 9]


def test_with_two_ranks_saves_wait_for_both_reports(world):
    sched, req = world(tp=2)
    out = sk.schedule(sched)
    load = sk.planned(out)["loads"][0]
    # Rank 0 loaded everything; rank 1 has not reported yet (an asynchronous worker, or a report still on its way).
    sched.update_from_output(out, sk.output(out, worker_meta=UCMWorkerMetadata({load.load_id: (1, 3)})))
    out = sched.schedule()
    assert saved_blocks(req, sk.planned(out)) == []
    # Rank 1 failed at the first block: with the all-reduce every rank's KV from block 4 on is wrong.
    sched.update_from_output(
        out,
        sk.output(out, invalid={load.block_ids[0]}, worker_meta=UCMWorkerMetadata({load.load_id: (1, 0)})),
    )
    saves = []
    for _ in range(3):
        out = sched.schedule()
        saves += saved_blocks(req, sk.planned(out))
        sched.update_from_output(out, sk.output(out))
    assert saves == [4, 5, 6, 7, 8, 9]


def test_request_finishing_before_its_outcome_keeps_its_blocks_until_then(world):
    """A request aborted while its load's outcome is on its way: vLLM keeps
    its blocks (the workers may still read them for saves), and once the
    outcome comes the workers are told to hand them back."""
    sched, req = world()
    out = sk.schedule(sched)
    load = sk.planned(out)["loads"][0]
    from vllm.v1.request import RequestStatus

    sched.finish_requests(req.request_id, RequestStatus.FINISHED_ABORTED)
    assert req.request_id in sched.requests  # held for the connector
    sched.update_from_output(out, sk.output(out, worker_meta=UCMWorkerMetadata({load.load_id: (1, 3)})))
    out = sched.schedule()
    assert sk.planned(out)["finished"] == [req.request_id]
    sched.update_from_output(out, sk.output(out, finished_sending={req.request_id}))
    assert req.request_id not in sched.requests


def test_worker_reports_merge_across_ranks():
    a = UCMWorkerMetadata({1: (1, 3), 2: (1, 0)})
    b = UCMWorkerMetadata({1: (1, 1), 3: (1, 2)})
    assert a.aggregate(b).loads == {1: (2, 1), 2: (1, 0), 3: (1, 2)}
