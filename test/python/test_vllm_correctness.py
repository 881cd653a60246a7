"""Never wrong KV, end to end on the real vLLM package (CPU backend): after a
load that failed, after a cache reset, and with blocks another layout
stored, the tokens vLLM generates with the store equal those without it
(issue 24). Each sequence runs in one vLLM process (vllm_steps_driver.py),
since the wrong KV of a failed load would only meet the requests that come
after it in that process."""

from __future__ import annotations

import glob
import json
import os
import random

import pytest

from conftest import private_sock, stop_engine, write_config
from test_vllm_e2e import BLOCK, drive

pytestmark = pytest.mark.timeout(900, method="signal")


def steps_run(model, cfg, steps, elog, tp=1):
    """One vLLM process running `steps` (cfg "none": without the connector)."""
    return drive(model, cfg, steps, elog, tp=tp, driver="vllm_steps_driver.py")


def p_and_q(seed):
    """A prompt P (6 blocks and a bit) and P+Q (Q: 3 more blocks and a bit)."""
    rng = random.Random(seed)
    p = [rng.randrange(16, 2500) for _ in range(6 * BLOCK + 9)]
    q = [rng.randrange(16, 2500) for _ in range(3 * BLOCK + 13)]
    return p, p + q


def failed_load_sequence(storage, p, pq, match):
    """generate(P) stores P; its block files are damaged (those of namespaces
    matching `match`); generate(P+Q) claims P, the load fails, vLLM
    recomputes (and with the fault, the step that loaded computed Q's
    blocks on garbage); generate(P) stores P again; generate(P+Q) then loads
    whatever the store holds for P and Q."""
    return [
        {"generate": [p]},
        {"flip": {"dir": str(storage), "match": match}},
        {"generate": [pq]},
        {"generate": [p]},
        {"stats": True},
        {"generate": [pq]},
        {"stats": True},
    ]


@pytest.mark.parametrize("tp", [1, 2])
def test_a_failed_load_never_lets_kv_computed_on_it_into_the_store(tiny_model, tmp_path, storage, tp):
    """Item 1: with TP=2 only rank 1's files are damaged, so only its load
    fails; rank 0's KV of Q is wrong all the same (the all-reduce), and must
    not be stored either."""
    sock = private_sock(f"poison{tp}")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    elog = tmp_path / "engine.log"
    p, pq = p_and_q(seed=40 + tp)
    try:
        res, log = steps_run(
            tiny_model, cfg, failed_load_sequence(storage, p, pq, "tp2r1" if tp == 2 else ""), elog, tp
        )
    finally:
        stop_engine(f"ipc://{sock}")
    first_p, flipped, pq_recomputed, _, before, pq_from_store, after = res
    assert flipped >= 6  # P's blocks (of rank 1 with TP=2) were there to damage
    assert "failed verification" in log
    # The last generate(P+Q) found blocks in the store: P's and, since the fix, Q's (stored after the recompute).
    assert after["blocksLoaded"] - before["blocksLoaded"] >= 9 * tp, (before, after)
    # Without the store (prefix caching off, nothing loaded): the reference.
    ref, _ = steps_run(tiny_model, "none", [{"generate": [pq]}], elog, tp)
    assert pq_recomputed == ref[0]
    assert pq_from_store == ref[0], "a load after the failed one served KV computed on the failed blocks"


def test_reset_cache_stops_serving_blocks_stored_before(tiny_model, tmp_path, storage):
    """Item 4: reset_prefix_cache(reset_connector=True), as after a weight
    update: nothing stored before is loaded again; blocks stored after it
    are, from the new cache epoch."""
    sock = private_sock("reset")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    elog = tmp_path / "engine.log"
    p, _ = p_and_q(seed=50)
    steps = [
        {"generate": [p]},
        {"stats": True},
        {"generate": [p]},
        {"stats": True},
        {"reset": True},
        {"generate": [p]},
        {"stats": True},
        {"generate": [p]},
        {"stats": True},
    ]
    try:
        res, _ = steps_run(tiny_model, cfg, steps, elog)
    finally:
        stop_engine(f"ipc://{sock}")
    t1, s1, t2, s2, reset, t3, s3, t4, s4 = res
    assert reset is True
    assert s2["blocksLoaded"] - s1["blocksLoaded"] == 6  # before the reset: hits
    assert s3["blocksLoaded"] == s2["blocksLoaded"]  # right after it: nothing stored before is loaded
    assert s4["blocksLoaded"] - s3["blocksLoaded"] == 6  # stored again in the new epoch, and found
    assert t1 == t2 == t3 == t4
    assert len([d for d in os.listdir(storage) if not d.startswith(".")]) == 2  # two epochs, two namespaces


def test_blocks_described_as_another_layout_are_never_loaded(tiny_model, tmp_path, storage):
    """Item 3: a namespace whose first user described another physical KV
    layout (as a node with another attention backend sharing the directory
    would) is refused: every block is computed, the tokens are vLLM's own."""
    sock = private_sock("layout")
    cfg = write_config(tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}")
    elog = tmp_path / "engine.log"
    p, _ = p_and_q(seed=60)
    try:
        first, _ = steps_run(tiny_model, cfg, [{"generate": [p]}, {"stats": True}], elog)
        stop_engine(f"ipc://{sock}")
        # The same namespace, described by another layout's first user: the
        # block files are the same size, their bytes mean something else.
        files = glob.glob(os.path.join(str(storage), "*", "NAMESPACE"))
        assert files
        for f in files:
            with open(f) as fh:
                d = json.load(fh)
            d["description"]["layout"] = d["description"]["layout"].replace("order", "order-HND-")
            with open(f, "w") as fh:
                json.dump(d, fh)
        second, log = steps_run(tiny_model, cfg, [{"generate": [p]}, {"stats": True}], elog)
    finally:
        stop_engine(f"ipc://{sock}")
    assert first[1]["blocksDumped"] >= 6
    assert second[1]["blocksLoaded"] == 0 and second[1]["blocksDumped"] == 0
    assert "store is off on this worker" in log and "conflict" in log
    ref, _ = steps_run(tiny_model, "none", [{"generate": [p]}], elog)
    assert second[0] == first[0] == ref[0]


@pytest.mark.parametrize("write_behind", [False, True], ids=["written-first", "written-behind"])
def test_the_cache_stage_serves_only_what_verified(tiny_model, tmp_path, storage, write_behind):
    """Issue 27's Cache stage (hostCacheBytes: the engine's host-memory tier).
    In one vLLM process: generate(P) stores P, committed into the tier;
    generate(P+Q) loads P from the tier; every block file is then damaged on
    disk, and generate(P+Q) loads P and Q from the tier, which holds the bytes
    that were committed (never a damaged file's). The tokens equal vLLM's
    without the store at every step, and no load failed. With write-behind
    (dumps answered once in the tier, their files written after), the same."""
    sock = private_sock("tier")
    cfg = write_config(
        tmp_path / "ucm.yaml", storage, endpoint=f"ipc://{sock}", hostCacheBytes="256MiB", writeBehind=write_behind
    )
    elog = tmp_path / "engine.log"
    p, pq = p_and_q(11)
    steps = [
        {"generate": [p]},
        {"stats": True},
        {"generate": [pq]},
        {"stats": True},
        {"flip": {"dir": str(storage), "match": ""}},
        {"generate": [pq]},
        {"stats": True},
    ]
    try:
        got, _ = steps_run(tiny_model, cfg, steps, elog)
    finally:
        stop_engine(f"ipc://{sock}")
    ref, _ = steps_run(tiny_model, "none", [{"generate": [p]}, {"generate": [pq]}, {"generate": [pq]}], elog)
    assert [got[0], got[2], got[5]] == ref
    s1, s2, s3 = got[1], got[3], got[6]
    assert s1["tier"]["blocks"] >= 6 and s1["blocksLoaded"] == 0, s1["tier"]
    assert s2["blocksLoaded"] >= 6 and s2["tier"]["hits"] >= 6, s2["tier"]
    assert got[4] >= 9  # P's and Q's block files, all damaged
    assert s3["tier"]["hits"] - s2["tier"]["hits"] >= 9, s3["tier"]
    assert s3["blocksCorrupt"] == 0 and s3["blocksLoaded"] - s2["blocksLoaded"] >= 9
    # Written behind (by the transfer streams, after the dump was answered) or before the answer.
    assert (s3["tier"]["written"] >= 9) if write_behind else (s3["tier"]["written"] == 0), s3["tier"]
