"""What the connector's scheduler and worker halves share: its options, the
metadata the scheduler hands the workers each step, what the workers report
back (each planned load's outcome), and the namespaces.

The options are read once, from kv_connector_extra_config, when vLLM builds
the connector (in the scheduler process and in every worker), so both halves
run with the same values and a bad value fails vLLM's startup with the key's
name. A namespace holds blocks whose bytes mean the same thing: it is derived
from everything that changes their meaning (docs/correctness.md lists every
part and why: model and weights, dtypes, quantization, rope and config
overrides, shapes, the KV cache layout, block size, vLLM version, this
format's version, the tensor- and pipeline-parallel rank, the cache epoch a
`reset_cache` starts), so a change of any of them is a miss, never wrong
bytes. vLLM features the connector cannot serve correctly are refused when it
is built (`refuse_unsupported`), with what to change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

try:  # vLLM >= 0.31: workers report back to the scheduler each step
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover
    KVConnectorWorkerMetadata = object  # type: ignore[assignment,misc]

from ...config import StoreConfig, config_from_extra

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("ucm")
_warned_hashseed = False

#: bumped when the meaning of stored bytes, or what the namespace digest
#: covers, changes (2: layout, quantization, overrides, pipeline stage)
FORMAT = "ucm-kv-2"

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
    """Blocks of one request to load or save: their keys and vLLM block ids.
    A load has an id of its own (`load_id`) under which the workers report
    its outcome back to the scheduler."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    load_id: int = 0
    #: the cache epoch the keys belong to (see UCMScheduler.reset_cache)
    epoch: int = 0


@dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    #: requests preempted since the last step: their blocks may be handed to
    #: other requests in this very step, so their dumps must end first
    preempted: list[str] = field(default_factory=list)
    #: finished requests whose blocks vLLM keeps for the connector
    #: (request_finished said True): each worker reports them finished once
    #: their dumps are over
    finished: list[str] = field(default_factory=list)


@dataclass
class UCMWorkerMetadata(KVConnectorWorkerMetadata):  # type: ignore[misc,valid-type]
    """What the workers tell the scheduler after a step: per planned load,
    how many workers reported it and how many of its blocks loaded in order
    before the first failure (the least over those workers). vLLM merges
    every worker's report of a step with `aggregate`; the scheduler adds
    steps up until every worker has reported a load."""

    loads: dict[int, tuple[int, int]] = field(default_factory=dict)

    def aggregate(self, other: Any) -> "UCMWorkerMetadata":
        merged = dict(self.loads)
        for load_id, (n, ok) in getattr(other, "loads", {}).items():
            if load_id in merged:
                n0, ok0 = merged[load_id]
                merged[load_id] = (n0 + n, min(ok0, ok))
            else:
                merged[load_id] = (n, ok)
        return UCMWorkerMetadata(merged)


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
    pp_size: int = 1
    #: the workers that report each load's outcome (every TP and PP rank)
    world_size: int = 1
    kv_cache_config: Any = None
    #: kv_connector_extra_config "ucm_weights_version": part of the identity,
    #: for weights replaced in place under the same model path
    weights_version: str = ""

    @classmethod
    def from_vllm(cls, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> "ConnectorOptions":
        ktc = vllm_config.kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        refuse_unsupported(vllm_config, kv_cache_config)
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
        weights_version = extra.get("ucm_weights_version", "")
        if not isinstance(weights_version, (str, int)):
            raise ValueError(
                f"kv_connector_extra_config.ucm_weights_version must be a string or an integer, got {weights_version!r}"
            )
        pc = vllm_config.parallel_config
        return cls(
            vllm_config,
            config,
            load_async,
            preempt_wait_ms,
            save_timeout_ms,
            decode_save_blocks,
            block_size=vllm_config.cache_config.block_size,
            num_blocks=kv_cache_config.num_blocks,
            tp_size=pc.tensor_parallel_size,
            use_mla=bool(getattr(vllm_config.model_config, "use_mla", False)),
            model_id=model_identity(vllm_config, kv_cache_config, str(weights_version)),
            pp_size=pc.pipeline_parallel_size,
            world_size=pc.tensor_parallel_size * pc.pipeline_parallel_size,
            kv_cache_config=kv_cache_config,
            weights_version=str(weights_version),
        )

    def namespace(self, rank: int, stage: int = 0, epoch: int = 0) -> str:
        """The namespace of the blocks TP rank `rank` of pipeline stage
        `stage` holds (one for all TP ranks of a stage with MLA), in cache
        epoch `epoch` (0 until a reset_cache)."""
        who = "mla" if self.use_mla else f"tp{self.tp_size}r{rank}"
        if self.pp_size > 1:
            who += f"pp{self.pp_size}s{stage}"
        digest = hashlib.sha256(f"{FORMAT}|{self.model_id}|{self.block_size}|{who}|{epoch}".encode()).hexdigest()[:16]
        model = str(self.vllm_config.model_config.model).rstrip("/")
        base = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(model))[:40] or "model"
        return f"{base}-{who}-{digest}"

    def all_namespaces(self, epoch: int = 0) -> list[str]:
        """Every rank's namespace of `epoch`: a block is a hit only when all of them hold it."""
        return sorted({self.namespace(r, s, epoch) for s in range(self.pp_size) for r in range(self.tp_size)})


def _canonical(v: Any) -> str:
    """A stable text of a config value (dicts with sorted keys)."""
    if callable(v):
        return f"callable:{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', repr(v))}"
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(v)


def identity_parts(
    vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", weights_version: str = ""
) -> dict[str, str]:
    """Everything that changes the meaning of KV bytes, except the rank: each
    part named (docs/correctness.md says why each is there)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    import vllm

    hf = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None)
    spec = getattr(vllm_config, "speculative_config", None)
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or getattr(cc, "kv_cache_layout", None)
    return {
        "model": str(mc.model),
        "revision": str(getattr(mc, "revision", None)),
        "weights_version": weights_version,
        "dtype": str(mc.dtype),
        "cache_dtype": str(cc.cache_dtype),
        "calculate_kv_scales": str(bool(getattr(cc, "calculate_kv_scales", False))),
        "quantization": str(getattr(mc, "quantization", None)),
        "hf_overrides": _canonical(getattr(mc, "hf_overrides", None) or {}),
        "rope": _canonical(rope),
        "num_layers": str(mc.get_num_layers(pc)),
        "num_kv_heads": str(mc.get_num_kv_heads(pc)),
        "head_size": str(mc.get_head_size()),
        "kv_cache_layout": str(layout),
        "prefix_caching_hash_algo": str(getattr(cc, "prefix_caching_hash_algo", "")),
        "speculative": _canonical(
            None if spec is None else [getattr(spec, "method", None), str(getattr(spec, "model", None))]
        ),
        "vllm": vllm.__version__,
    }


def model_identity(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", weights_version: str = "") -> str:
    """The identity parts as one string, for the namespace digest."""
    return "|".join(f"{k}={v}" for k, v in identity_parts(vllm_config, kv_cache_config, weights_version).items())


class UnsupportedConfig(ValueError):
    """A vLLM feature the connector would serve wrong KV under: vLLM stops
    at start with this message."""


def refuse_unsupported(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> None:
    """Stops vLLM at start when it runs a feature whose KV this connector
    cannot store and load correctly (docs/correctness.md, "vLLM features")."""
    pc, cc = vllm_config.parallel_config, vllm_config.cache_config
    fix = "remove --kv-transfer-config (run without the store) or"
    dcp = int(getattr(pc, "decode_context_parallel_size", 1) or 1)
    pcp = int(getattr(pc, "prefill_context_parallel_size", 1) or 1)
    if dcp > 1 or pcp > 1:
        raise UnsupportedConfig(
            f"UCM connector: context parallelism is not supported (decode_context_parallel_size={dcp}, "
            f"prefill_context_parallel_size={pcp}): each rank holds only some tokens of a block, which the "
            f"store's blocks do not describe; {fix} run without context parallelism"
        )
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    extra = (vllm_config.kv_transfer_config.kv_connector_extra_config or {}) if vllm_config.kv_transfer_config else {}
    if pp > 1 and extra.get("ucm_allow_pipeline_parallel") is not True:
        raise UnsupportedConfig(
            f"UCM connector: pipeline parallelism (pipeline_parallel_size={pp}) has not been run end to end with "
            "the store (vLLM's CPU backend, where its tests run, cannot run it); each stage has a namespace of its "
            "own, but until that is shown, set kv_connector_extra_config "
            '"ucm_allow_pipeline_parallel": true to run it anyway, or '
            f"{fix} run without pipeline parallelism"
        )
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) > 1:
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
        raise UnsupportedConfig(
            f"UCM connector: the model has {len(groups)} KV cache groups ({kinds}); the store keeps blocks of "
            f"one group only (one block table for every layer); {fix} serve a model with one kind of attention"
        )
    hash_block = getattr(kv_cache_config, "hash_block_size", None)
    if hash_block not in (None, cc.block_size):
        raise UnsupportedConfig(
            f"UCM connector: vLLM hashes blocks of {hash_block} tokens but the KV cache block is "
            f"{cc.block_size} tokens (hash_block_size != block_size); the store keys blocks by their hash, "
            f"so the two must be equal; {fix} use the same size"
        )
