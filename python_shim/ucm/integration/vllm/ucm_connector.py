"""UCMConnector: the vLLM connector under the name UCM gives it today.

UCM's current docs start vLLM with

    --kv-transfer-config '{"kv_connector": "UCMConnector",
      "kv_connector_module_path": "ucm.integration.vllm.ucm_connector",
      "kv_role": "kv_both",
      "kv_connector_extra_config": {"UCM_CONFIG_FILE": "/path/ucm_config.yaml"}}'

and that runs this store unchanged, with UCM's current config
(`UcmPipelineStore`, `store_pipeline: "Cache|Posix"`; docs/configuration.md)
or the seed's. It is the same connector as the seed's
`UnifiedCacheConnectorV1` (ucm.integration.vllm.uc_connector), under the
other name: the same halves, metadata classes, stats and namespaces, so
processes started under either name share every block.
"""

from __future__ import annotations

from .uc_connector import UCMConnectorMetadata, UCMWorkerMetadata, UnifiedCacheConnectorV1

__all__ = ["UCMConnector", "UCMConnectorMetadata", "UCMWorkerMetadata"]


class UCMConnector(UnifiedCacheConnectorV1):
    """UnifiedCacheConnectorV1 under UCM's current name (vLLM's factory finds a
    class by `kv_connector` in `kv_connector_module_path`)."""
