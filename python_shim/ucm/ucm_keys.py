"""UCM's own config keys and what each becomes here: the same tables as the
engine's core/ucm_keys.ts (test/python/test_config.py checks that they are
equal), used wherever the shim reads a config: the YAML file or the inline
config (ucm.config), UCM's flat store config (UcmNfsStore, UcmPipelineStore).

A key UCM documents (today's names, UcmPipelineStore's, and the v0.1.0 NFS
store's flat ones) either sets one of our options (io_direct -> odirect,
posix_capacity_gb -> capacity in bytes, ...) or is accepted with no effect
here, said once per process with the reason. A key nobody documents is a
ConfigError naming it and its value, as the engine refuses it; so is a value
UCM would refuse, and two keys that set one option to different values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .config_error import ConfigError, show

logger = logging.getLogger("ucm")

#: the connector names whose config this store takes
CONNECTOR_NAMES = ("UcmNfsStore", "UcmPipelineStore")
#: the store_pipeline values this store provides; UCM's others are refused
STORE_PIPELINES = ("Cache|Posix", "Posix")
CACHE_STAGE = (
    "the Cache stage is the engine's host-memory tier (hostCacheBytes), one for every client of the engine: "
    "committed dumps and verified loads stay there, and a load of a block it holds is served from it"
)

GIB = 1 << 30
FLAG = {"kind": "bool"}
COUNT = {"kind": "int", "min": 1}
RATIO = {"kind": "number", "min": 0, "max": 1}
ANY = {"kind": "any"}


def _no_effect(spec: dict[str, Any], why: str) -> dict[str, Any]:
    return {**spec, "why": why}


UCM_TOP_KEYS: dict[str, dict[str, Any]] = {
    "use_layerwise": _no_effect(
        FLAG,
        "the connector loads a request's blocks before the forward pass and saves them after it, "
        "every layer of a block in one file",
    ),
    "enable_event_sync": _no_effect(
        FLAG,
        "on a GPU the engine always waits for the CUDA event of the forward pass before it reads a block "
        "(cudaEventTimeoutMs); on a CPU there is nothing to wait for",
    ),
    "persist_token_threshold": _no_effect(
        {"kind": "int", "min": 0},
        "every full block of every request is looked up and saved "
        "(admitOnSecondSight spares the disk prompts that never repeat)",
    ),
    "wa_dump_block_wise": _no_effect(FLAG, "it applies to UCM's FAWA connector only, which is not provided here"),
    "load_tokens_threshold": _no_effect(
        {"kind": "int", "min": 0},
        "it applies to DeepSeek V4 in UCM only; here any stored prefix of a block or more is loaded",
    ),
    "enable_record_traces": _no_effect(
        FLAG, "no per-request trace is written; each transfer's Task line and the engine's metrics say what moved"
    ),
    "enable_metrics": _no_effect(
        FLAG,
        "the engine serves its Prometheus metrics on metricsPort or metricsSocket, "
        "and the connector's stats always reach vLLM",
    ),
    "use_lite": _no_effect(
        FLAG, "UCM Lite (hit-ratio statistics without storing KV) is not provided: blocks are always stored and loaded"
    ),
    "metrics_config_path": _no_effect(
        {"kind": "string"},
        "UCM's metrics config is not read; the engine's metrics are set with metricsPort and metricsSocket",
    ),
    "hit_ratio": _no_effect(
        RATIO, "it caps hits in UCM's mock connector only; hits here are the blocks the store holds"
    ),
}

_GC = (
    "eviction here runs when capacity is set, from 95 % of it down to 85 % (70 % after refused writes), "
    "least recently used first, over one usage ledger every engine shares (docs/capacity.md)"
)
_AIO = "UCM's aio engine only; each transfer stream here opens, writes and renames its block files itself"
_QUEUE = "a depth of UCM's Cache Store queues; dumps here are bounded by maxInflightBytes and maxQueueMs"
_MOONCAKE = "it applies to store_pipeline Mooncake only, which this store does not provide"
_YUANRONG = "it applies to store_pipeline YuanRong only, which this store does not provide"

UCM_CONNECTOR_KEYS: dict[str, dict[str, Any]] = {
    "store_pipeline": {"kind": "string", "values": list(STORE_PIPELINES), "field": "storePipeline"},
    "timeout_ms": {
        "kind": "int",
        "min": 1,
        "ours": "loadTimeoutMs",
        "note": "in UCM it bounds loads and dumps; here it bounds loads, "
        "and the connector's ucm_save_timeout_ms bounds dumps",
    },
    "cache_buffer_capacity_gb": {
        "kind": "number",
        "min": 0,
        "scale": GIB,
        "field": "cacheBufferBytes",
    },
    "cache_io_aggregation": _no_effect(
        FLAG, "it applies to Ascend A2 devices only; a GPU block here moves in one batched copy (cudaCopy)"
    ),
    "cache_sdma_direct": _no_effect(FLAG, "it applies to Ascend A3 devices only"),
    "cache_load_backend_only": _no_effect(
        FLAG, "a load is served from the Cache stage when it holds the block, else read from the directory"
    ),
    "share_buffer_enable": _no_effect(
        FLAG,
        "one engine per node serves every vLLM process there, "
        "with one pool of pinned staging for all of them (pinnedStagingBytes)",
    ),
    "io_direct": {
        "kind": "bool",
        "ours": "odirect",
        "note": "UCM's Posix store defaults to off; here O_DIRECT is on unless io_direct or odirect turns it off",
    },
    "posix_io_engine": _no_effect(
        {"kind": "string", "values": ["psync", "aio"]},
        "each transfer stream reads and writes its block files with pread and pwrite on threads of its own",
    ),
    "posix_data_trans_concurrency": {
        "kind": "int",
        "min": 1,
        "ours": "transferStreamNumber",
        "note": "UCM counts these threads per GPU; here they are the engine's, for every GPU of the node together",
    },
    "posix_open_concurrency": _no_effect(COUNT, _AIO),
    "posix_commit_concurrency": _no_effect(COUNT, _AIO),
    "posix_lookup_concurrency": _no_effect(
        COUNT, "lookups run on the engine's own lookup threads, each answered within lookupTimeoutMs"
    ),
    "posix_capacity_gb": {
        "kind": "number",
        "min": 0,
        "ours": "capacity",
        "scale": GIB,
        "note": "GiB, as in UCM; 0 is no limit. Every engine writing the directory shares it, "
        "so each may set it (UCM asks for one instance only)",
    },
    "posix_gc_trigger_threshold_ratio": _no_effect(RATIO, _GC),
    "posix_gc_recycle_percent": _no_effect(RATIO, _GC),
    "posix_gc_max_recycle_count_per_shard": _no_effect(COUNT, _GC),
    "posix_gc_shard_sample_ratio": _no_effect(RATIO, _GC),
    "posix_gc_check_interval_sec": _no_effect(COUNT, _GC),
    "posix_gc_concurrency": _no_effect(COUNT, _GC),
    "posix_gc_task_timeout_ms": _no_effect({"kind": "int", "min": 0}, _GC),
    "posix_gc_precise_mode": _no_effect(FLAG, _GC),
    "store_health": {
        "kind": "mapping",
        "keys": {
            "enabled": {"kind": "bool", "ours": "storeHealth"},
            "health_check_interval_s": {"kind": "int", "min": 1, "ours": "healthCheckIntervalS"},
            "health_check_timeout_s": {"kind": "int", "min": 1, "ours": "healthCheckTimeoutS"},
            "health_window_size": {"kind": "int", "min": 1, "ours": "healthWindowSize"},
            "failure_threshold": {"kind": "int", "min": 1, "ours": "healthFailureThreshold"},
        },
    },
    "use_gdr": _no_effect(
        FLAG, "GPU blocks move through pinned host staging (pinnedStagingBytes); GPUDirect RDMA is not used"
    ),
    "waiting_queue_depth": _no_effect(COUNT, _QUEUE),
    "running_queue_depth": _no_effect(COUNT, _QUEUE),
    **{
        k: _no_effect(ANY, _MOONCAKE)
        for k in (
            "local_hostname",
            "master_server_address",
            "metadata_server",
            "protocol",
            "global_segment_size_gb",
            "replica_num",
            "share_buffer_capacity_gb",
        )
    },
    **{
        f"yuanrong_{k}": _no_effect(ANY, _YUANRONG)
        for k in (
            "host",
            "port",
            "namespace",
            "resource_log_path",
            "enable_remote_h2d",
            "timeout_ms",
            "waiting_queue_depth",
            "load_worker_count",
            "dump_prerequisite_worker_count",
            "recovery_batch_size",
            "host_buffer_count",
            "host_buffer_capacity_gb",
            "h2d_stream_count",
            "backfill_worker_count",
            "backfill_queue_depth",
            "posix_max_inflight_gb",
        )
    },
}

_WHOLE_FILE = "the engine reads and writes each block file in one I/O of the whole block, whatever the shard size"
_OWN_STAGING = "each engine transfer thread has its own staging buffer (pinnedStagingBytes bounds GPU staging)"
_ALWAYS_EVICTS = "eviction is always on when capacity (storage_capacity) is set, and off without it"
_THRESHOLDS = "eviction runs from 95 % of the capacity down to 85 % (70 % after writes were refused for room)"
_LRU = "eviction always picks the least recently used blocks (file mtime, refreshed by every load)"
_CALLER = "it describes the process that builds UCM's store object (its role, device or block size), not the store"

#: the flat key names of UCM's v0.1.0 NFS store, still accepted in ucm_connector_config
UCM_V010_KEYS: dict[str, dict[str, Any]] = {
    "stream_number": {"kind": "int", "min": 1, "ours": "transferStreamNumber"},
    "use_direct": {"kind": "bool01", "ours": "odirect"},
    "useDirect": {"kind": "bool01", "ours": "odirect"},
    "transferIoDirect": {"kind": "bool01", "ours": "odirect"},
    "storage_capacity": {"kind": "size", "ours": "capacity", "note": "bytes; 0 is no limit, as in UCM"},
    "storageCapacity": {"kind": "size", "ours": "capacity", "note": "bytes; 0 is no limit, as in UCM"},
    "transferTimeoutMs": {"kind": "int", "min": 1, "ours": "loadTimeoutMs"},
    "io_size": _no_effect(ANY, _WHOLE_FILE),
    "transferIoSize": _no_effect(ANY, _WHOLE_FILE),
    "buffer_number": _no_effect(ANY, _OWN_STAGING),
    "transferBufferNumber": _no_effect(ANY, _OWN_STAGING),
    "recycle_enable": _no_effect(ANY, _ALWAYS_EVICTS),
    "recycleEnable": _no_effect(ANY, _ALWAYS_EVICTS),
    "recycle_threshold_ratio": _no_effect(ANY, _THRESHOLDS),
    "recycleThresholdRatio": _no_effect(ANY, _THRESHOLDS),
    "hotnessEnable": _no_effect(ANY, _LRU),
    "hotnessInterval": _no_effect(ANY, _LRU),
    "tempDumpDirEnable": _no_effect(
        ANY, "blocks are always written to a temporary file and renamed into place on commit"
    ),
    "role": _no_effect(ANY, _CALLER),
    "device": _no_effect(ANY, _CALLER),
    "transferDeviceId": _no_effect(ANY, _CALLER),
    "transferEnable": _no_effect(ANY, _CALLER),
    "kv_block_size": _no_effect(ANY, _CALLER),
    "kvcacheBlockSize": _no_effect(ANY, _CALLER),
}


def connector_key(k: str) -> dict[str, Any] | None:
    """A key of ucm_connector_config as UCM names it (today's names first)."""
    return UCM_CONNECTOR_KEYS.get(k) or UCM_V010_KEYS.get(k)


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _size(v: Any) -> int | None:
    from .settings import parse_size

    n = parse_size(v)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def check_value(name: str, spec: dict[str, Any], v: Any) -> Any:
    """The value of a UCM key as UCM would take it, converted to ours
    (bool01 -> bool, GiB -> bytes); raises ConfigError naming the key."""
    kind, lo, hi = spec["kind"], spec.get("min"), spec.get("max")
    span = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
    in_range = (lo is None or v >= lo) and (hi is None or v <= hi) if _is_number(v) else False
    if kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {show(v)}")
        return v
    if kind == "bool01":
        if isinstance(v, bool):
            return v
        if _is_int(v) and v in (0, 1):
            return v == 1
        raise ConfigError(f"{name} must be true, false, 1 or 0, got {show(v)}")
    if kind == "int":
        if not (_is_int(v) and in_range):
            raise ConfigError(f"{name} must be an integer {span}, got {show(v)}")
        return int(v) * spec.get("scale", 1)
    if kind == "number":
        if not (_is_number(v) and in_range):
            raise ConfigError(f"{name} must be a number {span}, got {show(v)}")
        return math.floor(v * spec["scale"]) if "scale" in spec else v
    if kind == "string":
        if not isinstance(v, str):
            raise ConfigError(f"{name} must be a string, got {show(v)}")
        if "values" in spec and v not in spec["values"]:
            raise ConfigError(f"{name} must be one of {', '.join(show(x) for x in spec['values'])}, got {show(v)}")
        return v
    if kind == "size":
        if _size(v) is None:
            raise ConfigError(f"{name} must be a size in bytes such as 500GiB, or 0 for unlimited, got {show(v)}")
        return v
    if kind == "mapping":
        if not isinstance(v, dict):
            raise ConfigError(f"{name} must be a mapping, got {show(v)}")
        for k, x in v.items():
            sub = spec["keys"].get(k)
            if sub is None:
                raise unknown_key(f"{name}.{k}", x)
            check_value(f"{name}.{k}", sub, x)
        return v
    return v  # any


def unknown_key(name: str, v: Any) -> ConfigError:
    return ConfigError(
        f"unknown key {name} (value {show(v)}): neither this store nor UCM documents it; "
        "every key: docs/configuration.md"
    )


def no_effect_note(name: str, v: Any, why: str) -> str:
    """The line an accepted key with no effect here says (the engine logs the same at start)."""
    return f"{name}: {show(v)} accepted, no effect here: {why}"


def top_level_notes(doc: dict[str, Any], structural: Iterable[str], at: Callable[[str], str]) -> list[str]:
    """Checks a config document's top-level keys besides the `structural` ones:
    UCM's are noted, any other is an error."""
    notes = []
    skip = set(structural)
    for k, v in doc.items():
        if k in skip:
            continue
        spec = UCM_TOP_KEYS.get(k)
        if spec is None:
            raise unknown_key(at(k), v)
        if v is None:
            continue  # left empty: UCM's default
        check_value(at(k), spec, v)
        notes.append(no_effect_note(at(k), v, spec["why"]))
    return notes


@dataclass
class Translated:
    #: ucm_connector_config with UCM's keys replaced by the options they set
    raw: dict[str, Any] = field(default_factory=dict)
    #: our option -> the UCM key that set it
    origin: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cache_buffer_bytes: int | None = None
    store_pipeline: str | None = None


def _capacity_bytes(v: Any) -> list[int] | None:
    sizes = [_size(x) for x in (v if isinstance(v, list) else [v])]
    return None if any(s is None for s in sizes) else sizes  # type: ignore[return-value]


def _same(ours: str, a: Any, b: Any) -> bool:
    if ours == "capacity":
        x, y = _capacity_bytes(a), _capacity_bytes(b)
        return x is None or y is None or len(set(x) | set(y)) == 1
    return show(a) == show(b)


def translate(cc: dict[str, Any], connector_name: str, section: str, our_keys: Iterable[str]) -> Translated:
    """ucm_connector_config (at path `section`) with UCM's keys turned into
    ours, as the engine does (core/ucm_keys.ts translateConnectorConfig)."""
    ours_set = set(our_keys)
    out = Translated()
    given: dict[str, tuple[str, Any, Any]] = {}

    def name(k: str) -> str:
        return f"{section}.{k}"

    def put(ours: str, src: str, value: Any, converted: Any) -> None:
        prev = given.get(ours)
        if prev is not None and not _same(ours, prev[2], converted):
            raise ConfigError(f"{section} sets {ours} twice: {prev[0]}={show(prev[1])} and {src}={show(value)}")
        if prev is not None:
            return  # the same value twice: the first spelling stands
        given[ours] = (src, value, converted)
        out.raw[ours] = converted
        if src != ours:
            out.origin[ours] = src

    for k, v in cc.items():
        spec = None if k in ours_set else connector_key(k)
        if k not in ours_set and spec is None:
            raise unknown_key(name(k), v)
        if v is None:
            continue  # as our options: an empty value is the default
        if spec is None:
            put(k, k, v, v)
            continue
        if k == "store_pipeline":
            if not isinstance(v, str) or v not in STORE_PIPELINES:
                raise ConfigError(
                    f"{name(k)} is {show(v)}, which this store does not provide; "
                    f"accepted: {', '.join(show(p) for p in STORE_PIPELINES)}"
                )
            out.store_pipeline = v
            if v.startswith("Cache|"):
                out.notes.append(f"{name(k)}: {show(v)}: {CACHE_STAGE}")
            continue
        converted = check_value(name(k), spec, v)
        if "ours" in spec:
            put(spec["ours"], k, v, converted)
        if spec["kind"] == "mapping":  # store_health: each of its keys sets one of ours (checked above)
            for sub, x in v.items():
                sub_spec = spec["keys"][sub]
                if "ours" in sub_spec and x is not None:
                    put(sub_spec["ours"], f"{k}.{sub}", x, check_value(name(f"{k}.{sub}"), sub_spec, x))
        if spec.get("field") == "cacheBufferBytes":
            out.cache_buffer_bytes = converted
        if "why" in spec:
            out.notes.append(no_effect_note(name(k), v, spec["why"]))
    if connector_name == "UcmPipelineStore" and out.store_pipeline is None:
        raise ConfigError(
            f'{name("store_pipeline")} is required with ucm_connector_name "UcmPipelineStore": '
            + " or ".join(show(p) for p in STORE_PIPELINES)
        )
    return out


_said: set[str] = set()


def say_once(notes: Iterable[str], level: int = logging.INFO) -> None:
    """Logs each note the first time this process meets it (a config is read
    by every store object and connector half; the reason is said once)."""
    for n in notes:
        if n not in _said:
            _said.add(n)
            logger.log(level, "UCM: config: %s", n)
