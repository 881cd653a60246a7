"""The connector built and driven as vLLM's model runner and scheduler do,
for the tests of test_connector*.py: a real VllmConfig (a tiny local model),
the engine of the test's config file, hooks called in vLLM's order."""

from __future__ import annotations

import hashlib
import logging
import time


def vllm_config(model, config_file, parallel=None, **extra):
    """A VllmConfig of the tiny model with the connector as the seed configures it; `extra` goes to
    kv_connector_extra_config, `parallel` to ParallelConfig."""
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig

    return VllmConfig(
        model_config=ModelConfig(model=model, dtype="float32", max_model_len=2048),
        cache_config=CacheConfig(block_size=32),
        parallel_config=ParallelConfig(**(parallel or {})),
        kv_transfer_config=KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1",
            kv_connector_module_path="ucm.integration.vllm.uc_connector",
            kv_role="kv_both",
            kv_connector_extra_config={"UCM_CONFIG_FILE": config_file, **extra},
        ),
    )


def connector(model, config_file, role="WORKER", num_blocks=64, **extra):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from ucm.integration.vllm.uc_connector import UnifiedCacheConnectorV1

    kcc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[])
    return UnifiedCacheConnectorV1(vllm_config(model, config_file, **extra), KVConnectorRole[role], kcc)


def keys(n, salt):
    return [hashlib.sha256(f"{salt}{i}".encode()).digest() for i in range(n)]


def meta(loads=(), saves=(), preempted=()):
    from ucm.integration.vllm.uc_connector import UCMConnectorMetadata

    return UCMConnectorMetadata(loads=list(loads), saves=list(saves), preempted=list(preempted))


def transfer(req, ks, block_ids):
    from ucm.integration.vllm.uc_connector import _Transfer

    return _Transfer(req, list(ks), list(block_ids))


def step(conn, m, finished=()):
    """One step of the worker as vLLM's model runner runs it. `finished`:
    requests that finished with their blocks held for the connector (the
    scheduler half names them in the metadata; vLLM's finished_req_ids)."""
    m.finished = sorted(set(m.finished) | set(finished))
    conn.handle_preemptions(m)
    conn.bind_connector_metadata(m)
    conn.start_load_kv(None)
    for name in ("l0", "l1"):
        conn.wait_for_layer_load(name)
        conn.save_kv_layer(name, None, None)
    conn.wait_for_save()
    out = conn.get_finished(set(finished))
    errors = conn.get_block_ids_with_load_errors()
    conn.clear_connector_metadata()
    return out, errors


def warnings_about(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def empty_step():
    """A SchedulerOutput of a step that scheduled nothing."""
    from vllm.v1.core.sched.output import SchedulerOutput

    return SchedulerOutput.make_empty()


def matched(conn, request, computed, within_s=30.0):
    """get_num_new_matched_tokens asked as vLLM's scheduler asks it: again in
    the next step (build_connector_meta ends each) while the answer is None,
    the lookup reply still on its way. Returns (answer, steps it took)."""
    deadline = time.monotonic() + within_s
    steps = 0
    while True:
        r = conn.get_num_new_matched_tokens(request, computed)
        if r[0] is not None or time.monotonic() > deadline:
            return r, steps
        conn.build_connector_meta(empty_step())
        steps += 1
        time.sleep(0.002)


def outcomes_counted(conn, within_s=30.0):
    """Steps the worker until every dump whose request's blocks already went
    back to vLLM (released once copied into the engine's staging, their writes
    going on) has its outcome counted in the connector's stats."""
    deadline = time.monotonic() + within_s
    while conn._trailing:
        assert time.monotonic() < deadline, "dump outcomes not counted in time"
        step(conn, meta())
        time.sleep(0.02)
