// The one place that knows what the native addon exports. Everything else in
// core/ goes through these types.
import * as fs from "fs";
import * as path from "path";

export enum BlockStatus {
  Ok = 0,
  NotFound = 1,
  Corrupt = 2,
  IoError = 3,
  Cancelled = 4,
  Skipped = 5,
  Mismatch = 6,
}

export const BLOCK_STATUS_NAMES: Record<BlockStatus, string> = {
  [BlockStatus.Ok]: "ok",
  [BlockStatus.NotFound]: "not_found",
  [BlockStatus.Corrupt]: "corrupt",
  [BlockStatus.IoError]: "io_error",
  [BlockStatus.Cancelled]: "cancelled",
  [BlockStatus.Skipped]: "skipped",
  [BlockStatus.Mismatch]: "mismatch",
};

export interface NativeEngineOptions {
  /** Transfer worker threads (transferStreamNumber). */
  threads?: number;
  /** Threads for stat/rename/unlink batches. */
  metaThreads?: number;
  /** Largest block payload accepted, bytes. */
  maxBlockBytes?: number;
  /** Try O_DIRECT for block files, falling back where refused. */
  odirect?: boolean;
  /** fdatasync each block file before it counts as written. */
  fsync?: boolean;
}

/** A batch of blocks; block i owns the next blockShards[i] shards. */
export interface TransferSpec {
  paths: string[];
  layoutDigest: bigint;
  blockShards: Uint32Array;
  shardRegion: Uint32Array;
  shardOffset: Float64Array;
  shardLength: Float64Array;
}

export interface TransferResult {
  status: Int32Array;
  errno: Int32Array;
  /** Which check or call failed, per block ("" when ok). */
  what: string[];
  /** Bytes of the blocks that succeeded. */
  bytes: number;
  elapsedNs: number;
}

export interface NativeStats {
  threads: number;
  queuedBlocks: number;
  stagingBytes: number;
  inflight: number;
  regions: number;
  crc32cHardware: boolean;
}

export interface NativeEngine {
  openHostRegion(source: string, size: number): number;
  closeRegion(id: number): boolean;
  dump(spec: TransferSpec): Promise<TransferResult>;
  load(spec: TransferSpec): Promise<TransferResult>;
  /** 1 per path that is a block file, else 0. */
  lookup(paths: string[]): Promise<Uint8Array>;
  /** rename(from[i], to[i]); 0 or errno per pair. */
  commit(from: string[], to: string[]): Promise<Int32Array>;
  /** unlink; 0 (also when already gone) or errno per path. */
  remove(paths: string[]): Promise<Int32Array>;
  stats(): NativeStats;
  close(): void;
}

interface Addon {
  Engine: new (opts?: NativeEngineOptions) => NativeEngine;
  crc32c(data: Uint8Array): number;
  constants: { headerSize: number; blockAlign: number; formatVersion: number; cuda: boolean };
}

function findAddon(): string {
  // core/ when run from source (ts-jest), dist/core/ when compiled.
  for (const up of ["..", "../.."]) {
    const p = path.resolve(__dirname, up, "native/build/Release/ucm_native.node");
    if (fs.existsSync(p)) return p;
  }
  throw new Error("native addon not built: run `npm install` (or `npm run build:native`) first");
}

// eslint-disable-next-line @typescript-eslint/no-require-imports
const addon: Addon = require(findAddon());

export const Engine = addon.Engine;
export const crc32c = addon.crc32c;
export const constants = addon.constants;

/** On-disk size of a block file holding `payload` bytes. */
export function blockFileSize(payload: number): number {
  const a = constants.blockAlign;
  return constants.headerSize + Math.ceil(payload / a) * a;
}

/** Builds the flat typed arrays of a TransferSpec block by block. */
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
      shardOffset: Float64Array.from(this.offset),
      shardLength: Float64Array.from(this.length),
    };
  }
}
