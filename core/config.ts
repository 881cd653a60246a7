// The engine's configuration: the seed's YAML (single connector or list
// form), validated in one place with one table of defaults. Every error
// names the key path and the value it got.
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { parse as parseYaml } from "yaml";
import { LOG_LEVELS, LogLevel } from "./log";

export const CONNECTOR_NAME = "UcmNfsStore";

export interface EngineConfig {
  /** Directories blocks are spread over, by key. */
  storageBackends: string[];
  /** The raw storage_backends string (the default endpoint derives from it). */
  storageBackendsRaw: string;
  /** Native transfer threads. */
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
  /** Pinned host staging for GPU blocks, all transfer threads together. */
  pinnedStagingBytes: number;
  /** How GPU shards are gathered and scattered. */
  cudaCopy: string;
  /** Milliseconds a GPU dump waits for the client's CUDA event before the block fails. */
  cudaEventTimeoutMs: number;
  /** Client connections at which the engine stops accepting new ones (0: from the open-file limit). */
  maxConnections: number;
  /** Seconds a connection whose process has no session may stay open (ipc). */
  idleConnectionS: number;
  /** Connections one process may hold (ipc). */
  maxConnectionsPerProcess: number;
  /** Sessions (hello) one process may hold at once. */
  maxSessionsPerProcess: number;
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
  transferStreamNumber: { key: "transferStreamNumber", kind: "int", min: 1, max: 1024, dflt: 32, doc: "native transfer threads" },
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
  metricsHost: { key: "metricsHost", kind: "string", dflt: "127.0.0.1", doc: "address the metrics endpoint listens on" },
  pinnedStagingBytes: {
    key: "pinnedStagingBytes",
    kind: "size",
    min: 1 << 20,
    max: 2 ** 44,
    dflt: 2 * 2 ** 30,
    doc: "pinned host staging for GPU blocks, all transfer threads together (each gets an equal share, allocated once)",
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
  idleConnectionS: {
    key: "idleConnectionS",
    kind: "int",
    min: 1,
    max: 86400,
    dflt: 60,
    doc: "a connection whose process has no session (never said hello) is closed after this many seconds (ipc endpoints)",
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

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

function show(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

/**
 * The runtime directory for a storage_backends string: only this user may enter it. Named after the backends as
 * absolute paths (relative ones resolved against the working directory, as the engine resolves them), so a
 * relative path used from two directories names two stores and two engines, never one engine for both.
 * python_shim/ucm/config.py runtime_dir computes the same name.
 */
export function defaultRuntimeDir(storageBackendsRaw: string): string {
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  const absolute = storageBackendsRaw
    .split(":")
    .map((d) => path.resolve(d.trim()))
    .join(":");
  const digest = crypto.createHash("sha256").update(absolute).digest("hex").slice(0, 12);
  return path.join(os.tmpdir(), `ucm-${uid}`, digest);
}

export function defaultEndpoint(storageBackendsRaw: string): string {
  return `ipc://${path.join(defaultRuntimeDir(storageBackendsRaw), "engine.sock")}`;
}

export interface LoadedConfig {
  config: EngineConfig;
  warnings: string[];
}

export function loadConfigFile(file: string): LoadedConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (e) {
    throw new ConfigError(`cannot read config file ${show(file)}: ${(e as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (e) {
    throw new ConfigError(`config file ${show(file)} is not valid YAML: ${(e as Error).message}`);
  }
  return parseConfig(doc);
}

/** Validates a parsed config document (the seed's format or the list form). */
export function parseConfig(doc: unknown): LoadedConfig {
  const warnings: string[] = [];
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new ConfigError(`config must be a mapping with ucm_connector_name and ucm_connector_config, got ${show(doc)}`);
  }
  const top = doc as Record<string, unknown>;
  let connector: Record<string, unknown>;
  let where: string;
  if ("ucm_connectors" in top) {
    const list = top.ucm_connectors;
    if (!Array.isArray(list) || list.length === 0) throw new ConfigError(`ucm_connectors must be a non-empty list, got ${show(list)}`);
    const idx = list.findIndex((c) => c && typeof c === "object" && (c as Record<string, unknown>).ucm_connector_name === CONNECTOR_NAME);
    if (idx < 0) {
      const names = list.map((c) => (c && typeof c === "object" ? (c as Record<string, unknown>).ucm_connector_name : c));
      throw new ConfigError(`ucm_connectors has no entry with ucm_connector_name ${show(CONNECTOR_NAME)}; names found: ${show(names)}`);
    }
    connector = list[idx] as Record<string, unknown>;
    where = `ucm_connectors[${idx}]`;
    for (const k of Object.keys(top)) if (k !== "ucm_connectors") warnings.push(`unknown key ${k} ignored`);
  } else {
    connector = top;
    where = "";
  }
  const at = (k: string) => (where ? `${where}.${k}` : k);
  for (const k of Object.keys(connector)) {
    if (k !== "ucm_connector_name" && k !== "ucm_connector_config" && !(where === "" && k === "ucm_connectors"))
      warnings.push(`unknown key ${at(k)} ignored`);
  }
  const name = connector.ucm_connector_name;
  if (name !== CONNECTOR_NAME) throw new ConfigError(`${at("ucm_connector_name")} must be ${show(CONNECTOR_NAME)}, got ${show(name)}`);
  const cc = connector.ucm_connector_config;
  if (cc === null || typeof cc !== "object" || Array.isArray(cc)) {
    throw new ConfigError(`${at("ucm_connector_config")} must be a mapping, got ${show(cc)}`);
  }
  const raw = cc as Record<string, unknown>;
  const key = (k: string) => `${at("ucm_connector_config")}.${k}`;

  const sb = raw.storage_backends;
  if (typeof sb !== "string" || sb.trim() === "") {
    throw new ConfigError(`${key("storage_backends")} is required: a directory, or several separated by ':', got ${show(sb)}`);
  }
  const dirs = sb.split(":").map((d) => d.trim());
  dirs.forEach((d, i) => {
    if (d === "") throw new ConfigError(`${key("storage_backends")} has an empty directory at position ${i} in ${show(sb)}`);
    let st: fs.Stats;
    try {
      st = fs.statSync(d);
    } catch {
      throw new ConfigError(`${key("storage_backends")}: directory ${show(d)} does not exist`);
    }
    if (!st.isDirectory()) throw new ConfigError(`${key("storage_backends")}: ${show(d)} is not a directory`);
    // Create and remove a probe: the permission bits alone do not tell (root,
    // read-only mounts, NFS root squash).
    try {
      fs.rmdirSync(fs.mkdtempSync(path.join(d, ".ucm-probe-")));
    } catch (e) {
      throw new ConfigError(
        `${key("storage_backends")}: directory ${show(d)} is not writable (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
      );
    }
  });
  const resolved = dirs.map((d) => path.resolve(d));
  if (new Set(resolved).size !== resolved.length) throw new ConfigError(`${key("storage_backends")} names a directory twice: ${show(sb)}`);

  const out: Record<string, unknown> = {};
  for (const [k, spec] of Object.entries(OPTIONS)) {
    const v = raw[k];
    if (v === undefined || v === null) {
      out[spec.key] = spec.dflt;
      continue;
    }
    switch (spec.kind) {
      case "int":
        if (typeof v !== "number" || !Number.isInteger(v)) throw new ConfigError(`${key(k)} must be an integer, got ${show(v)}`);
        if (v < (spec.min ?? -Infinity) || v > (spec.max ?? Infinity)) {
          throw new ConfigError(`${key(k)} must be between ${spec.min} and ${spec.max}, got ${show(v)}`);
        }
        break;
      case "bool":
        if (typeof v !== "boolean") throw new ConfigError(`${key(k)} must be true or false, got ${show(v)}`);
        break;
      case "string":
        if (typeof v !== "string") throw new ConfigError(`${key(k)} must be a string, got ${show(v)}`);
        break;
      case "size": {
        const n = parseSize(v);
        if (n === undefined) throw new ConfigError(`${key(k)} must be a size in bytes such as 4GiB or 500MB, got ${show(v)}`);
        if (n < (spec.min ?? 0) || n > (spec.max ?? Infinity)) {
          throw new ConfigError(`${key(k)} must be between ${spec.min} and ${spec.max} bytes, got ${show(v)} (${n})`);
        }
        out[spec.key] = n;
        continue;
      }
      case "sizes": {
        const list = Array.isArray(v) ? v : [v];
        const sizes = list.map((x, i) => {
          const n = parseSize(x);
          const at = Array.isArray(v) ? `${key(k)}[${i}]` : key(k);
          if (n === undefined) throw new ConfigError(`${at} must be a size in bytes such as 500GiB, or 0 for unlimited, got ${show(x)}`);
          return n;
        });
        out[spec.key] = sizes;
        continue;
      }
      case "level":
        if (typeof v !== "string" || !LOG_LEVELS.includes(v as LogLevel)) {
          throw new ConfigError(`${key(k)} must be one of ${LOG_LEVELS.join(", ")}, got ${show(v)}`);
        }
        break;
    }
    out[spec.key] = v;
  }
  for (const k of Object.keys(raw)) {
    if (k !== "storage_backends" && !(k in OPTIONS)) warnings.push(`unknown key ${key(k)} ignored`);
  }
  if (out.cudaCopy !== "kernel" && out.cudaCopy !== "batch")
    throw new ConfigError(`${key("cudaCopy")} must be "kernel" or "batch", got ${show(out.cudaCopy)}`);
  if (!Array.isArray(out.capacity)) out.capacity = [out.capacity as number];
  const caps = out.capacity as number[];
  if (caps.length === 1) out.capacity = resolved.map(() => caps[0]);
  else if (caps.length !== resolved.length) {
    throw new ConfigError(
      `${key("capacity")} lists ${caps.length} sizes for ${resolved.length} storage backends; give one value for all or one per backend`,
    );
  }
  for (const [i, c] of (out.capacity as number[]).entries()) {
    if (c !== 0 && c < 16 * 2 ** 20)
      throw new ConfigError(`${key("capacity")}: ${c} bytes for ${show(resolved[i])} is below the 16 MiB minimum (0 = unlimited)`);
  }
  // A store another user can write to lets that user plant symbolic links where the engine writes, reads
  // and deletes (and read every block): it must be this user's, and writable by no one else (by the group
  // only when shareWithGroup says the group's engines share it).
  const euid = typeof process.geteuid === "function" ? process.geteuid() : 0;
  for (const d of resolved) {
    const st = fs.statSync(d);
    if (st.uid !== euid) {
      throw new ConfigError(
        `${key("storage_backends")}: directory ${show(d)} belongs to uid ${st.uid}, not to the engine's user (${euid}); use a directory of this user (chown it, or create another)`,
      );
    }
    const mode = (st.mode & 0o7777).toString(8);
    if ((st.mode & 0o002) !== 0)
      throw new ConfigError(`${key("storage_backends")}: directory ${show(d)} is writable by every user (mode ${mode}); chmod o-w it`);
    if ((st.mode & 0o020) !== 0 && out.shareWithGroup !== true) {
      throw new ConfigError(
        `${key("storage_backends")}: directory ${show(d)} is writable by its group (mode ${mode}); chmod g-w it, or set shareWithGroup: true if the group's engines share this store`,
      );
    }
  }
  const config = { ...out, storageBackends: resolved, storageBackendsRaw: sb } as EngineConfig;
  if (config.endpoint === "") config.endpoint = defaultEndpoint(sb);
  validateEndpoint(config.endpoint, key("endpoint"));
  return { config, warnings };
}

export function validateEndpoint(endpoint: string, what: string): void {
  if (endpoint.startsWith("ipc://")) {
    const p = endpoint.slice("ipc://".length);
    if (!path.isAbsolute(p)) throw new ConfigError(`${what} must be ipc://<absolute path>, got ${show(endpoint)}`);
    if (Buffer.byteLength(p) > 107) throw new ConfigError(`${what}: socket path longer than 107 bytes: ${show(endpoint)}`);
    return;
  }
  if (/^tcp:\/\/(127\.0\.0\.1|localhost|\[::1\]):\d+$/.test(endpoint)) return;
  throw new ConfigError(`${what} must be ipc://<absolute path> or tcp://127.0.0.1:<port>, got ${show(endpoint)}`);
}
