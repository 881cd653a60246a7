// Where a dump's or load's bytes move: the client's shards (region id, offset,
// length) become a native TransferSpec over the engine's own region handles,
// and the native engine copies them on its threads. Every shard is checked
// against the region it names before any transfer is submitted; block files
// are deleted off the event loop. Nothing here reads or writes payload bytes.
import { BlockStatus, NativeEngine, nativeErrorCode, removeFiles, TransferResult, TransferSpec } from "./native";
import { StorageLayout } from "./layout";
import { Logger } from "./log";
import { ProtocolError, ShardArrays } from "./protocol";
import { Session } from "./sessions";

/** D2S: a dump (device or host memory to storage); S2D: a load. */
export type Direction = "D2S" | "S2D";

/** The native region of shard `i` (of block `b`), once its bounds are checked against the client's region. */
function nativeRegion(s: Session, shards: ShardArrays, i: number, b: number): number {
  const r = s.regions.get(shards.region[i]);
  if (r === undefined) {
    throw new ProtocolError("unknown_region", `shards.region[${i}]: no region ${shards.region[i]} registered by this client`);
  }
  const off = shards.offset[i];
  const len = shards.length[i];
  // bigint against number compares exactly; off is at most r.size (a safe integer) where it is subtracted.
  if (len < 1 || off > r.size || len > r.size - Number(off)) {
    throw new ProtocolError(
      "out_of_bounds",
      `shard ${i} (block ${b}): [${off}, +${len}) is not inside region ${shards.region[i]} of ${r.size} bytes`,
    );
  }
  return r.nid;
}

/** Checks every shard of every block (a dump checks them all before it decides which blocks to write). */
export function checkShards(s: Session, shards: ShardArrays, blocks: number): void {
  for (let b = 0; b < blocks; b++) {
    for (let c = 0; c < shards.count; c++) nativeRegion(s, shards, b * shards.count + c, b);
  }
}

/**
 * The native spec of blocks `keep` (indexes into the request), block `b` going to or from `paths(b)`. Offsets and
 * lengths go on as the request's own arrays when every block is kept (the common case), else one copy a block.
 */
export function transferSpec(s: Session, ns: string, shards: ShardArrays, paths: (b: number) => string, keep: number[]): TransferSpec {
  const per = shards.count;
  const n = keep.length * per;
  const whole = n === shards.offset.length && keep.every((b, j) => b === j);
  const region = new Uint32Array(n);
  const offset = whole ? shards.offset : new BigUint64Array(n);
  const length = whole ? shards.length : new BigUint64Array(n);
  keep.forEach((b, j) => {
    for (let c = 0; c < per; c++) region[j * per + c] = nativeRegion(s, shards, b * per + c, b);
    if (!whole) {
      offset.set(shards.offset.subarray(b * per, (b + 1) * per), j * per);
      length.set(shards.length.subarray(b * per, (b + 1) * per), j * per);
    }
  });
  return {
    paths: keep.map(paths),
    layoutDigest: StorageLayout.layoutDigest(ns),
    blockShards: new Uint32Array(keep.length).fill(shards.count),
    shardRegion: region,
    shardOffset: offset,
    shardLength: length,
  };
}

/** Payload bytes of block `b` of a request of `blocks` blocks with equal shard counts. */
export function blockBytes(shardLength: BigUint64Array, b: number, blocks: number): number {
  const per = shardLength.length / blocks;
  let n = 0;
  for (let i = b * per; i < (b + 1) * per; i++) n += Number(shardLength[i]);
  return n;
}

/** The native engine's data path, as the store uses it. */
export class Transfers {
  private closed = false;
  /** Removals started by `removeFiles` and not yet ended. */
  private readonly removing = new Set<Promise<void>>();

  constructor(
    readonly native: NativeEngine,
    /** The storage directories, below which no path is followed through a link. */
    private readonly roots: readonly string[],
    private readonly log: Logger,
  ) {}

  /** Queues the spec; a spec the native engine refuses at once is the client's error, with its code. */
  submit(direction: Direction, spec: TransferSpec): Promise<TransferResult> {
    try {
      const p = direction === "D2S" ? this.native.dump(spec) : this.native.load(spec);
      // The device backend's once-only notices (a copy method the driver lacks) go to the log.
      return p.then((r) => {
        for (const n of r.notices ?? []) this.log.warn(`CUDA: ${n}`);
        return r;
      });
    } catch (e) {
      // The addon's error codes say whose fault it is (docs/PROTOCOL.md's codes where one fits).
      const code = nativeErrorCode(e);
      const m = (e as Error).message;
      throw new ProtocolError(code === "too_large" || code === "out_of_bounds" ? code : "bad_message", m);
    }
  }

  /** One line per task whose blocks failed for a reason other than a miss, a check or shedding (I/O, GPU). */
  logFailures(id: number, direction: Direction, r: TransferResult): void {
    const failed = Array.from(r.status).flatMap((st, i) => (st === BlockStatus.IoError ? [i] : []));
    if (failed.length === 0) return;
    const first = failed[0];
    this.log.warn(
      `task ${id} (${direction}): ${failed.length} of ${r.status.length} block(s) failed: ${r.what[first]}` +
        (r.errno[first] ? ` (errno ${r.errno[first]})` : ""),
    );
  }

  /**
   * Best-effort delete off the event loop (after close, on the addon's store threads); `removalsDone` waits for
   * it. A session dropped while the engine shuts down (its connection's end read after the native engine
   * closed) discards its temporary files here, and the process must not exit before they are gone.
   */
  removeFiles(paths: string[]): void {
    if (paths.length === 0) return;
    const done = (this.closed ? removeFiles(this.roots, paths) : this.native.remove(paths)).then(
      () => undefined,
      (e: Error) => this.log.warn(`remove failed: ${e.message}`),
    );
    this.removing.add(done);
    void done.finally(() => this.removing.delete(done));
  }

  /** Resolves once every removal started by `removeFiles`, including those started meanwhile, has ended. */
  async removalsDone(): Promise<void> {
    while (this.removing.size > 0) await Promise.allSettled([...this.removing]);
  }

  /** Deletes `paths` once the native engine is closed; resolves when done. */
  async removeAfterClose(paths: string[]): Promise<void> {
    if (paths.length) await removeFiles(this.roots, paths);
  }

  /** Write-behind: waits up to timeoutMs for every block to be written; how many are not. */
  async drainWrites(timeoutMs: number): Promise<number> {
    return this.closed ? 0 : this.native.drainWrites(timeoutMs);
  }

  /** Stops the native engine: what is still queued is cancelled, running blocks finish first. */
  close(): void {
    this.closed = true;
    this.native.close();
  }
}
