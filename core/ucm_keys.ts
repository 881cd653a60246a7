// UCM's own config keys, as UCM documents them (docs/source/user-guide/
// config-parameters.md and prefix-cache/pipeline_store.md in UCM's
// repository, and the v0.1.0 NFS store's flat names), and what each becomes
// here: the one of our options it means (io_direct -> odirect), or "accepted,
// no effect here" with the reason, said once when the engine starts. A key
// nobody documents (neither this store nor UCM) stops startup, named with its
// value; so does a value UCM itself would refuse. config.ts calls this before
// it validates our own keys, so a UCM key's value passes the same checks as
// the option it sets. python_shim/ucm/ucm_keys.py holds the same tables
// (test/python/test_config.py compares the two), and docs/configuration.md
// tabulates them (scripts/gen_config_doc.js).
import { ConfigError, show } from "./config_error";
import { parseSize } from "./options";

/** The connector names whose config this store takes (the first such entry of a ucm_connectors list is used). */
export const CONNECTOR_NAMES = ["UcmNfsStore", "UcmPipelineStore"];
/** The values of store_pipeline this store provides; UCM's others (Cache|Empty, Fake, Mooncake, ...) are refused. */
export const STORE_PIPELINES = ["Cache|Posix", "Posix"];
export const CACHE_STAGE =
  "the Cache stage is the engine's host-memory tier (hostCacheBytes), one for every client of the engine: committed dumps and verified loads stay there, and a load of a block it holds is served from it";

export type UcmKind = "bool" | "bool01" | "int" | "number" | "string" | "size" | "mapping" | "any";

export interface UcmKey {
  /** The value UCM documents: checked as UCM checks it. bool01: true, false, 1 or 0; any: not checked (a key with no effect here). */
  kind: UcmKind;
  min?: number;
  max?: number;
  /** The strings a "string" key may be. */
  values?: string[];
  /** The option of OPTIONS this key sets (its value times `scale`). */
  ours?: string;
  scale?: number;
  /** An engine setting that is not an option of ours as it is (config.ts turns it into one). */
  field?: "cacheBufferBytes" | "storePipeline";
  /** Accepted, no effect here, because of this (logged once at start). */
  why?: string;
  /** What else an operator should know about a key that sets one of ours (the reference only). */
  note?: string;
  /** The keys of a mapping (store_health). */
  keys?: Record<string, UcmKey>;
}

const GIB = 2 ** 30;
const flag: UcmKey = { kind: "bool" };
const count: UcmKey = { kind: "int", min: 1 };
const ratio: UcmKey = { kind: "number", min: 0, max: 1 };
const noEffect = (spec: UcmKey, why: string): UcmKey => ({ ...spec, why });

/** Keys at the top level of the file, beside ucm_connectors (or ucm_connector_name). None changes anything here. */
export const UCM_TOP_KEYS: Record<string, UcmKey> = {
  use_layerwise: noEffect(
    flag,
    "the connector loads a request's blocks before the forward pass and saves them after it, every layer of a block in one file",
  ),
  enable_event_sync: noEffect(
    flag,
    "on a GPU the engine always waits for the CUDA event of the forward pass before it reads a block (cudaEventTimeoutMs); on a CPU there is nothing to wait for",
  ),
  persist_token_threshold: noEffect(
    { kind: "int", min: 0 },
    "every full block of every request is looked up and saved (admitOnSecondSight spares the disk prompts that never repeat)",
  ),
  wa_dump_block_wise: noEffect(flag, "it applies to UCM's FAWA connector only, which is not provided here"),
  load_tokens_threshold: noEffect(
    { kind: "int", min: 0 },
    "it applies to DeepSeek V4 in UCM only; here any stored prefix of a block or more is loaded",
  ),
  enable_record_traces: noEffect(
    flag,
    "no per-request trace is written; each transfer's Task line and the engine's metrics say what moved",
  ),
  enable_metrics: noEffect(
    flag,
    "the engine serves its Prometheus metrics on metricsPort or metricsSocket, and the connector's stats always reach vLLM",
  ),
  use_lite: noEffect(flag, "UCM Lite (hit-ratio statistics without storing KV) is not provided: blocks are always stored and loaded"),
  metrics_config_path: noEffect(
    { kind: "string" },
    "UCM's metrics config is not read; the engine's metrics are set with metricsPort and metricsSocket",
  ),
  hit_ratio: noEffect(ratio, "it caps hits in UCM's mock connector only; hits here are the blocks the store holds"),
};

const GC =
  "eviction here runs when capacity is set, from 95 % of it down to 85 % (70 % after refused writes), least recently used first, over one usage ledger every engine shares (docs/capacity.md)";
const AIO = "UCM's aio engine only; each transfer stream here opens, writes and renames its block files itself";
const QUEUE = "a depth of UCM's Cache Store queues; dumps here are bounded by maxInflightBytes and maxQueueMs";
const MOONCAKE = "it applies to store_pipeline Mooncake only, which this store does not provide";
const YUANRONG = "it applies to store_pipeline YuanRong only, which this store does not provide";

/** Keys of ucm_connector_config as UCM documents them today (UcmPipelineStore). */
export const UCM_CONNECTOR_KEYS: Record<string, UcmKey> = {
  store_pipeline: { kind: "string", values: STORE_PIPELINES, field: "storePipeline" },
  timeout_ms: {
    kind: "int",
    min: 1,
    ours: "loadTimeoutMs",
    note: "in UCM it bounds loads and dumps; here it bounds loads, and the connector's ucm_save_timeout_ms bounds dumps",
  },
  cache_buffer_capacity_gb: { kind: "number", min: 0, scale: GIB, field: "cacheBufferBytes" },
  cache_io_aggregation: noEffect(flag, "it applies to Ascend A2 devices only; a GPU block here moves in one batched copy (cudaCopy)"),
  cache_sdma_direct: noEffect(flag, "it applies to Ascend A3 devices only"),
  cache_load_backend_only: noEffect(flag, "a load is served from the Cache stage when it holds the block, else read from the directory"),
  share_buffer_enable: noEffect(
    flag,
    "one engine per node serves every vLLM process there, with one pool of pinned staging for all of them (pinnedStagingBytes)",
  ),
  io_direct: {
    kind: "bool",
    ours: "odirect",
    note: "UCM's Posix store defaults to off; here O_DIRECT is on unless io_direct or odirect turns it off",
  },
  posix_io_engine: noEffect(
    { kind: "string", values: ["psync", "aio"] },
    "each transfer stream reads and writes its block files with pread and pwrite on threads of its own",
  ),
  posix_data_trans_concurrency: {
    kind: "int",
    min: 1,
    ours: "transferStreamNumber",
    note: "UCM counts these threads per GPU; here they are the engine's, for every GPU of the node together",
  },
  posix_open_concurrency: noEffect(count, AIO),
  posix_commit_concurrency: noEffect(count, AIO),
  posix_lookup_concurrency: noEffect(count, "lookups run on the engine's own lookup threads, each answered within lookupTimeoutMs"),
  posix_capacity_gb: {
    kind: "number",
    min: 0,
    ours: "capacity",
    scale: GIB,
    note: "GiB, as in UCM; 0 is no limit. Every engine writing the directory shares it, so each may set it (UCM asks for one instance only)",
  },
  posix_gc_trigger_threshold_ratio: noEffect(ratio, GC),
  posix_gc_recycle_percent: noEffect(ratio, GC),
  posix_gc_max_recycle_count_per_shard: noEffect(count, GC),
  posix_gc_shard_sample_ratio: noEffect(ratio, GC),
  posix_gc_check_interval_sec: noEffect(count, GC),
  posix_gc_concurrency: noEffect(count, GC),
  posix_gc_task_timeout_ms: noEffect({ kind: "int", min: 0 }, GC),
  posix_gc_precise_mode: noEffect(flag, GC),
  store_health: {
    kind: "mapping",
    keys: {
      enabled: { kind: "bool", ours: "storeHealth" },
      health_check_interval_s: { kind: "int", min: 1, ours: "healthCheckIntervalS" },
      health_check_timeout_s: { kind: "int", min: 1, ours: "healthCheckTimeoutS" },
      health_window_size: { kind: "int", min: 1, ours: "healthWindowSize" },
      failure_threshold: { kind: "int", min: 1, ours: "healthFailureThreshold" },
    },
  },
  use_gdr: noEffect(flag, "GPU blocks move through pinned host staging (pinnedStagingBytes); GPUDirect RDMA is not used"),
  waiting_queue_depth: noEffect(count, QUEUE),
  running_queue_depth: noEffect(count, QUEUE),
  ...Object.fromEntries(
    [
      "local_hostname",
      "master_server_address",
      "metadata_server",
      "protocol",
      "global_segment_size_gb",
      "replica_num",
      "share_buffer_capacity_gb",
    ].map((k) => [k, noEffect({ kind: "any" }, MOONCAKE)]),
  ),
  ...Object.fromEntries(
    [
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
    ].map((k) => [`yuanrong_${k}`, noEffect({ kind: "any" }, YUANRONG)]),
  ),
};

const WHOLE_FILE = "the engine reads and writes each block file in one I/O of the whole block, whatever the shard size";
const OWN_STAGING = "each engine transfer thread has its own staging buffer (pinnedStagingBytes bounds GPU staging)";
const ALWAYS_EVICTS = "eviction is always on when capacity (storage_capacity) is set, and off without it";
const THRESHOLDS = "eviction runs from 95 % of the capacity down to 85 % (70 % after writes were refused for room)";
const LRU = "eviction always picks the least recently used blocks (file mtime, refreshed by every load)";
const CALLER = "it describes the process that builds UCM's store object (its role, device or block size), not the store";

/** The flat key names of UCM's v0.1.0 NFS store (UcmNfsStore's config dict), still accepted in ucm_connector_config. */
export const UCM_V010_KEYS: Record<string, UcmKey> = {
  stream_number: { kind: "int", min: 1, ours: "transferStreamNumber" },
  use_direct: { kind: "bool01", ours: "odirect" },
  useDirect: { kind: "bool01", ours: "odirect" },
  transferIoDirect: { kind: "bool01", ours: "odirect" },
  storage_capacity: { kind: "size", ours: "capacity", note: "bytes; 0 is no limit, as in UCM" },
  storageCapacity: { kind: "size", ours: "capacity", note: "bytes; 0 is no limit, as in UCM" },
  transferTimeoutMs: { kind: "int", min: 1, ours: "loadTimeoutMs" },
  io_size: noEffect({ kind: "any" }, WHOLE_FILE),
  transferIoSize: noEffect({ kind: "any" }, WHOLE_FILE),
  buffer_number: noEffect({ kind: "any" }, OWN_STAGING),
  transferBufferNumber: noEffect({ kind: "any" }, OWN_STAGING),
  recycle_enable: noEffect({ kind: "any" }, ALWAYS_EVICTS),
  recycleEnable: noEffect({ kind: "any" }, ALWAYS_EVICTS),
  recycle_threshold_ratio: noEffect({ kind: "any" }, THRESHOLDS),
  recycleThresholdRatio: noEffect({ kind: "any" }, THRESHOLDS),
  hotnessEnable: noEffect({ kind: "any" }, LRU),
  hotnessInterval: noEffect({ kind: "any" }, LRU),
  tempDumpDirEnable: noEffect({ kind: "any" }, "blocks are always written to a temporary file and renamed into place on commit"),
  role: noEffect({ kind: "any" }, CALLER),
  device: noEffect({ kind: "any" }, CALLER),
  transferDeviceId: noEffect({ kind: "any" }, CALLER),
  transferEnable: noEffect({ kind: "any" }, CALLER),
  kv_block_size: noEffect({ kind: "any" }, CALLER),
  kvcacheBlockSize: noEffect({ kind: "any" }, CALLER),
};

/** A key of ucm_connector_config as UCM names it (today's names first). */
export function ucmConnectorKey(k: string): UcmKey | undefined {
  return Object.hasOwn(UCM_CONNECTOR_KEYS, k) ? UCM_CONNECTOR_KEYS[k] : Object.hasOwn(UCM_V010_KEYS, k) ? UCM_V010_KEYS[k] : undefined;
}

/** The value of a UCM key as UCM would take it, converted to ours (bool01 -> boolean, GiB -> bytes); throws naming the key. */
export function checkUcmValue(name: string, spec: UcmKey, v: unknown): unknown {
  const range = () => (spec.max !== undefined ? `from ${spec.min} to ${spec.max}` : `of at least ${spec.min}`);
  switch (spec.kind) {
    case "bool":
      if (typeof v !== "boolean") throw new ConfigError(`${name} must be true or false, got ${show(v)}`);
      return v;
    case "bool01":
      if (typeof v === "boolean") return v;
      if (v === 0 || v === 1) return v === 1;
      throw new ConfigError(`${name} must be true, false, 1 or 0, got ${show(v)}`);
    case "int":
      if (typeof v !== "number" || !Number.isInteger(v) || v < (spec.min ?? -Infinity) || v > (spec.max ?? Infinity))
        throw new ConfigError(`${name} must be an integer ${range()}, got ${show(v)}`);
      return v * (spec.scale ?? 1);
    case "number":
      if (typeof v !== "number" || !Number.isFinite(v) || v < (spec.min ?? -Infinity) || v > (spec.max ?? Infinity))
        throw new ConfigError(`${name} must be a number ${range()}, got ${show(v)}`);
      return spec.scale ? Math.floor(v * spec.scale) : v;
    case "string":
      if (typeof v !== "string") throw new ConfigError(`${name} must be a string, got ${show(v)}`);
      if (spec.values && !spec.values.includes(v))
        throw new ConfigError(`${name} must be one of ${spec.values.map(show).join(", ")}, got ${show(v)}`);
      return v;
    case "size":
      if (parseSize(v) === undefined)
        throw new ConfigError(`${name} must be a size in bytes such as 500GiB, or 0 for unlimited, got ${show(v)}`);
      return v;
    case "mapping": {
      if (v === null || typeof v !== "object" || Array.isArray(v)) throw new ConfigError(`${name} must be a mapping, got ${show(v)}`);
      for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
        const sub = spec.keys?.[k];
        if (!sub || !Object.hasOwn(spec.keys!, k)) throw unknownKey(`${name}.${k}`, x);
        checkUcmValue(`${name}.${k}`, sub, x);
      }
      return v;
    }
    case "any":
      return v;
  }
}

export function unknownKey(name: string, v: unknown): ConfigError {
  return new ConfigError(
    `unknown key ${name} (value ${show(v)}): neither this store nor UCM documents it; every key: docs/configuration.md`,
  );
}

/** The line an accepted key with no effect here logs at start (python_shim/ucm/ucm_keys.py writes the same). */
export function noEffectNote(name: string, v: unknown, why: string): string {
  return `${name}: ${show(v)} accepted, no effect here: ${why}`;
}

/** Checks the top-level keys of a config document besides `structural` ones: UCM's are noted, any other is an error. */
export function topLevelNotes(doc: Record<string, unknown>, structural: string[], at: (k: string) => string): string[] {
  const notes: string[] = [];
  for (const [k, v] of Object.entries(doc)) {
    if (structural.includes(k)) continue;
    const spec = Object.hasOwn(UCM_TOP_KEYS, k) ? UCM_TOP_KEYS[k] : undefined;
    if (!spec) throw unknownKey(at(k), v);
    if (v === undefined || v === null) continue; // left empty: UCM's default
    checkUcmValue(at(k), spec, v);
    notes.push(noEffectNote(at(k), v, spec.why!));
  }
  return notes;
}

export interface Translated {
  /** ucm_connector_config with every UCM key replaced by the option it sets (those with no effect left out). */
  raw: Record<string, unknown>;
  /** our option -> the UCM key that set it, for messages about its value */
  origin: Record<string, string>;
  notes: string[];
  cacheBufferBytes?: number;
  storePipeline?: string;
}

/** Capacity values as byte lists, for comparing two spellings of it (undefined: not a size, for the option's own check to refuse). */
function capacityBytes(v: unknown): number[] | undefined {
  const sizes = (Array.isArray(v) ? v : [v]).map(parseSize);
  return sizes.some((n) => n === undefined) ? undefined : (sizes as number[]);
}

function same(ours: string, a: unknown, b: unknown): boolean {
  if (ours === "capacity") {
    const [x, y] = [capacityBytes(a), capacityBytes(b)];
    return !x || !y || new Set([...x, ...y]).size === 1;
  }
  return JSON.stringify(a) === JSON.stringify(b);
}

/**
 * ucm_connector_config (at path `section`) with UCM's keys turned into ours. `ourKeys`: our own option names, which
 * pass as they are. Two keys that set one option to different values stop startup, naming both.
 */
export function translateConnectorConfig(
  cc: Record<string, unknown>,
  connectorName: string,
  section: string,
  ourKeys: Set<string>,
): Translated {
  const out: Translated = { raw: {}, origin: {}, notes: [] };
  const given: Record<string, { from: string; value: unknown; converted: unknown }> = {};
  const name = (k: string) => `${section}.${k}`;
  const set = (ours: string, from: string, value: unknown, converted: unknown) => {
    const prev = given[ours];
    if (prev && !same(ours, prev.converted, converted))
      throw new ConfigError(`${section} sets ${ours} twice: ${prev.from}=${show(prev.value)} and ${from}=${show(value)}`);
    if (prev) return; // the same value twice: the first spelling stands
    given[ours] = { from, value, converted };
    out.raw[ours] = converted;
    if (from !== ours) out.origin[ours] = from;
  };
  for (const [k, v] of Object.entries(cc)) {
    const spec = ourKeys.has(k) ? undefined : ucmConnectorKey(k);
    if (!ourKeys.has(k) && !spec) throw unknownKey(name(k), v);
    if (v === undefined || v === null) continue; // as our options: an empty value is the default
    if (!spec) {
      set(k, k, v, v);
      continue;
    }
    if (k === "store_pipeline") {
      if (typeof v !== "string" || !STORE_PIPELINES.includes(v))
        throw new ConfigError(
          `${name(k)} is ${show(v)}, which this store does not provide; accepted: ${STORE_PIPELINES.map(show).join(", ")}`,
        );
      out.storePipeline = v;
      if (v.startsWith("Cache|")) out.notes.push(`${name(k)}: ${show(v)}: ${CACHE_STAGE}`);
      continue;
    }
    const converted = checkUcmValue(name(k), spec, v);
    if (spec.ours) set(spec.ours, k, v, converted);
    // store_health: each of its keys sets one of ours (checked above).
    for (const [sub, x] of spec.kind === "mapping" ? Object.entries(v as Record<string, unknown>) : []) {
      const subSpec = spec.keys![sub];
      if (subSpec.ours && x !== null && x !== undefined)
        set(subSpec.ours, `${k}.${sub}`, x, checkUcmValue(name(`${k}.${sub}`), subSpec, x));
    }
    if (spec.field === "cacheBufferBytes") out.cacheBufferBytes = converted as number;
    if (spec.why) out.notes.push(noEffectNote(name(k), v, spec.why));
  }
  if (connectorName === "UcmPipelineStore" && out.storePipeline === undefined)
    throw new ConfigError(
      `${name("store_pipeline")} is required with ucm_connector_name "UcmPipelineStore": ${STORE_PIPELINES.map(show).join(" or ")}`,
    );
  return out;
}

export interface UcmKeyRow {
  section: "top" | "connector" | "store_health" | "v0.1.0";
  keys: string[];
  effect: string;
}

/** What docs/configuration.md tabulates: each UCM key (keys with the same effect in one row) and what it does here. */
export function ucmKeyRows(): UcmKeyRow[] {
  const rows: UcmKeyRow[] = [];
  const add = (section: UcmKeyRow["section"], k: string, effect: string) => {
    const row = rows.find((r) => r.section === section && r.effect === effect);
    if (row) row.keys.push(k);
    else rows.push({ section, keys: [k], effect });
  };
  const effect = (k: string, spec: UcmKey): string => {
    if (k === "store_pipeline")
      return `required with UcmPipelineStore: ${STORE_PIPELINES.map((p) => `\`${p}\``).join(" or ")} (any other of UCM's pipelines stops startup, naming the value); with \`Cache|Posix\`, ${CACHE_STAGE} (with \`Posix\`, none)`;
    if (spec.field === "cacheBufferBytes")
      return "with `Cache|Posix`, sets `hostCacheBytes` (GiB, 0 or more; 0 or absent: 4 GiB or a quarter of the host's memory, the smaller); with `Posix`, no effect";
    if (spec.ours) return `sets \`${spec.ours}\`${spec.note ? `: ${spec.note}` : ""}`;
    if (spec.kind === "mapping") return "a mapping: each of its keys (below) sets one of ours";
    return `accepted, no effect here: ${spec.why}`;
  };
  for (const [k, spec] of Object.entries(UCM_TOP_KEYS)) add("top", k, effect(k, spec));
  add("connector", "storage_backends", "the same key here (directories, ':'-separated; a list of directories is taken too)");
  for (const [k, spec] of Object.entries(UCM_CONNECTOR_KEYS)) {
    add("connector", k, effect(k, spec));
    if (spec.keys) for (const [sub, subSpec] of Object.entries(spec.keys)) add("store_health", sub, effect(sub, subSpec));
  }
  for (const [k, spec] of Object.entries(UCM_V010_KEYS)) add("v0.1.0", k, effect(k, spec));
  return rows;
}
