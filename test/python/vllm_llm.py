"""The vLLM `LLM` the end-to-end drivers run: CPU, float32, the tiny model,
prefix caching off (so every hit is the store's), and the UCM connector as
the seed configures it."""

from __future__ import annotations

from typing import Any


def connector_llm(model: str, block_size: int, extra_config: dict[str, Any], **args: Any) -> Any:
    """An LLM with UnifiedCacheConnectorV1; `args` add to or override vLLM's arguments."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    base: dict[str, Any] = dict(
        model=model,
        dtype="float32",
        block_size=block_size,
        max_model_len=4096,
        enable_prefix_caching=False,
        enforce_eager=True,
    )
    base.update(args)
    return LLM(
        **base,
        kv_transfer_config=KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1",
            kv_connector_module_path="ucm.integration.vllm.uc_connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra_config,
        ),
    )
