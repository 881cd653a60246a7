"""The connector under UCM's current name (issue 27): vLLM's own factory
builds it from `"kv_connector": "UCMConnector"` and
`"kv_connector_module_path": "ucm.integration.vllm.ucm_connector"`, with
UCM's current config file (UcmPipelineStore, store_pipeline "Cache|Posix"),
and blocks it saves load back exact, as with UnifiedCacheConnectorV1."""

from __future__ import annotations

import torch
import yaml

from conftest import private_sock, stop_engine
from connector_kit import empty_step, keys, meta, step, transfer
from test_connector_promises import BLOCK, caches, saved


def ucm_config(tmp_path, storage):
    """UCM's config as its docs write it today, with this test's socket."""
    sock = private_sock(tmp_path.name[-12:])
    doc = {
        "ucm_connectors": [
            {
                "ucm_connector_name": "UcmPipelineStore",
                "ucm_connector_config": {
                    "store_pipeline": "Cache|Posix",
                    "storage_backends": str(storage),
                    "io_direct": False,
                    "timeout_ms": 20000,
                    "store_health": {"enabled": True},
                    "use_gdr": False,
                    "endpoint": f"ipc://{sock}",
                    "transferStreamNumber": 4,
                    "clientTimeoutMs": 3000,
                },
            }
        ],
        "enable_event_sync": True,
        "use_layerwise": True,
        "enable_record_traces": False,
        "use_lite": False,
        "persist_token_threshold": 0,
    }
    path = tmp_path / "ucm_config_example.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path), f"ipc://{sock}"


def vllm_config(model, config_file):
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig

    return VllmConfig(
        model_config=ModelConfig(model=model, dtype="float32", max_model_len=2048),
        cache_config=CacheConfig(block_size=BLOCK),
        kv_transfer_config=KVTransferConfig(
            kv_connector="UCMConnector",
            kv_connector_module_path="ucm.integration.vllm.ucm_connector",
            kv_role="kv_both",
            kv_connector_extra_config={"UCM_CONFIG_FILE": config_file},
        ),
    )


def test_vllm_builds_ucm_connector_by_ucms_name_and_it_round_trips(tiny_model, tmp_path, storage):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from ucm.integration.vllm.uc_connector import UnifiedCacheConnectorV1
    from ucm.integration.vllm.ucm_connector import UCMConnector

    config_file, endpoint = ucm_config(tmp_path, storage)
    cfg = vllm_config(tiny_model, config_file)
    try:
        cls = KVConnectorFactory.get_connector_class(cfg.kv_transfer_config)
        assert cls is UCMConnector and issubclass(cls, UnifiedCacheConnectorV1) and issubclass(cls, KVConnectorBase_V1)
        nb = 8
        kcc = KVCacheConfig(num_blocks=nb, kv_cache_tensors=[], kv_cache_groups=[])
        sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kcc)
        assert type(sched) is UCMConnector and sched.connector_scheduler is not None
        assert type(sched.build_connector_meta(empty_step())).__name__ == "UCMConnectorMetadata"
        # UCM's keys reached our options: io_direct -> odirect, timeout_ms -> loadTimeoutMs.
        assert sched.config.connector_config["odirect"] is False
        assert sched.config.load_timeout_ms == 20000
        assert sched.config.store_pipeline == "Cache|Posix"

        worker = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kcc)
        assert type(worker) is UCMConnector and worker.connector_worker is not None
        kv = caches(nb)
        worker.register_kv_caches(kv)
        original = {k: v.clone() for k, v in kv.items()}
        ks = keys(3, "ucm-connector")
        step(worker, meta(saves=[transfer("w", ks, [1, 2, 3])]))
        saved(worker, "w")
        for v in kv.values():
            v.zero_()
        _, errors = step(worker, meta(loads=[transfer("r", ks, [5, 6, 7])]))
        assert errors == set()
        for name, v in kv.items():
            assert torch.equal(v[5:8], original[name][1:4]), name
        stats = worker.get_kv_connector_stats().data
        assert (stats["saved_blocks"], stats["loaded_blocks"], stats["load_failed_blocks"]) == (3, 3, 0), stats
        worker.shutdown()
        sched.shutdown()
    finally:
        stop_engine(endpoint)
