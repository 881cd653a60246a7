// The engine's settings: every option of ucm_connector_config, its type,
// range, default and meaning, in one table (OPTIONS), and the settled
// EngineConfig they become. This table is the one source of the defaults: the
// native addon takes every option from it explicitly (core/native.ts), the
// README's table mirrors it, and the Python shim checks its own copy of the
// client timeouts against it (test/python/test_config.py). config.ts reads
// and validates a config file against it.
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
  /** Memory regions one client may have registered. */
  maxRegionsPerClient: number;
  /** Bytes of memory one client may have registered. */
  maxRegionBytesPerClient: number;
  /** Files 0660 and directories 02770 (a group's engines share the store) instead of 0600 and 0700. */
  shareWithGroup: boolean;
}

interface OptionSpec {
  key: keyof EngineConfig;
  kind: "int" | "bool" | "string" | "level" | "size" | "sizes";
  min?: number;
  max?: number;
  dflt: number | boolean | string;
  doc: string;
}

/** Every optional key of ucm_connector_config, with its default. The README table mirrors this. */
export const OPTIONS: Record<string, OptionSpec> = {
  transferStreamNumber: {
    key: "transferStreamNumber",
    kind: "int",
    min: 1,
    max: 1024,
    dflt: 32,
    doc: "transfer streams: block reads and writes in flight to storage at once (up to two native threads each)",
  },
  endpoint: {
    key: "endpoint",
    kind: "string",
    dflt: "",
    doc: "ZeroMQ endpoint; default ipc:///tmp/ucm-<uid>/<digest of storage_backends>/engine.sock",
  },
  odirect: { key: "odirect", kind: "bool", dflt: true, doc: "O_DIRECT block I/O, dropped where the filesystem refuses it" },
  fsync: { key: "fsync", kind: "bool", dflt: false, doc: "fdatasync each block before it counts as written" },
  maxBlockBytes: { key: "maxBlockBytes", kind: "int", min: 4096, max: 2 ** 40, dflt: 2 ** 30, doc: "largest block accepted, bytes" },
  logLevel: { key: "logLevel", kind: "level", dflt: "info", doc: "debug, info, warn or error" },
  maxKeysPerRequest: { key: "maxKeysPerRequest", kind: "int", min: 1, max: 1 << 20, dflt: 65536, doc: "keys one request may name" },
  uncommittedTimeoutS: {
    key: "uncommittedTimeoutS",
    kind: "int",
    min: 1,
    max: 86400,
    dflt: 600,
    doc: "seconds a dumped block waits for commit before it is discarded",
  },
  lookupCacheTtlS: {
    key: "lookupCacheTtlS",
    kind: "int",
    min: 0,
    max: 86400,
    dflt: 60,
    doc: "seconds a found block is remembered without a stat",
  },
  shutdownTimeoutS: { key: "shutdownTimeoutS", kind: "int", min: 0, max: 3600, dflt: 30, doc: "seconds SIGTERM waits for running tasks" },
  clientCheckMs: {
    key: "clientCheckMs",
    kind: "int",
    min: 50,
    max: 600000,
    dflt: 2000,
    doc: "milliseconds between checks that clients are alive",
  },
  clientTimeoutMs: {
    key: "clientTimeoutMs",
    kind: "int",
    min: 1,
    max: 600000,
    dflt: 5000,
    doc: "(shim) deadline of one request to the engine",
  },
  loadTimeoutMs: {
    key: "loadTimeoutMs",
    kind: "int",
    min: 1,
    max: 3600000,
    dflt: 30000,
    doc: "(shim) how long a load may take before its blocks are recomputed",
  },
  loadAsync: { key: "loadAsync", kind: "bool", dflt: false, doc: "(shim) load KV asynchronously, outside the forward pass" },
  engineUid: {
    key: "engineUid",
    kind: "int",
    min: 0,
    max: 2 ** 32 - 1,
    dflt: 0,
    doc: "(shim) a user, besides the client's own and root, whose engine the shim may talk to (its socket and directories may belong to it); 0 = none",
  },
  capacity: {
    key: "capacity",
    kind: "sizes",
    dflt: 0,
    doc: "bytes each backend directory may hold, e.g. 500GiB (one value, or a list with one per backend); 0 = unlimited. Shared by every engine writing there",
  },
  evictionGraceS: {
    key: "evictionGraceS",
    kind: "int",
    min: 0,
    max: 86400,
    dflt: 10,
    doc: "blocks used within this many seconds are never evicted",
  },
  capacitySyncMs: {
    key: "capacitySyncMs",
    kind: "int",
    min: 10,
    max: 60000,
    dflt: 500,
    doc: "milliseconds between updates of the shared usage ledger",
  },
  capacityRescanS: {
    key: "capacityRescanS",
    kind: "int",
    min: 0,
    max: 604800,
    dflt: 3600,
    doc: "seconds between rescans that repair the usage ledger of a directory with a capacity (0 = only when evicting)",
  },
  maxInflightBytes: {
    key: "maxInflightBytes",
    kind: "size",
    min: 1 << 20,
    max: 2 ** 50,
    dflt: 4 * 2 ** 30,
    doc: "dump bytes accepted and not yet written; dumps beyond it are dropped",
  },
  maxQueueMs: {
    key: "maxQueueMs",
    kind: "int",
    min: 0,
    max: 3600000,
    dflt: 5000,
    doc: "a dumped block still queued after this many ms is dropped (0 = no limit)",
  },
  admitOnSecondSight: {
    key: "admitOnSecondSight",
    kind: "bool",
    dflt: false,
    doc: "store a block only the second time it is dumped (spares SSD wear)",
  },
  metricsPort: { key: "metricsPort", kind: "int", min: 0, max: 65535, dflt: 0, doc: "Prometheus /metrics port; 0 = off" },
  metricsHost: {
    key: "metricsHost",
    kind: "string",
    dflt: "127.0.0.1",
    doc: "address the metrics endpoint listens on (every local user can read a tcp port: see metricsSocket)",
  },
  metricsSocket: {
    key: "metricsSocket",
    kind: "string",
    dflt: "",
    doc: "absolute path of a unix socket serving GET /metrics, mode 0600 (only the engine's user and root read it), in a directory of that user; empty = none",
  },
  pinnedStagingBytes: {
    key: "pinnedStagingBytes",
    kind: "size",
    min: 1 << 20,
    max: 2 ** 44,
    dflt: 2 * 2 ** 30,
    doc: "pinned host staging for GPU blocks, all transfer streams together (one equal share a stream, allocated once)",
  },
  cudaCopy: {
    key: "cudaCopy",
    kind: "string",
    dflt: "batch",
    doc: "how GPU shards move: batch (cudaMemcpyBatchAsync on the copy engines, leaving the SMs to vLLM; kernel where the driver lacks it) or kernel (one gather/scatter kernel launch per block)",
  },
  shareWithGroup: {
    key: "shareWithGroup",
    kind: "bool",
    dflt: false,
    doc: "engines of several users in one group share the store: block files 0660, directories 02770, and the store directories may be group-writable (never world-writable); default: 0600 and 0700, only the engine's user",
  },
  maxConnections: {
    key: "maxConnections",
    kind: "int",
    min: 0,
    max: 1 << 20,
    dflt: 0,
    doc: "client connections at which those of processes without a session are closed at once (0 = a quarter of the open-file limit, at most 4096)",
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
    doc: "sessions (hello) one client process may hold at once; per-client quotas apply to each",
  },
  maxNamespacesPerClient: {
    key: "maxNamespacesPerClient",
    kind: "int",
    min: 1,
    max: 1 << 20,
    dflt: 64,
    doc: "namespaces new to the engine one client (session) may bring in, by namespace or dump: each takes about 1 MiB of directories for good",
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
  },
  maxLookupKeys: {
    key: "maxLookupKeys",
    kind: "int",
    min: 1,
    max: 1 << 24,
    dflt: 262144,
    doc: "keys times namespaces one lookup may check",
  },
  maxRegionsPerClient: {
    key: "maxRegionsPerClient",
    kind: "int",
    min: 1,
    max: 1 << 20,
    dflt: 4096,
    doc: "memory regions one client may have registered at once (each is a mapping in the engine)",
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
    doc: "a GPU dump waits this long for the CUDA event of the forward pass that wrote its blocks, then fails the block (the writer died, say)",
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
