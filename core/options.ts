// The engine's settings: every option of ucm_connector_config, its type,
// range, default and meaning, in one table (OPTIONS), and the settled
// EngineConfig they become. This table is the one source of the defaults: the
// native addon takes every option from it explicitly (core/native.ts),
// `ucm-engine --help` lists it (optionRows), docs/configuration.md is
// generated from it (scripts/gen_config_doc.js; test/docs.test.ts fails when
// they differ), and the Python shim checks its own copy of the client
// timeouts against it (test/python/test_config.py). config.ts reads and
// validates a config file against it.
import { LogLevel } from "./log";

export interface EngineConfig {
  /** Directories blocks are spread over, by key. */
  storageBackends: string[];
  /** The raw storage_backends string (the default endpoint derives from it). */
  storageBackendsRaw: string;
  /** Transfer streams: storage reads and writes in flight at once (up to two native threads each). */
  transferStreamNumber: number;
  /** ZeroMQ endpoint, ipc:// or tcp://127.0.0.1. */
  endpoint: string;
  odirect: boolean;
  fsync: boolean;
  maxBlockBytes: number;
  logLevel: LogLevel;
  maxKeysPerRequest: number;
  /** Seconds a dumped block may wait for its commit before it is discarded. */
  uncommittedTimeoutS: number;
  /** Seconds a lookup hit is remembered without asking the filesystem again. */
  lookupCacheTtlS: number;
  /** Seconds SIGTERM waits for running tasks before cancelling them. */
  shutdownTimeoutS: number;
  /** Milliseconds between checks that client processes are still alive. */
  clientCheckMs: number;
  /** Read by the Python shim: deadline of one request to the engine. */
  clientTimeoutMs: number;
  /** Read by the Python shim: how long a load may take before its blocks count as failed. */
  loadTimeoutMs: number;
  /** Read by the Python shim: load asynchronously (the request waits outside the batch). */
  loadAsync: boolean;
  /** Read by the Python shim: a user, besides the client's own and root, whose engine it may use. */
  engineUid: number;
  /** Bytes each backend directory may hold, one per backend (0: unlimited). */
  capacity: number[];
  /** Block files used within this many seconds are never evicted. */
  evictionGraceS: number;
  /** Milliseconds between updates of the shared usage ledger. */
  capacitySyncMs: number;
  /** Seconds between full rescans that repair the ledger (0: only when evicting). */
  capacityRescanS: number;
  /** Dump bytes submitted and not yet written, above which new dumps are dropped. */
  maxInflightBytes: number;
  /** Milliseconds a dumped block may wait in the queue before it is dropped (0: no limit). */
  maxQueueMs: number;
  /** Store a block only the second time a dump asks for it. */
  admitOnSecondSight: boolean;
  /** Prometheus endpoint port (0: off). */
  metricsPort: number;
  /** Address the metrics endpoint listens on. */
  metricsHost: string;
  /** Unix socket path of a metrics endpoint only the engine's user can read ("" = none). */
  metricsSocket: string;
  /** Pinned host staging for GPU blocks, all transfer streams together (one share a stream). */
  pinnedStagingBytes: number;
  /** How GPU shards are gathered and scattered. */
  cudaCopy: string;
  /** Milliseconds a GPU dump waits for the client's CUDA event before the block fails. */
  cudaEventTimeoutMs: number;
  /** Client connections at which the engine stops accepting new ones (0: from the open-file limit). */
  maxConnections: number;
  /** Seconds a connection whose process has no session may stay open (ipc). */
  idleConnectionS: number;
  /** Seconds a connection may stay silent after the engine's heartbeat before it is closed. */
  heartbeatTimeoutS: number;
  /** Connections one process may hold (ipc). */
  maxConnectionsPerProcess: number;
  /** Sessions (hello) one process may hold at once. */
  maxSessionsPerProcess: number;
  /** Namespaces new to the engine one client may bring in. */
  maxNamespacesPerClient: number;
  /** Keys x namespaces one lookup may check. */
  maxLookupKeys: number;
  /** Milliseconds a lookup may wait for the filesystem before its unanswered keys count as misses. */
  lookupTimeoutMs: number;
  /** The circuit breaker in front of the storage directories (core/health.ts). */
  storeHealth: boolean;
  /** Seconds between probes of the storage directories while the breaker is open. */
  healthCheckIntervalS: number;
  /** Seconds a probe waits for every storage directory to answer. */
  healthCheckTimeoutS: number;
  /** Operations whose outcomes the breaker weighs (the last ones). */
  healthWindowSize: number;
  /** Failures among those that open the breaker. */
  healthFailureThreshold: number;
  /** Memory regions one client may have registered. */
  maxRegionsPerClient: number;
  /** Bytes of memory one client may have registered. */
  maxRegionBytesPerClient: number;
  /** Files 0660 and directories 02770 (a group's engines share the store) instead of 0600 and 0700. */
  shareWithGroup: boolean;
  /** UCM's store_pipeline when the config names one ("Cache|Posix" or "Posix"; ucm_keys.ts). */
  storePipeline?: string;
  /** UCM's cache_buffer_capacity_gb in bytes, when given: with store_pipeline "Cache|Posix", hostCacheBytes (config.ts). */
  cacheBufferBytes?: number;
  /** Host memory of the Cache stage, a tier in front of the directories shared by every client (0: none). */
  hostCacheBytes: number;
  /** A dump is answered once its bytes are in the Cache stage; its file is written after (needs hostCacheBytes). */
  writeBehind: boolean;
}

interface OptionSpec {
  key: keyof EngineConfig;
  kind: "int" | "bool" | "string" | "level" | "size" | "sizes";
  min?: number;
  max?: number;
  dflt: number | boolean | string;
  /** One line: what `ucm-engine --help` prints, and the reference's first sentence. */
  doc: string;
  /** More for docs/configuration.md only: consequences, interactions, what the tests showed. */
  details?: string;
}

/** Every optional key of ucm_connector_config, with its default (docs/configuration.md is generated from it). */
export const OPTIONS: Record<string, OptionSpec> = {
  transferStreamNumber: {
    key: "transferStreamNumber",
    kind: "int",
    min: 1,
    max: 1024,
    dflt: 32,
    doc: "transfer streams: block reads and writes in flight to storage at once (up to two native threads each)",
    details:
      "As fio's numjobs. Each stream has a native thread and, while the engine has CPUs for it, a second one that prepares the next block (gathers, checksums, creates the file; or verifies and scatters the last one) while the first reads or writes; ucm_storage_busy_seconds_total over this number says how busy storage is kept.",
  },
  endpoint: {
    key: "endpoint",
    kind: "string",
    dflt: "",
    doc: "ZeroMQ endpoint, ipc://<absolute path> or tcp://127.0.0.1:<port>; empty: ipc://<runtime base>/<12 hex of sha256(storage_backends)>/engine.sock",
    details:
      "The runtime base is $XDG_RUNTIME_DIR/ucm when XDG_RUNTIME_DIR is a directory of this user nobody else may enter, else /tmp/ucm-<uid>. An ipc path has at most 102 bytes (the credential socket <path>.cred sits beside it). The socket directory is created 0700; an existing one must be this user's or root's and writable by nobody else (not even sticky like /tmp: anybody could bind the name there first), its parent the same or sticky; modes of existing directories are left alone. The socket is 0600. On tcp the engine speaks CURVE and publishes its public key to /tmp/ucm-<uid>/tcp-127.0.0.1-<port>.curve (0600, removed when it stops): only its own user's clients are served; connections of other users are closed at once, any without the key after 5 s (docs/reliability.md, threat model). The engine cannot learn a tcp client's pid, so it maps no /proc/<pid>/fd/<n> region for it: the shim's CPU tensors, shared by descriptor, are refused there (that client runs without the store, saying why); GPU memory and named shared memory work. Use ipc for vLLM on CPU. An engine run by a supervisor should name its endpoint (docs/operations.md).",
  },
  odirect: {
    key: "odirect",
    kind: "bool",
    dflt: true,
    doc: "O_DIRECT block I/O, dropped where the filesystem refuses it",
    details:
      "O_DIRECT works on NFS 4.2 and 3 (the NFS suite checks the client's own counters); tmpfs, overlayfs and some NFS servers refuse it, and the engine then writes through the page cache.",
  },
  fsync: { key: "fsync", kind: "bool", dflt: false, doc: "fdatasync every block file before it counts as written" },
  maxBlockBytes: {
    key: "maxBlockBytes",
    kind: "int",
    min: 4096,
    max: 2 ** 40,
    dflt: 2 ** 30,
    doc: "largest block payload accepted, bytes",
    details: "Each transfer worker's staging buffer grows to the largest block it has seen, up to this.",
  },
  logLevel: { key: "logLevel", kind: "level", dflt: "info", doc: "debug, info, warn or error" },
  maxKeysPerRequest: {
    key: "maxKeysPerRequest",
    kind: "int",
    min: 1,
    max: 1 << 20,
    dflt: 65536,
    doc: "keys one request may name",
    details: "A request naming more is refused (too_large) before any work.",
  },
  uncommittedTimeoutS: {
    key: "uncommittedTimeoutS",
    kind: "int",
    min: 1,
    max: 86400,
    dflt: 600,
    doc: "a dumped block not committed within this many seconds is discarded",
    details:
      "Checked every 10 s, logged and counted; a later commit of it answers false. Temporary files of writers on other hosts are removed only when older than twice this.",
  },
  lookupCacheTtlS: {
    key: "lookupCacheTtlS",
    kind: "int",
    min: 0,
    max: 86400,
    dflt: 60,
    doc: "a block seen committed is trusted this long without a stat (0: always stat)",
    details:
      "Blocks another node deleted meanwhile are then a load miss (not_found, recomputed), never an error; an emptied storage directory is answered from this cache for up to this long (docs/reliability.md).",
  },
  shutdownTimeoutS: {
    key: "shutdownTimeoutS",
    kind: "int",
    min: 0,
    max: 3600,
    dflt: 30,
    doc: "on SIGINT or SIGTERM, how long running tasks may finish before they are cancelled",
    details: "A supervisor's stop timeout must exceed it (systemd's TimeoutStopSec: docs/operations.md).",
  },
  clientCheckMs: {
    key: "clientCheckMs",
    kind: "int",
    min: 50,
    max: 600000,
    dflt: 2000,
    doc: "how often the engine checks that client processes are alive, ms",
    details: "A client whose process is gone loses its regions, tasks and uncommitted blocks.",
  },
  clientTimeoutMs: {
    key: "clientTimeoutMs",
    kind: "int",
    min: 1,
    max: 600000,
    dflt: 5000,
    doc: "(read by the Python shim) deadline of one request to the engine, ms; past it the connector counts a miss",
    details: "A shim whose config leaves it out takes the running engine's value from its hello reply.",
  },
  loadTimeoutMs: {
    key: "loadTimeoutMs",
    kind: "int",
    min: 1,
    max: 3600000,
    dflt: 30000,
    doc: "(read by the Python shim) how long a load may take before its blocks are recomputed, ms",
    details:
      "Taken from the running engine like clientTimeoutMs when the shim's config leaves it out. A load that outlives it is cancelled first; its blocks are reported failed only once the engine acknowledged the cancel, its process is gone, or the load's deadline passed.",
  },
  loadAsync: {
    key: "loadAsync",
    kind: "bool",
    dflt: false,
    doc: "(read by the Python shim) load asynchronously: a request waits outside the batch while its blocks load, instead of the forward pass waiting for them",
    details:
      "kv_connector_extra_config's ucm_load_async overrides it. Unlike the two timeouts it is never taken from the engine: the scheduler and the workers decide with it in different processes, so it stays what the config says.",
  },
  engineUid: {
    key: "engineUid",
    kind: "int",
    min: 0,
    max: 2 ** 32 - 1,
    dflt: 0,
    doc: "(read by the Python shim) a user, besides the client's own and root, whose engine the shim may use; 0 = none",
    details:
      "Its socket, the directories leading to it and the process serving it may then belong to that uid (docs/reliability.md, threat model).",
  },
  capacity: {
    key: "capacity",
    kind: "sizes",
    dflt: 0,
    doc: "bytes each backend directory may hold, for every engine writing there together; 0 = unlimited",
    details:
      "500GiB, 1.5TB, 64M (binary unless KB/MB/GB/TB) or a plain integer; one value for every backend or a list with one per backend. Minimum 16 MiB. Eviction and what counts: docs/capacity.md.",
  },
  evictionGraceS: {
    key: "evictionGraceS",
    kind: "int",
    min: 0,
    max: 86400,
    dflt: 10,
    doc: "blocks used (written or loaded) within this many seconds are never evicted",
  },
  capacitySyncMs: {
    key: "capacitySyncMs",
    kind: "int",
    min: 10,
    max: 60000,
    dflt: 500,
    doc: "how often an engine sends its changes to the shared usage ledger and reads everybody's total, ms",
    details:
      "Sooner after 1/64 of the capacity changed. Without a capacity the ledger is still kept, for the figures: changes are sent at this pace, the total read every 30 s.",
  },
  capacityRescanS: {
    key: "capacityRescanS",
    kind: "int",
    min: 0,
    max: 604800,
    dflt: 3600,
    doc: "how often a directory with a capacity is rescanned to repair the usage ledger, s (0 = only when evicting)",
  },
  maxInflightBytes: {
    key: "maxInflightBytes",
    kind: "size",
    min: 1 << 20,
    max: 2 ** 50,
    dflt: 4 * 2 ** 30,
    doc: "dump bytes accepted and not yet written; a dump beyond it is dropped (status dropped), never queued",
  },
  maxQueueMs: {
    key: "maxQueueMs",
    kind: "int",
    min: 0,
    max: 3600000,
    dflt: 5000,
    doc: "a dumped block still waiting for a transfer thread after this many ms is dropped (0 = no limit)",
    details: "Checked when a thread picks the block up, so a slow disk sheds the backlog instead of growing it. Loads are never shed.",
  },
  admitOnSecondSight: {
    key: "admitOnSecondSight",
    kind: "bool",
    dflt: false,
    doc: "store a block only the second time it is dumped (the first dump is dropped and remembered)",
    details: "Spares SSD wear on prompts that never repeat.",
  },
  metricsPort: {
    key: "metricsPort",
    kind: "int",
    min: 0,
    max: 65535,
    dflt: 0,
    doc: "port of the Prometheus endpoint GET /metrics on metricsHost; 0 = off",
    details:
      "Every local user can read a tcp port; metricsSocket keeps the figures to the engine's user. A port already in use is logged and the engine serves on. The metrics: docs/operations.md.",
  },
  metricsHost: {
    key: "metricsHost",
    kind: "string",
    dflt: "127.0.0.1",
    doc: "address the metrics endpoint listens on",
  },
  metricsSocket: {
    key: "metricsSocket",
    kind: "string",
    dflt: "",
    doc: "absolute path of a unix socket serving the same GET /metrics, mode 0600; empty = none",
    details:
      "In a directory of the engine's user (created 0700 if missing): only that user and root read it (a scraper running as that user, or a local proxy). curl --unix-socket <path> http://localhost/metrics reads it.",
  },
  hostCacheBytes: {
    key: "hostCacheBytes",
    kind: "size",
    min: 0,
    max: 2 ** 50,
    dflt: 0,
    doc: "host memory of the Cache stage: a tier in front of the directories, shared by every client of the engine (0 = none)",
    details:
      "Dumped blocks stay there once committed and loaded blocks once verified; a load of a block it holds is one copy from it (no read, no checksum pass), the least recently used go first. The memory is prepared in the background once the block size is known (vLLM's registration, or the first block), leaving at least an eighth of the host's memory available (docs/cache_stage.md). UCM's store_pipeline \"Cache|Posix\" turns it on with cache_buffer_capacity_gb (docs/configuration.md). Without writeBehind a dump is answered once its file is written.",
  },
  writeBehind: {
    key: "writeBehind",
    kind: "bool",
    dflt: false,
    doc: 'answer a dump once its bytes are in the Cache stage and write its file after (on by default with store_pipeline "Cache|Posix")',
    details:
      'Needs hostCacheBytes. A committed block is served and found from host memory at once; other engines see it once its file is written and renamed. The transfer streams write when no load or dump waits; a block the tier evicts before its write began is shed (never written, counted in `ucm-engine stats` and ucm_tier_write_behind_total{event="shed"}). SIGTERM writes what it can within shutdownTimeoutS; a crash loses the blocks not written yet and never leaves a partial file under a block\'s name. A dump larger than the tier can hold is written before it is answered, as without this option (docs/cache_stage.md).',
  },
  pinnedStagingBytes: {
    key: "pinnedStagingBytes",
    kind: "size",
    min: 1 << 20,
    max: 2 ** 44,
    dflt: 2 * 2 ** 30,
    doc: "pinned host staging for GPU blocks, all transfer streams together (one equal share a stream, allocated once)",
    details:
      "A GPU block borrows a stream's share from its gather to its write (or from its read to its scatter) and must fit in one: at 32 streams, 64 MiB. Each share is allocated with the block's GPU current, so no context is made on a GPU the engine does not use.",
  },
  cudaCopy: {
    key: "cudaCopy",
    kind: "string",
    dflt: "batch",
    doc: "how a GPU block's shards move: batch or kernel",
    details:
      "batch: one cudaMemcpyBatchAsync per block, on the copy engines, so vLLM keeps every SM; where the driver lacks the call, or the call fails to start a copy, the engine switches to the kernel once, with a log line naming CUDA's error. kernel: one gather/scatter kernel launch per block over mapped pinned memory. Any value but these two stops startup.",
  },
  shareWithGroup: {
    key: "shareWithGroup",
    kind: "bool",
    dflt: false,
    doc: "engines of several users in one group share the store: block files 0660, directories 02770 (default 0600 and 0700)",
    details:
      "The storage directories may then be group-writable (never world-writable); each must belong to the engine's user, and the engine refuses to start otherwise. Every member of the group is trusted with the data as the engine's user is (docs/reliability.md, threat model).",
  },
  maxConnections: {
    key: "maxConnections",
    kind: "int",
    min: 0,
    max: 1 << 20,
    dflt: 0,
    doc: "connections at which those of processes without a session are closed at once; 0 = a quarter of the open-file limit, at most 4096",
    details: "The engine raises its soft open-file limit to the hard limit at start.",
  },
  maxConnectionsPerProcess: {
    key: "maxConnectionsPerProcess",
    kind: "int",
    min: 1,
    max: 1 << 16,
    dflt: 64,
    doc: "connections one client process may hold; the engine closes the extra ones (ipc endpoints)",
  },
  maxSessionsPerProcess: {
    key: "maxSessionsPerProcess",
    kind: "int",
    min: 1,
    max: 1 << 16,
    dflt: 16,
    doc: "sessions (hello) one client process may hold at once, so the per-client quotas cannot be multiplied",
  },
  maxNamespacesPerClient: {
    key: "maxNamespacesPerClient",
    kind: "int",
    min: 1,
    max: 1 << 20,
    dflt: 64,
    doc: "namespaces new to the engine one client (session) may bring in, by namespace or dump",
    details:
      "Each takes about 1 MiB of directories and its description (at most 16 KiB as JSON) for good, which evicting blocks never frees.",
  },
  idleConnectionS: {
    key: "idleConnectionS",
    kind: "int",
    min: 1,
    max: 86400,
    dflt: 60,
    doc: "a connection whose process has no session (never said hello) is closed after this many seconds (ipc endpoints)",
  },
  heartbeatTimeoutS: {
    key: "heartbeatTimeoutS",
    kind: "int",
    min: 1,
    max: 3600,
    dflt: 30,
    doc: "a connection from which nothing arrives for this many seconds after the engine's ZeroMQ heartbeat is closed (and its session with it): a peer stopped halfway through a message frees what it sent; a live client's ZeroMQ answers by itself",
  },
  lookupTimeoutMs: {
    key: "lookupTimeoutMs",
    kind: "int",
    min: 1,
    max: 600000,
    dflt: 1000,
    doc: "a lookup the filesystem has not answered within this many ms (a hung NFS server) answers its keys as misses",
    details:
      "Lookups run on threads of their own, so commits and removals do not queue behind them. Measured on NFS with the server stopped: answered after 1.02 to 1.08 s (docs/nfs.md).",
  },
  storeHealth: {
    key: "storeHealth",
    kind: "bool",
    dflt: true,
    doc: "a circuit breaker in front of the storage directories: once healthFailureThreshold of the last healthWindowSize operations failed (lookups unanswered within lookupTimeoutMs, blocks that failed with an error of sick storage (EIO, ENOSPC, EROFS, ETIMEDOUT, ESTALE, ...) or missed their deadline, transfers still running at their deadline), the store is off (lookups miss, dumps and loads dropped at once) until a probe succeeds",
    details:
      "A hung or failing directory otherwise makes every step with a hit wait for its timeout. While the breaker is open, a probe (a small file created with O_EXCL, written, synced and removed in every storage directory) runs every healthCheckIntervalS; the first that ends within healthCheckTimeoutS closes it; a probe still stuck in a hung filesystem fails the next ones until it returns, so at most one thread waits on it. The engine logs when it opens and closes; `ucm-engine stats` and the metrics (ucm_store_health_open, ucm_store_health_opens_total, ucm_store_health_shed_total) show it. UCM's `store_health` keys (enabled, health_check_interval_s, health_check_timeout_s, health_window_size, failure_threshold) set the same. docs/reliability.md has the measurements.",
  },
  healthCheckIntervalS: {
    key: "healthCheckIntervalS",
    kind: "int",
    min: 1,
    max: 3600,
    dflt: 10,
    doc: "seconds between probes of the storage directories while the store-health breaker is open",
  },
  healthCheckTimeoutS: {
    key: "healthCheckTimeoutS",
    kind: "int",
    min: 1,
    max: 3600,
    dflt: 3,
    doc: "seconds a probe waits for every storage directory to answer (less than healthCheckIntervalS)",
  },
  healthWindowSize: {
    key: "healthWindowSize",
    kind: "int",
    min: 1,
    max: 100000,
    dflt: 8,
    doc: "the store-health breaker weighs the outcomes of this many last operations that reached the storage directories",
  },
  healthFailureThreshold: {
    key: "healthFailureThreshold",
    kind: "int",
    min: 1,
    max: 100000,
    dflt: 2,
    doc: "failures among the last healthWindowSize operations that open the store-health breaker (at most healthWindowSize)",
  },
  maxLookupKeys: {
    key: "maxLookupKeys",
    kind: "int",
    min: 1,
    max: 1 << 24,
    dflt: 262144,
    doc: "keys times namespaces one lookup may check; a costlier lookup is refused (too_large) before any work",
  },
  maxRegionsPerClient: {
    key: "maxRegionsPerClient",
    kind: "int",
    min: 1,
    max: 1 << 20,
    dflt: 4096,
    doc: "memory regions one client may have registered at once (each is a mapping in the engine)",
    details: "The engine also keeps all clients' regions below the kernel's map count (vm.max_map_count less 4096).",
  },
  maxRegionBytesPerClient: {
    key: "maxRegionBytesPerClient",
    kind: "size",
    min: 1 << 20,
    max: 2 ** 50,
    dflt: 4 * 2 ** 40,
    doc: "bytes of memory one client may have registered at once",
  },
  cudaEventTimeoutMs: {
    key: "cudaEventTimeoutMs",
    kind: "int",
    min: 1,
    max: 3600000,
    dflt: 30000,
    doc: "how long a GPU dump waits for the CUDA event of the forward pass that wrote its blocks before the block fails (io_error), ms",
    details: "The wait sleeps between polls (no core spins); a cancel or the request's deadline ends it at once.",
  },
};

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 2 ** 10,
  kib: 2 ** 10,
  m: 2 ** 20,
  mib: 2 ** 20,
  g: 2 ** 30,
  gib: 2 ** 30,
  t: 2 ** 40,
  tib: 2 ** 40,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
  tb: 1e12,
};

/** Bytes from an integer or a string such as "500GiB", "1.5TB", "64M"; undefined when not a size. */
export function parseSize(v: unknown): number | undefined {
  if (typeof v === "number") return Number.isSafeInteger(v) && v >= 0 ? v : undefined;
  if (typeof v !== "string") return undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(v);
  if (!m) return undefined;
  const unit = SIZE_UNITS[m[2].toLowerCase()];
  if (unit === undefined) return undefined;
  const n = Math.floor(parseFloat(m[1]) * unit);
  return Number.isSafeInteger(n) ? n : undefined;
}

/** The one key ucm_connector_config must have (no default, so not in OPTIONS), and what it means. */
export const REQUIRED_OPTIONS: Record<string, { values: string; doc: string; details: string }> = {
  storage_backends: {
    values: "directories, ':'-separated",
    doc: "a directory (local SSD or NFS mount), or several separated by ':'; blocks are spread over them by key",
    details:
      "Each must exist and be writable (checked by creating a probe), belong to the engine's user and be writable by nobody else (by its group with shareWithGroup); the engine refuses to start otherwise. Relative paths are resolved against the engine's working directory.",
  },
};

const BINARY_UNITS: Array<[string, number]> = [
  ["TiB", 2 ** 40],
  ["GiB", 2 ** 30],
  ["MiB", 2 ** 20],
  ["KiB", 2 ** 10],
];

/** A byte count as the config file may write it: the largest binary unit that divides it ("4GiB"), else bytes. */
export function formatSize(n: number): string {
  if (n > 0) for (const [u, f] of BINARY_UNITS) if (n % f === 0) return `${n / f}${u}`;
  return String(n);
}

/** An option's default as a config file would write it (parseConfig reads it back as the default). */
export function defaultText(spec: OptionSpec): string {
  if (spec.kind === "size" || spec.kind === "sizes") return formatSize(spec.dflt as number);
  if (spec.kind === "string") return JSON.stringify(spec.dflt);
  return String(spec.dflt);
}

/** The values an option accepts, in words. */
export function valuesText(spec: OptionSpec): string {
  switch (spec.kind) {
    case "int":
      return `integer, ${spec.min} to ${spec.max}`;
    case "bool":
      return "true or false";
    case "level":
      return "debug, info, warn or error";
    case "size":
      return `size, ${formatSize(spec.min ?? 0)} to ${formatSize(spec.max ?? 0)}`;
    case "sizes":
      return "size, or a list of one per backend";
    case "string":
      return "string";
  }
}

export interface OptionRow {
  key: string;
  /** "(required)" for storage_backends. */
  dflt: string;
  values: string;
  doc: string;
  details?: string;
}

/** Every key of ucm_connector_config, the required one first, then OPTIONS in its order: what --help lists and docs/configuration.md tabulates. */
export function optionRows(): OptionRow[] {
  const rows: OptionRow[] = Object.entries(REQUIRED_OPTIONS).map(([key, r]) => ({ key, dflt: "(required)", ...r }));
  for (const [key, spec] of Object.entries(OPTIONS))
    rows.push({ key, dflt: defaultText(spec), values: valuesText(spec), doc: spec.doc, details: spec.details });
  return rows;
}
