"""What the connector's scheduler and worker halves share: its options, the
metadata the scheduler hands the workers each step, and the namespaces.

The options are read once, from kv_connector_extra_config, when vLLM builds
the connector (in the scheduler process and in every worker), so both halves
run with the same values and a bad value fails vLLM's startup with the key's
name. A namespace holds blocks whose bytes mean the same thing: it is derived
from everything that changes their meaning (model, dtypes, shapes, block
size, vLLM version, this format's version, the tensor-parallel rank), so a
change of any of them is a miss, never wrong bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ...config import StoreConfig, config_from_extra

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("ucm")
_warned_hashseed = False

#: bumped when the meaning of stored bytes changes
FORMAT = "ucm-kv-1"

#: how long handle_preemptions lets a preempted request's dumps run before
#: it cancels them (kv_connector_extra_config "ucm_preempt_wait_ms")
PREEMPT_WAIT_MS = 1000

#: how long a dump may take before the connector gives up on it
#: (kv_connector_extra_config "ucm_save_timeout_ms"). The engine sheds a dump
#: queued longer than maxQueueMs (5 s by default), so a healthy engine has
#: finished or dropped every dump well before; this bounds how long a
#: finished or preempted request's blocks stay held when the engine stops
#: answering (its deadline is then the only guarantee, see ucm.deadline).
SAVE_TIMEOUT_MS = 10000

#: blocks of generated tokens are saved once this many are complete and not
#: yet saved (and the rest when the request finishes): one dump call every
#: few blocks of decoding rather than one per step
#: (kv_connector_extra_config "ucm_decode_save_blocks"; 0: only prompt blocks)
DECODE_SAVE_BLOCKS = 8


@dataclass
class Transfer:
    """Blocks of one request to load or save: their keys and vLLM block ids."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    #: requests preempted since the last step: their blocks may be handed to
    #: other requests in this very step, so their dumps must end first
    preempted: list[str] = field(default_factory=list)


def warn_hashseed_once() -> None:
    global _warned_hashseed
    if not _warned_hashseed and os.environ.get("PYTHONHASHSEED") in (None, "", "random"):
        _warned_hashseed = True
        logger.warning(
            "UCM: PYTHONHASHSEED is not set: vLLM's block hashes then differ between processes, so blocks "
            "stored by one vLLM process are never found by another or after a restart. "
            "Export PYTHONHASHSEED (e.g. 123456) before starting vLLM."
        )


@dataclass
class ConnectorOptions:
    """The connector's settings, read from vLLM's config."""

    vllm_config: "VllmConfig"
    config: StoreConfig
    load_async: bool
    preempt_wait_ms: int
    save_timeout_ms: int
    decode_save_blocks: int
    block_size: int
    num_blocks: int
    tp_size: int
    use_mla: bool
    model_id: str

    @classmethod
    def from_vllm(cls, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> "ConnectorOptions":
        ktc = vllm_config.kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        # The config file named by UCM_CONFIG_FILE, or the config inline (as UCM accepts).
        config = config_from_extra(extra)
        # A store miss is never an error: failed loads are recomputed, unless the operator chose otherwise.
        if extra.get("ucm_load_failure_policy", "recompute") == "recompute":
            ktc.kv_load_failure_policy = "recompute"
        # Asynchronous loading: the request waits outside the batch while its
        # blocks load, instead of the forward pass waiting for them.
        load_async = bool(extra.get("ucm_load_async", config.load_async))
        preempt_wait_ms = int(extra.get("ucm_preempt_wait_ms", PREEMPT_WAIT_MS))
        save_timeout_ms = int(extra.get("ucm_save_timeout_ms", SAVE_TIMEOUT_MS))
        decode_save_blocks = int(extra.get("ucm_decode_save_blocks", DECODE_SAVE_BLOCKS))
        if decode_save_blocks < 0:
            raise ValueError(
                f"kv_connector_extra_config.ucm_decode_save_blocks must be 0 or more, got {decode_save_blocks}"
            )
        return cls(
            vllm_config,
            config,
            load_async,
            preempt_wait_ms,
            save_timeout_ms,
            decode_save_blocks,
            block_size=vllm_config.cache_config.block_size,
            num_blocks=kv_cache_config.num_blocks,
            tp_size=vllm_config.parallel_config.tensor_parallel_size,
            use_mla=bool(getattr(vllm_config.model_config, "use_mla", False)),
            model_id=model_identity(vllm_config),
        )

    def namespace(self, rank: int) -> str:
        """The namespace of TP rank `rank`'s blocks (one for all ranks with MLA)."""
        who = "mla" if self.use_mla else f"tp{self.tp_size}r{rank}"
        digest = hashlib.sha256(f"{FORMAT}|{self.model_id}|{self.block_size}|{who}".encode()).hexdigest()[:16]
        model = str(self.vllm_config.model_config.model).rstrip("/")
        base = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(model))[:40] or "model"
        return f"{base}-{who}-{digest}"


def model_identity(vllm_config: "VllmConfig") -> str:
    """Everything that changes the meaning of KV bytes, except the rank."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    import vllm

    parts = [
        str(mc.model),
        str(getattr(mc, "revision", None)),
        str(mc.dtype),
        str(cc.cache_dtype),
        str(mc.get_num_layers(pc)),
        str(mc.get_num_kv_heads(pc)),
        str(mc.get_head_size()),
        str(getattr(cc, "prefix_caching_hash_algo", "")),
        vllm.__version__,
    ]
    return "|".join(parts)
