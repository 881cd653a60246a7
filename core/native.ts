// The one place that knows what the native addon exports. Everything else in
// core/ goes through these types.
import * as fs from "fs";
import * as path from "path";
import { OPTIONS } from "./config";

export enum BlockStatus {
  Ok = 0,
  NotFound = 1,
  Corrupt = 2,
  IoError = 3,
  Cancelled = 4,
  Skipped = 5,
  Mismatch = 6,
  Dropped = 7,
}

export const BLOCK_STATUS_NAMES: Record<BlockStatus, string> = {
  [BlockStatus.Ok]: "ok",
  [BlockStatus.NotFound]: "not_found",
  [BlockStatus.Corrupt]: "corrupt",
  [BlockStatus.IoError]: "io_error",
  [BlockStatus.Cancelled]: "cancelled",
  [BlockStatus.Skipped]: "skipped",
  [BlockStatus.Mismatch]: "mismatch",
  [BlockStatus.Dropped]: "dropped",
};

export interface NativeEngineOptions {
  /** Transfer worker threads (transferStreamNumber). */
  threads: number;
  /** Threads for stat/rename/unlink batches (and as many again for lookups). */
  metaThreads: number;
  /** Largest block payload accepted, bytes. */
  maxBlockBytes: number;
  /** Try O_DIRECT for block files, falling back where refused. */
  odirect: boolean;
  /** fdatasync each block file before it counts as written. */
  fsync: boolean;
  /** Pinned host staging for device blocks, all transfer threads together. */
  pinnedStagingBytes: number;
  /** How device shards move: one gather/scatter kernel, or cudaMemcpyBatchAsync. */
  cudaCopy: "kernel" | "batch";
  /** How long a device dump waits for the client's CUDA event before the block fails. */
  cudaEventTimeoutMs: number;
  /** Host memory of the Cache stage (native/src/host_tier.h), bytes; 0: no tier. */
  hostTierBytes: number;
  /** Answer a dump once its bytes are in the tier and write its file after (write-behind); needs hostTierBytes. */
  writeBehind: boolean;
  /**
   * The storage directories: every path below one is reached through descriptors, following no symbolic link
   * (native/src/store_dirs.h). [] (the core's own tests): paths are used as named.
   */
  storeRoots: string[];
}

/** Metadata threads of an engine; not a config key (4 keep a lookup batch quick without crowding the transfers). */
const META_THREADS = 4;

/**
 * Every engine option, each one `given` or else config.ts's default: the addon has no defaults of its own
 * and refuses an option that is missing.
 */
export function nativeEngineOptions(given: Partial<NativeEngineOptions> = {}): NativeEngineOptions {
  return {
    threads: given.threads ?? (OPTIONS.transferStreamNumber.dflt as number),
    metaThreads: given.metaThreads ?? META_THREADS,
    maxBlockBytes: given.maxBlockBytes ?? (OPTIONS.maxBlockBytes.dflt as number),
    odirect: given.odirect ?? (OPTIONS.odirect.dflt as boolean),
    fsync: given.fsync ?? (OPTIONS.fsync.dflt as boolean),
    pinnedStagingBytes: given.pinnedStagingBytes ?? (OPTIONS.pinnedStagingBytes.dflt as number),
    cudaCopy: given.cudaCopy ?? (OPTIONS.cudaCopy.dflt as "kernel" | "batch"),
    cudaEventTimeoutMs: given.cudaEventTimeoutMs ?? (OPTIONS.cudaEventTimeoutMs.dflt as number),
    hostTierBytes: given.hostTierBytes ?? 0,
    writeBehind: given.writeBehind ?? false,
    storeRoots: given.storeRoots ?? [],
  };
}

/**
 * The `code` of an error the addon throws or rejects with (native/src/convert.h), for matching instead of the
 * message text; errno-based failures carry the errno's name ("ENOSPC", "ETIMEDOUT", ...) and `errno`.
 */
export type NativeErrorCode =
  | "invalid_argument"
  | "unknown_region"
  | "unknown_event"
  | "out_of_bounds"
  | "too_large"
  | "cancel_id_in_use"
  | "closed"
  | "region_refused"
  | "cuda_refused";

export interface NativeError extends Error {
  code: NativeErrorCode | `E${string}`;
  errno?: number;
}

/**
 * The `code` of an error the addon threw, undefined when there is none. (No instanceof check: errors made in native
 * code belong to the main realm, not to a vm context such as jest's.)
 */
export function nativeErrorCode(e: unknown): NativeError["code"] | undefined {
  const code = typeof e === "object" && e !== null ? (e as { code?: unknown }).code : undefined;
  return typeof code === "string" ? (code as NativeError["code"]) : undefined;
}

/** A batch of blocks; block i owns the next blockShards[i] shards. */
export interface TransferSpec {
  paths: string[];
  layoutDigest: bigint;
  blockShards: Uint32Array;
  shardRegion: Uint32Array;
  shardOffset: BigUint64Array;
  shardLength: BigUint64Array;
  /** Dumps: blocks still queued this long after submit are dropped (status Dropped). */
  maxQueueMs?: number;
  /** Dumps of device memory: event (openCudaEvent) the workers wait on before reading. */
  waitEvent?: number;
  /** Makes the task cancellable under this id while it runs (see NativeEngine.cancel). */
  cancelId?: number;
  /** Milliseconds from now after which no copy out of or into the client's memory starts (blocks end Cancelled). */
  deadlineMs?: number;
}

export interface TransferResult {
  status: Int32Array;
  errno: Int32Array;
  /** Which check or call failed, per block ("" when ok). */
  what: string[];
  /** Bytes of the blocks that succeeded. */
  bytes: number;
  elapsedNs: number;
  /** Once-only messages from the device backend for the log (e.g. a copy method the driver lacks). */
  notices?: string[];
}

export interface NativeStats {
  threads: number;
  queuedBlocks: number;
  /** Lookup jobs waiting for a lookup thread (grows while a filesystem does not answer). */
  queuedLookups: number;
  stagingBytes: number;
  pinnedBytes: number;
  /** Nanoseconds of storage reads and writes, summed over the transfers in flight. */
  storageBusyNs: number;
  /** Nanoseconds blocks ready for storage waited for a transfer stream, summed. */
  storageWaitNs: number;
  /** Worker threads: one a stream, and a second one a stream while there are CPUs for it. */
  workers: number;
  inflight: number;
  regions: number;
  crc32cHardware: boolean;
}

/** The host-memory tier's figures, since the engine started (counts) or now (sizes). */
export interface TierStats {
  capacityBytes: number;
  /** Every buffer the tier made, held by blocks, lent to a transfer or kept free for the next block. */
  usedBytes: number;
  /** Committed blocks held, and their payload bytes. */
  blocks: number;
  blockBytes: number;
  /** Dumped blocks waiting for their commit. */
  pending: number;
  hits: number;
  hitBytes: number;
  misses: number;
  inserted: number;
  evicted: number;
  /** Blocks that went without the tier: no room (everything held was pending or lent). */
  refused: number;
  /** Write-behind: blocks answered whose files are not written yet, and their payload bytes. */
  unwritten: number;
  unwrittenBytes: number;
  /** Files written behind; writes or renames that failed (the block stays in memory only). */
  written: number;
  writeFailed: number;
  /** Blocks evicted before their write began: never written. */
  shed: number;
  /** Age of the oldest block waiting for its write, ms. */
  lagMs: number;
  /** GPU clients: buffers page-locked since the engine started (blocks then move to and from them in one DMA), their bytes. */
  pinned: number;
  pinnedBytes: number;
  /** Buffers given up after a GPU copy that did not finish (never reused). */
  abandoned: number;
}

export interface NativeEngine {
  /**
   * Shared memory of another process (see native/src/region.h: a shm name, a path under /dev/shm, or
   * /proc/<pid>/fd/<n> of the client's own process `pid`), owned by the engine's user.
   */
  openHostRegion(source: string, size: number, pid?: number): number;
  /**
   * GPU memory of another process: its CUDA IPC handle (64 bytes), the storage's offset in the allocation and its
   * size. The GPU is the one with `pciBusId` when given (clients number devices their own way), else `device`.
   */
  openCudaRegion(device: number, handle: Uint8Array, offset: number, size: number, pciBusId?: string): number;
  /** An interprocess CUDA event another process records (64-byte handle); the GPU as for openCudaRegion. */
  openCudaEvent(device: number, handle: Uint8Array, pciBusId?: string): number;
  closeEvent(id: number): boolean;
  /**
   * Cancels the running task given `cancelId`: blocks not yet copied into memory end Cancelled.
   * "stopped": no block of it can write memory any more; "finished": it was not running;
   * "timeout": a block copy outlived `timeoutMs`.
   */
  cancel(cancelId: number, timeoutMs: number): Promise<"stopped" | "finished" | "timeout">;
  /**
   * Blocks of the running transfer `cancelId` done with the client's memory (a dump's block copied into staging, or
   * failed or finished without a copy); -1 when no transfer runs under that id (it has finished: all of them are).
   */
  released(cancelId: number): number;
  closeRegion(id: number): boolean;
  dump(spec: TransferSpec): Promise<TransferResult>;
  load(spec: TransferSpec): Promise<TransferResult>;
  /** 1 per path that is a block file, else 0. */
  lookup(paths: string[]): Promise<Uint8Array>;
  /**
   * rename(from[i], to[i]) unless a block is stored at to[i] already (EEXIST: that first copy stays); 0 or errno per
   * pair.
   */
  commit(from: string[], to: string[]): Promise<Int32Array>;
  /** unlink; 0 (also when already gone) or errno per path. */
  remove(paths: string[]): Promise<Int32Array>;
  stats(): NativeStats;
  /** The Cache stage's figures (native/src/host_tier.h; they take its lock); undefined once closed. */
  tierStats(): TierStats | undefined;
  /** Waits up to timeoutMs for every block written behind to be written; resolves with how many are not. */
  drainWrites(timeoutMs: number): Promise<number>;
  /**
   * Blocks of payloadBytes are coming: the Cache stage prepares its memory for them (returns at once). False when
   * there is no stage or it knows a block size already (it prepares for that one).
   */
  prepareTier(payloadBytes: number): boolean;
  close(): void;
}

/** A backend directory's usage ledger (see native/src/capacity.h). */
export interface LedgerUsage {
  bytes: number;
  files: number;
  /** false when this call created the ledger (a directory never accounted). */
  existed: boolean;
}

export interface EvictRequest {
  dir: string;
  /** Evict until scanned bytes + extraBytes <= targetBytes; absent: scan and repair the ledger only. */
  targetBytes?: number;
  /** Space this engine reserved for writes in flight. */
  extraBytes?: number;
  /** Block files used more recently than this are kept. */
  graceMs: number;
  /** Block file names (key hex) being read by this engine: kept. */
  pinned?: string[];
  timeoutMs?: number;
}

export interface EvictResult {
  /** Another engine was evicting; nothing done. */
  busy: boolean;
  error: string | null;
  scannedBytes: number;
  scannedFiles: number;
  /** What the scan said had to go. */
  wantedBytes: number;
  freedBytes: number;
  freedFiles: number;
  keptRecent: number;
  keptPinned: number;
  vanished: number;
  /** The ledger after the pass. */
  usedBytes: number;
  usedFiles: number;
}

export interface CudaStatus {
  /** Compiled with the CUDA toolkit (or the emulated runtime). */
  built: boolean;
  /** The test build: CUDA runtime emulated over host shared memory (native/cuda_emu). */
  emulated: boolean;
  /** This build's CUDA runtime has cudaMemcpyBatchAsync (12.8 or newer). */
  batchCopies: boolean;
  /** A driver and at least one GPU are there. */
  usable: boolean;
  devices: number;
  runtimeVersion: number;
  driverVersion: number;
  /** Why not usable. */
  why: string;
}

/** An accepted connection to the engine's ipc socket, as the kernel reports it (SO_PEERCRED). */
export interface ListenerPauseState {
  running: boolean;
  paused: boolean;
  /** Times the socket was hidden. */
  pauses: number;
  hiddenPath: string;
  /** The last rename that failed, if any. */
  error: string;
}

/** An accepted tcp connection and the user owning the client's end of it (-1 when the kernel's table lacks it). */
export interface TcpPeer {
  fd: number;
  inode: number;
  uid: number;
}

/** The credentials of the process that fetched a token from the credential socket. */
export interface ProvenPeer {
  pid: number;
  uid: number;
  gid: number;
}

export interface ConnectedPeer {
  fd: number;
  inode: number;
  pid: number;
  uid: number;
}

interface Addon {
  Engine: new (opts: NativeEngineOptions) => NativeEngine;
  crc32c(data: Uint8Array): number;
  usageAdd(dir: string, deltaBytes: number, deltaFiles: number, timeoutMs: number): Promise<LedgerUsage>;
  evict(req: EvictRequest): Promise<EvictResult>;
  cudaStatus(): CudaStatus;
  connectedPeers(socketPath: string): ConnectedPeer[];
  /** Shuts down descriptor `fd` if it still is the connection with socket `inode`. */
  endConnection(socketPath: string, fd: number, inode: number): boolean;
  raiseFdLimit(): { soft: number; hard: number };
  /** Lets this thread, and threads started after, run on every CPU the cpuset allows; CPU counts before and after. */
  widenCpuAffinity(): { before: number; after: number };
  /** Hides the ipc socket while `pauseAt` or more descriptors are taken, until fewer than `resumeAt` are open. */
  listenerPause(socketPath: string, pauseAt: number, resumeAt: number): void;
  listenerPauseStop(): void;
  listenerPauseState(): ListenerPauseState;
  /** Files 0660 and directories 02770 instead of 0600 and 0700, for every file the engine makes from now on. */
  setShareWithGroup(share: boolean): void;
  /**
   * Creates `root/parent/<name>` for each name (parent "" for root itself; nothing below root is followed through
   * a link) with the store's mode set through a descriptor; an existing one must be a real directory of this user.
   * Per name the bytes it took when this call made it, else 0. Rejects naming the first directory refused.
   */
  makeDirs(root: string, parent: string, names: string[]): Promise<number[]>;
  /** A new file `root/parent/name` holding `text` (exclusive, no link followed); its bytes, 0 when one was there. */
  createFile(root: string, parent: string, name: string, text: string): Promise<number>;
  /** Unlinks each path below one of `roots` without following links; 0 (also when already gone) or errno each. */
  removeFiles(roots: readonly string[], paths: string[]): Promise<Int32Array>;
  /** Accepted tcp connections on local `port`, with the owner of the client's end (-1: unknown) when `owners`. */
  tcpPeers(port: number, owners: boolean): TcpPeer[];
  /** Shuts down descriptor `fd` if it still is the tcp connection with socket `inode` on `port`. */
  endTcpConnection(port: number, fd: number, inode: number): boolean;
  /** Serves the credential socket at `path` (native/src/peer_tokens.h); "" or what failed. */
  credentialListen(path: string, mode: number): string;
  credentialStop(): void;
  /** Who a credential token was handed to (the kernel's SO_PEERCRED), once; null when unknown, used or expired. */
  redeemToken(token: string): ProvenPeer | null;
  constants: { headerSize: number; blockAlign: number; formatVersion: number; cuda: boolean; blockStatus: string[] };
}

function findAddon(): string {
  // Another build of the addon, e.g. the one over the emulated CUDA runtime
  // that the GPU tests use (native/build-emu).
  const override = process.env.UCM_NATIVE_ADDON;
  if (override) {
    if (!fs.existsSync(override)) throw new Error(`UCM_NATIVE_ADDON=${override}: no such file`);
    return path.resolve(override);
  }
  // core/ when run from source (ts-jest), dist/core/ when compiled.
  for (const up of ["..", "../.."]) {
    const p = path.resolve(__dirname, up, "native/build/Release/ucm_native.node");
    if (fs.existsSync(p)) return p;
  }
  throw new Error("native addon not built: run `npm install` (or `npm run build:native`) first");
}

/**
 * The block status vocabulary exists in C++ (BlockStatus, native/src/block_file.h) and here; an addon built from
 * other sources than this file would report statuses under the wrong names, so it is refused at load.
 */
export function checkStatusNames(file: string, theirs: unknown): void {
  const ours = Object.values(BlockStatus)
    .filter((v): v is BlockStatus => typeof v === "number")
    .sort((a, b) => a - b)
    .map((v) => BLOCK_STATUS_NAMES[v]);
  const same = Array.isArray(theirs) && theirs.length === ours.length && ours.every((n, i) => theirs[i] === n);
  if (!same) {
    throw new Error(
      `native addon ${file} names block statuses ${JSON.stringify(theirs)}, core/native.ts names them ${JSON.stringify(ours)}: ` +
        "rebuild the addon (npm run build:native) from the same sources",
    );
  }
}

const addonFile = findAddon();
// eslint-disable-next-line @typescript-eslint/no-require-imports
const addon: Addon = require(addonFile);
checkStatusNames(addonFile, addon.constants.blockStatus);

/** The addon's Engine with every option filled in (nativeEngineOptions): options left out take config.ts's defaults. */
export const Engine = function Engine(opts?: Partial<NativeEngineOptions>): NativeEngine {
  return new addon.Engine(nativeEngineOptions(opts));
} as unknown as new (opts?: Partial<NativeEngineOptions>) => NativeEngine;
export const crc32c = addon.crc32c;
export const usageAdd = addon.usageAdd;
export const evict = addon.evict;
export const cudaStatus = addon.cudaStatus;
export const connectedPeers = addon.connectedPeers;
export const endConnection = addon.endConnection;
export const raiseFdLimit = addon.raiseFdLimit;
export const widenCpuAffinity = addon.widenCpuAffinity;
export const listenerPause = addon.listenerPause;
export const listenerPauseStop = addon.listenerPauseStop;
export const listenerPauseState = addon.listenerPauseState;
export const setShareWithGroup = addon.setShareWithGroup;
export const makeDirs = addon.makeDirs;
export const createFile = addon.createFile;
export const removeFiles = addon.removeFiles;
export const tcpPeers = addon.tcpPeers;
export const endTcpConnection = addon.endTcpConnection;
export const credentialListen = addon.credentialListen;
export const credentialStop = addon.credentialStop;
export const redeemToken = addon.redeemToken;
export const constants = addon.constants;

/** On-disk size of a block file holding `payload` bytes. */
export function blockFileSize(payload: number): number {
  const a = constants.blockAlign;
  return constants.headerSize + Math.ceil(payload / a) * a;
}

/** Builds the flat typed arrays of a TransferSpec block by block. */
/** A shard's offset or length as the addon takes it; anything but a non-negative safe integer is refused, as the addon does. */
function uint64(x: number, i: number, what: string): bigint {
  if (!Number.isSafeInteger(x) || x < 0) {
    throw Object.assign(new RangeError(`shard ${i} ${what} must be a non-negative integer, got ${x}`), { code: "invalid_argument" });
  }
  return BigInt(x);
}

export class ShardListBuilder {
  private paths: string[] = [];
  private counts: number[] = [];
  private region: number[] = [];
  private offset: number[] = [];
  private length: number[] = [];

  addBlock(filePath: string, shards: ReadonlyArray<readonly [region: number, offset: number, length: number]>): this {
    this.paths.push(filePath);
    this.counts.push(shards.length);
    for (const [r, o, l] of shards) {
      this.region.push(r);
      this.offset.push(o);
      this.length.push(l);
    }
    return this;
  }

  build(layoutDigest: bigint): TransferSpec {
    return {
      paths: this.paths,
      layoutDigest,
      blockShards: Uint32Array.from(this.counts),
      shardRegion: Uint32Array.from(this.region),
      shardOffset: BigUint64Array.from(this.offset, (x, i) => uint64(x, i, "offset")),
      shardLength: BigUint64Array.from(this.length, (x, i) => uint64(x, i, "length")),
    };
  }
}
