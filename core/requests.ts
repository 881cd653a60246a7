// The typed requests of wire protocol version 1 (docs/PROTOCOL.md): each op's
// message is decoded and validated here once, into a plain value the store
// trusts without checking again. Only what needs a session (is this region or
// task this client's?) or the filesystem is left to the store. Errors name the
// field and the value received; shard columns are decoded exactly once.
import { EngineConfig } from "./config";
import {
  PROTOCOL_VERSIONS,
  ProtocolError,
  ShardArrays,
  describe,
  optBool,
  optString,
  optUint,
  reqDeadline,
  reqKeys,
  reqNs,
  reqNsList,
  reqShards,
  reqUint,
  toUint,
} from "./protocol";

type Msg = Record<string, unknown>;

/** The settings that bound a request's size. */
export type RequestLimits = Pick<EngineConfig, "maxKeysPerRequest" | "maxLookupKeys">;

export interface HelloRequest {
  version: number;
  pid: number;
  /** Safe for a log line: control characters replaced by "?". */
  name: string;
  /** The token the client read from the engine's credential socket (core/identity.ts), if any. */
  cred?: string;
}

export interface HostRegionSpec {
  medium: "host";
  source: string;
  size: number;
}

export interface CudaRegionSpec {
  medium: "cuda";
  device: number;
  /** The GPU as every process names it (CUDA_VISIBLE_DEVICES renumbers ordinals per process). */
  pciBusId?: string;
  handle: Uint8Array;
  offset: number;
  size: number;
}

export type RegionSpec = HostRegionSpec | CudaRegionSpec;

export interface EventSpec {
  device: number;
  pciBusId?: string;
  handle: Uint8Array;
}

export interface RegisterRequest {
  regions: RegionSpec[];
  events: EventSpec[];
  /** The payload of one block this client will dump (block_bytes): the Cache stage prepares for it. */
  blockBytes?: number;
}

export interface ReleaseRequest {
  /** Client region ids; whether this client holds them is the session's to say. */
  regions: number[];
}

export interface NamespaceRequest {
  ns: string;
  description: unknown;
}

export interface LookupRequest {
  ns: string[];
  keys: Buffer[];
  /** Lengths of the runs `keys` is made of (a prefix lookup per run: store.ts), or undefined for a plain lookup. */
  runs?: number[];
  /** Answer `found` as bytes, one a key (1 stored, 0 not), instead of an array of booleans. */
  bits: boolean;
}

/** What a dump and a load share: blocks by key, the client memory of each as shards. */
export interface TransferRequest {
  /** Absolute, engine clock; undefined when the request has none. */
  deadline?: number;
  ns: string;
  keys: Buffer[];
  shards: ShardArrays;
  /**
   * Client event id (GPU memory) the copies wait for: a dump's reads of the client's memory, a load's writes into
   * it happen only after the work the client queued on its stream before the event.
   */
  event?: number;
}

export type LoadRequest = TransferRequest;

export interface DumpRequest extends TransferRequest {
  /** Each written block becomes visible at once. */
  commit: boolean;
  /**
   * Per block, the key a later commit names it by, when that is another (a piece of a block, dumped under a key of
   * its own: a commit of the block's key commits every piece of it, from any client).
   */
  commitKeys?: Buffer[];
}

export interface TaskRequest {
  task: number;
}

export interface WaitRequest extends TaskRequest {
  timeoutMs: number;
}

export interface CommitRequest {
  ns: string;
  keys: Buffer[];
  success: boolean;
}

export function decodeHello(msg: Msg): HelloRequest {
  const version = msg.version;
  if (typeof version !== "number" || !PROTOCOL_VERSIONS.includes(version)) {
    throw new ProtocolError(
      "unsupported_version",
      `protocol version ${describe(version)} is not supported; this engine speaks ${PROTOCOL_VERSIONS.join(", ")}`,
    );
  }
  const pid = reqUint(msg, "pid", 2 ** 31);
  // A name goes into log lines: control characters (a newline would forge a line) become "?".
  const name = (optString(msg, "name", 256) ?? "").replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, "?");
  const cred = optString(msg, "cred", 64);
  if (cred !== undefined && !/^[0-9a-f]{32}$/.test(cred))
    throw new ProtocolError("bad_message", `cred must be 32 lowercase hex digits, got ${describe(cred)}`);
  return { version, pid, name, cred };
}

export function decodeRegister(msg: Msg): RegisterRequest {
  const list = msg.regions ?? [];
  const evList = msg.events ?? [];
  if (!Array.isArray(list) || list.length > 65536) {
    throw new ProtocolError("bad_message", `regions must be an array (at most 65536), got ${describe(list)}`);
  }
  if (!Array.isArray(evList) || evList.length > 1024)
    throw new ProtocolError("bad_message", `events must be an array (at most 1024), got ${describe(evList)}`);
  // Nothing but block_bytes is allowed: a client that knows its block size before it has memory to register
  // (ucm.store.NfsStore given block_size) tells the Cache stage early.
  const sizeOnly = msg.block_bytes !== undefined && msg.block_bytes !== null;
  if (list.length === 0 && evList.length === 0 && !sizeOnly)
    throw new ProtocolError("bad_message", `regions must be a non-empty array (or block_bytes given), got ${describe(msg.regions)}`);
  const regions = list.map((r, i): RegionSpec => {
    const m = mapAt(r, `regions[${i}]`);
    const medium = m.medium;
    if (medium !== "host" && medium !== "cuda")
      throw new ProtocolError("bad_message", `regions[${i}].medium must be "host" or "cuda", got ${describe(medium)}`);
    const size = toUint(m.size, `regions[${i}].size`);
    if (size < 1) throw new ProtocolError("bad_message", `regions[${i}].size must be positive, got ${size}`);
    if (medium === "cuda") {
      return {
        medium,
        device: toUint(m.device, `regions[${i}].device`),
        pciBusId: busId(m.pci_bus_id, `regions[${i}].pci_bus_id`),
        handle: cudaHandle(m.handle, `regions[${i}].handle`),
        offset: toUint(m.offset ?? 0, `regions[${i}].offset`),
        size,
      };
    }
    const src = m.source;
    if (typeof src !== "string" || src.length > 4096) {
      throw new ProtocolError("bad_message", `regions[${i}].source must be a string of at most 4096 characters, got ${describe(src)}`);
    }
    return { medium, source: src, size };
  });
  const events = evList.map((e, i): EventSpec => {
    const m = mapAt(e, `events[${i}]`);
    return {
      device: toUint(m.device, `events[${i}].device`),
      pciBusId: busId(m.pci_bus_id, `events[${i}].pci_bus_id`),
      handle: cudaHandle(m.handle, `events[${i}].handle`),
    };
  });
  if (msg.block_bytes === undefined || msg.block_bytes === null) return { regions, events };
  const blockBytes = toUint(msg.block_bytes, "block_bytes");
  if (blockBytes < 1) throw new ProtocolError("bad_message", `block_bytes must be positive, got ${blockBytes}`);
  return { regions, events, blockBytes };
}

export function decodeRelease(msg: Msg): ReleaseRequest {
  const list = msg.regions;
  if (!Array.isArray(list)) throw new ProtocolError("bad_message", `regions must be an array of region ids, got ${describe(list)}`);
  list.forEach((id, i) => {
    // A region id that is not a number is no region of this client either.
    if (typeof id !== "number") throw unknownRegion(i, id);
  });
  return { regions: list as number[] };
}

/** The error for `regions[i]` naming no region of this client. */
export function unknownRegion(i: number, id: unknown): ProtocolError {
  return new ProtocolError("unknown_region", `regions[${i}]: no region ${describe(id)} registered by this client`);
}

/**
 * Bytes a namespace's description may take as JSON. It is written to NAMESPACE in every backend and stays there
 * for good (evicting blocks never removes it): a few hundred bytes say what the namespace is.
 */
export const MAX_DESCRIPTION_BYTES = 16 * 1024;

export function decodeNamespace(msg: Msg): NamespaceRequest {
  const ns = reqNs(msg);
  const description = msg.description ?? null;
  let size: number;
  try {
    size = Buffer.byteLength(JSON.stringify(description));
  } catch (e) {
    throw new ProtocolError("bad_message", `description of namespace ${ns} is not plain data: ${(e as Error).message}`);
  }
  if (size > MAX_DESCRIPTION_BYTES) {
    throw new ProtocolError(
      "too_large",
      `description of namespace ${ns} is ${size} bytes as JSON, more than the ${MAX_DESCRIPTION_BYTES} allowed`,
    );
  }
  return { ns, description };
}

export function decodeLookup(msg: Msg, limits: RequestLimits): LookupRequest {
  const ns = reqNsList(msg);
  const keys = reqKeys(msg, limits.maxKeysPerRequest);
  // Bounded by its cost before any work: one path (and one stat) per key per namespace.
  if (ns.length * keys.length > limits.maxLookupKeys) {
    throw new ProtocolError(
      "too_large",
      `lookup of ${keys.length} keys in ${ns.length} namespaces checks ${ns.length * keys.length} blocks, more than maxLookupKeys ${limits.maxLookupKeys}`,
    );
  }
  return { ns, keys, runs: optRuns(msg, keys.length), bits: optBool(msg, "bits", false) };
}

/** `runs`: lengths that add up to the number of keys (each run is one request's blocks, in order). */
function optRuns(msg: Msg, nkeys: number): number[] | undefined {
  const v = msg.runs;
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v)) throw new ProtocolError("bad_message", `runs must be an array of run lengths, got ${describe(v)}`);
  if (v.length > Math.max(nkeys, 1)) {
    throw new ProtocolError("bad_message", `runs holds ${v.length} runs, more than one per key (${nkeys} keys)`);
  }
  let sum = 0;
  const runs = v.map((n, i) => {
    const len = toUint(n, `runs[${i}]`, nkeys);
    sum += len;
    return len;
  });
  if (sum !== nkeys) throw new ProtocolError("bad_message", `runs add up to ${sum} keys, but keys holds ${nkeys}`);
  return runs;
}

export function decodeLoad(msg: Msg, limits: RequestLimits): LoadRequest {
  const deadline = reqDeadline(msg);
  const ns = reqNs(msg);
  const keys = reqKeys(msg, limits.maxKeysPerRequest);
  // nil is not "no event": it is refused like any other value that is not an id.
  const event = msg.event !== undefined ? toUint(msg.event, "event") : undefined;
  return { deadline, ns, keys, shards: reqShards(msg, keys.length), event };
}

export function decodeDump(msg: Msg, limits: RequestLimits): DumpRequest {
  const req: DumpRequest = { ...decodeLoad(msg, limits), commit: optBool(msg, "commit", false) };
  if (msg.commit_keys !== undefined) {
    req.commitKeys = reqKeys(msg, limits.maxKeysPerRequest, "commit_keys");
    if (req.commitKeys.length !== req.keys.length) {
      throw new ProtocolError(
        "bad_message",
        `commit_keys holds ${req.commitKeys.length} keys, but keys holds ${req.keys.length}: one commit key per block`,
      );
    }
  }
  return req;
}

export function decodeTask(msg: Msg): TaskRequest {
  return { task: reqUint(msg, "task") };
}

export function decodeWait(msg: Msg): WaitRequest {
  return { task: reqUint(msg, "task"), timeoutMs: optUint(msg, "timeout_ms", 10_000, 3_600_000) };
}

export function decodeCommit(msg: Msg, limits: RequestLimits): CommitRequest {
  const ns = reqNs(msg);
  const keys = reqKeys(msg, limits.maxKeysPerRequest);
  return { ns, keys, success: optBool(msg, "success", true) };
}

function mapAt(v: unknown, what: string): Msg {
  if (v === null || typeof v !== "object" || Array.isArray(v))
    throw new ProtocolError("bad_message", `${what} must be a map, got ${describe(v)}`);
  return v as Msg;
}

function cudaHandle(v: unknown, what: string): Uint8Array {
  if (!(v instanceof Uint8Array) || v.length !== 64)
    throw new ProtocolError("bad_message", `${what} must be the 64-byte CUDA IPC handle (bin), got ${describe(v)}`);
  return v;
}

function busId(v: unknown, what: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string" || !/^[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}\.[0-7]$/.test(v)) {
    throw new ProtocolError("bad_message", `${what} must be a PCI bus id such as "0000:06:00.0", got ${describe(v)}`);
  }
  return v;
}
