// The store: sessions, regions, tasks and the block lifecycle
// (dump -> temporary file -> commit -> visible -> load). It decides; the
// native engine moves the bytes. Every method validates its request fully
// before anything changes.
import * as fs from "fs";
import { BLOCK_STATUS_NAMES, BlockStatus, Engine, NativeEngine, TransferResult, TransferSpec, blockFileSize, setShareWithGroup } from "./native";
import { CapacityManager } from "./capacity";
import { EngineConfig } from "./config";
import { KnownBlocks } from "./known_blocks";
import { hostTag, sweepOrphans } from "./orphans";
import { StorageLayout } from "./layout";
import { Logger, taskLine } from "./log";
import {
  ProtocolError,
  WireStatus,
  describe,
  optBool,
  optUint,
  reqKeys,
  reqNs,
  reqNsList,
  reqShards,
  reqDeadline,
  reqUint,
  toUint,
} from "./protocol";

type Msg = Record<string, unknown>;

/** Lookup jobs allowed to wait for a lookup thread; beyond, lookups answer misses at once. */
const MAX_QUEUED_LOOKUPS = 256;
/**
 * How long a block the filesystem said was missing is answered as a miss without asking again (when lookup
 * caching is on). Safe both ways: a block this engine commits is known at once, and one another node stores
 * is seen up to a second later (NFS clients cache directory entries longer than that anyway).
 */
const MISS_TTL_MS = 1000;

/** The promise's value, or undefined if it has not settled within `ms` (it still runs). */
function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  return new Promise<T | undefined>((resolve, reject) => {
    const t = setTimeout(() => resolve(undefined), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}

/** Regions (mappings) of all clients together: below the kernel's per-process map count, with room for our own. */
const MAX_MAPPED_REGIONS = (() => {
  try {
    return Math.max(1024, Number(fs.readFileSync("/proc/sys/vm/max_map_count", "utf8").trim()) - 4096);
  } catch {
    return 60000;
  }
})();
type Direction = "D2S" | "S2D";

/** Per-block result names on the wire are the native status names. */
const WIRE = BLOCK_STATUS_NAMES as Record<BlockStatus, WireStatus>;

/** Finished tasks a client may leave unread before the oldest are forgotten. */
const MAX_FINISHED_TASKS = 4096;
/** How long a result stays readable after the client has seen it done. */
const SEEN_RESULT_TTL_MS = 60_000;

export interface TaskResult {
  done: true;
  direction: Direction;
  status: WireStatus[];
  errno: number[];
  failed: number[];
  bytes: number;
  elapsed_s: number;
  /** The seed's line for this task, as the engine logged it, for the client to log where its user looks. */
  line: string;
}

interface Finished {
  status: BlockStatus[];
  errno: number[];
  bytes: number;
  elapsed: number;
  line: string;
}

interface Task {
  id: number;
  direction: Direction;
  done: Promise<unknown>;
  result?: TaskResult;
  seenAt?: number;
}

interface PendingCommit {
  temp?: string; // absent when the block was already stored (skipped)
  final: string;
  at: number;
  backend: number;
  fileBytes: number;
}

/** How long cancel may wait for a block copy in progress to end. */
const CANCEL_TIMEOUT_MS = 5000;
/** Keys remembered for admitOnSecondSight. */
const SECOND_SIGHT_ENTRIES = 1 << 20;

/** Called once per finished task (metrics). */
export type TaskObserver = (direction: Direction, seconds: number, blocksOk: number, bytes: number) => void;

export class Session {
  readonly regions = new Map<number, { nid: number; size: number }>(); // client region id -> native region
  readonly events = new Map<number, number>(); // client event id -> native event
  readonly tasks = new Map<number, Task>();
  readonly pending = new Map<string, PendingCommit>(); // "<ns>/<key hex>" -> dumped block
  nextRegion = 1;
  closed = false;
  constructor(readonly peer: string, readonly pid: number, readonly name: string) {}
}

export interface StoreStats {
  [k: string]: number;
}

export class Store {
  readonly native: NativeEngine;
  readonly layout: StorageLayout;
  readonly engineId: string;
  private nextTask = 1;
  private lookupsTimedOut = 0;
  private lookupTimeoutLogged = 0;
  private readonly inflight = new Set<Promise<unknown>>();
  /** Blocks recently seen committed (saves a stat per lookup). */
  private readonly known = new KnownBlocks(1 << 20);
  /** Blocks the filesystem said were missing, for MISS_TTL_MS: a scheduler asks about the same misses step after step. */
  private readonly missing = new KnownBlocks(1 << 18);
  readonly counters: StoreStats = {
    lookups: 0,
    lookupKeys: 0,
    hits: 0,
    misses: 0,
    dumpTasks: 0,
    loadTasks: 0,
    blocksDumped: 0,
    blocksSkipped: 0,
    blocksLoaded: 0,
    bytesDumped: 0,
    bytesLoaded: 0,
    blocksFailed: 0,
    blocksCorrupt: 0,
    commits: 0,
    discards: 0,
    // write admission: dumps dropped instead of queued
    droppedInflight: 0,
    droppedCapacity: 0,
    droppedQueueAge: 0,
    deferredFirstSight: 0,
    // failed blocks by kind
    blocksNotFound: 0,
    blocksMismatch: 0,
    blocksIoError: 0,
    blocksCancelled: 0,
  };
  readonly capacity: CapacityManager;
  /** Dump bytes admitted and not yet written. */
  inflightDumpBytes = 0;
  /** Block file names being loaded here (never evicted under the reader). */
  private readonly loading = new Map<string, number>();
  /** Keys dumped once (admitOnSecondSight), oldest first. */
  private readonly seenOnce = new Map<string, true>();
  onTask?: TaskObserver;

  constructor(readonly config: EngineConfig, readonly log: Logger) {
    this.engineId = `${hostTag()}-${process.pid}-${Date.now().toString(36)}`;
    this.layout = new StorageLayout(config.storageBackends, this.engineId, config.shareWithGroup);
    setShareWithGroup(config.shareWithGroup);
    this.native = new Engine({
      threads: config.transferStreamNumber,
      odirect: config.odirect,
      fsync: config.fsync,
      maxBlockBytes: config.maxBlockBytes,
      pinnedStagingBytes: config.pinnedStagingBytes,
      cudaCopy: config.cudaCopy as "kernel" | "batch",
      cudaEventTimeoutMs: config.cudaEventTimeoutMs,
    });
    this.capacity = new CapacityManager(config, log, () => [...this.loading.keys()], () => this.known.clear());
  }

  get tasksInFlight(): number {
    return this.inflight.size;
  }

  // ---- regions ---------------------------------------------------------------

  register(s: Session, msg: Msg): { regions: number[]; events?: number[] } {
    const list = msg.regions ?? [];
    const evList = msg.events ?? [];
    if (!Array.isArray(list) || list.length > 65536) {
      throw new ProtocolError("bad_message", `regions must be an array (at most 65536), got ${describe(list)}`);
    }
    if (!Array.isArray(evList) || evList.length > 1024) throw new ProtocolError("bad_message", `events must be an array (at most 1024), got ${describe(evList)}`);
    if (list.length === 0 && evList.length === 0) throw new ProtocolError("bad_message", `regions must be a non-empty array, got ${describe(msg.regions)}`);
    type Spec = { medium: "host"; source: string; size: number } | { medium: "cuda"; device: number; pciBusId?: string; handle: Uint8Array; offset: number; size: number };
    const cudaHandle = (v: unknown, what: string): Uint8Array => {
      if (!(v instanceof Uint8Array) || v.length !== 64) throw new ProtocolError("bad_message", `${what} must be the 64-byte CUDA IPC handle (bin), got ${describe(v)}`);
      return v;
    };
    // The GPU as every process names it (CUDA_VISIBLE_DEVICES renumbers ordinals per process).
    const busId = (v: unknown, what: string): string | undefined => {
      if (v === undefined || v === null) return undefined;
      if (typeof v !== "string" || !/^[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}\.[0-7]$/.test(v)) {
        throw new ProtocolError("bad_message", `${what} must be a PCI bus id such as "0000:06:00.0", got ${describe(v)}`);
      }
      return v;
    };
    const specs: Spec[] = list.map((r, i) => {
      if (r === null || typeof r !== "object" || Array.isArray(r)) throw new ProtocolError("bad_message", `regions[${i}] must be a map, got ${describe(r)}`);
      const m = r as Msg;
      const medium = m.medium;
      if (medium !== "host" && medium !== "cuda") throw new ProtocolError("bad_message", `regions[${i}].medium must be "host" or "cuda", got ${describe(medium)}`);
      const size = toUint(m.size, `regions[${i}].size`);
      if (size < 1) throw new ProtocolError("bad_message", `regions[${i}].size must be positive, got ${size}`);
      if (medium === "cuda") {
        return {
          medium, device: toUint(m.device, `regions[${i}].device`), pciBusId: busId(m.pci_bus_id, `regions[${i}].pci_bus_id`),
          handle: cudaHandle(m.handle, `regions[${i}].handle`), offset: toUint(m.offset ?? 0, `regions[${i}].offset`), size,
        };
      }
      const src = m.source;
      if (typeof src !== "string" || src.length > 4096) {
        throw new ProtocolError("bad_message", `regions[${i}].source must be a string of at most 4096 characters, got ${describe(src)}`);
      }
      return { medium, source: src, size };
    });
    const evSpecs = evList.map((e, i) => {
      if (e === null || typeof e !== "object" || Array.isArray(e)) throw new ProtocolError("bad_message", `events[${i}] must be a map, got ${describe(e)}`);
      const m = e as Msg;
      return { device: toUint(m.device, `events[${i}].device`), pciBusId: busId(m.pci_bus_id, `events[${i}].pci_bus_id`), handle: cudaHandle(m.handle, `events[${i}].handle`) };
    });
    // Quotas, before anything is opened: each region is a mapping in the engine (the kernel allows a process
    // some 65,000) and address space; one client must not use them up for the others.
    const held = Array.from(s.regions.values()).reduce((a, r) => a + r.size, 0);
    const asked = specs.reduce((a, r) => a + r.size, 0);
    if (s.regions.size + specs.length > this.config.maxRegionsPerClient) {
      throw new ProtocolError("too_large", `this client would hold ${s.regions.size + specs.length} regions, more than maxRegionsPerClient ${this.config.maxRegionsPerClient}; release some first`);
    }
    if (held + asked > this.config.maxRegionBytesPerClient) {
      throw new ProtocolError("too_large", `this client would hold ${held + asked} bytes of regions, more than maxRegionBytesPerClient ${this.config.maxRegionBytesPerClient}; release some first`);
    }
    const mapped = this.native.stats().regions;
    if (mapped + specs.length > MAX_MAPPED_REGIONS) {
      throw new ProtocolError("busy", `the engine holds ${mapped} regions of all clients; ${specs.length} more would pass its limit of ${MAX_MAPPED_REGIONS}`);
    }
    const opened: number[] = [];
    const openedEv: number[] = [];
    try {
      for (const [i, sp] of specs.entries()) {
        try {
          opened.push(sp.medium === "host" ? this.native.openHostRegion(sp.source, sp.size, s.pid) : this.native.openCudaRegion(sp.device, sp.handle, sp.offset, sp.size, sp.pciBusId));
        } catch (e) {
          throw new ProtocolError(sp.medium === "cuda" ? "unsupported" : "bad_message", `regions[${i}]: ${(e as Error).message}`);
        }
      }
      for (const [i, ev] of evSpecs.entries()) {
        try {
          openedEv.push(this.native.openCudaEvent(ev.device, ev.handle, ev.pciBusId));
        } catch (e) {
          throw new ProtocolError("unsupported", `events[${i}]: ${(e as Error).message}`);
        }
      }
    } catch (e) {
      for (const id of opened) this.native.closeRegion(id);
      for (const id of openedEv) this.native.closeEvent(id);
      throw e;
    }
    const ids = opened.map((nid, i) => {
      const id = s.nextRegion++;
      s.regions.set(id, { nid, size: specs[i].size });
      return id;
    });
    if (evSpecs.length === 0) return { regions: ids };
    const evIds = openedEv.map((nid) => {
      const id = s.nextRegion++;
      s.events.set(id, nid);
      return id;
    });
    return { regions: ids, events: evIds };
  }

  release(s: Session, msg: Msg): Record<string, never> {
    const list = msg.regions;
    if (!Array.isArray(list)) throw new ProtocolError("bad_message", `regions must be an array of region ids, got ${describe(list)}`);
    list.forEach((id, i) => {
      if (typeof id !== "number" || !s.regions.has(id)) throw new ProtocolError("unknown_region", `regions[${i}]: no region ${describe(id)} registered by this client`);
    });
    for (const id of list as number[]) {
      this.native.closeRegion(s.regions.get(id)!.nid);
      s.regions.delete(id);
    }
    return {};
  }

  // ---- lookup ------------------------------------------------------------------

  async lookup(msg: Msg): Promise<{ found: boolean[] }> {
    const nsList = reqNsList(msg);
    const keys = reqKeys(msg, this.config.maxKeysPerRequest);
    // Bounded by its cost before any work: one path (and one stat) per key per namespace.
    if (nsList.length * keys.length > this.config.maxLookupKeys) {
      throw new ProtocolError("too_large", `lookup of ${keys.length} keys in ${nsList.length} namespaces checks ${nsList.length * keys.length} blocks, more than maxLookupKeys ${this.config.maxLookupKeys}`);
    }
    const found = await this.present(nsList, keys);
    const hits = found.filter(Boolean).length;
    this.counters.lookups++;
    this.counters.lookupKeys += keys.length;
    this.counters.hits += hits;
    this.counters.misses += keys.length - hits;
    return { found };
  }

  /** Which keys are stored in every namespace of `nsList` (the lookup's work, without its counters: dumps ask too). */
  private async present(nsList: string[], keys: Buffer[]): Promise<boolean[]> {
    const found = new Array<boolean>(keys.length).fill(true);
    const now = Date.now();
    const ttl = this.config.lookupCacheTtlS * 1000;
    const ask: string[] = [];
    const askAt: Array<[number, string]> = [];
    for (const ns of nsList) {
      for (let i = 0; i < keys.length; i++) {
        const seen = this.known.seenAt(ns, keys[i]);
        if (seen !== undefined && now - seen <= ttl) continue;
        const gone = ttl > 0 ? this.missing.seenAt(ns, keys[i]) : undefined;
        if (gone !== undefined && now - gone <= MISS_TTL_MS) {
          found[i] = false;
          continue;
        }
        ask.push(this.layout.blockPath(ns, keys[i]));
        askAt.push([i, ns]);
      }
    }
    if (ask.length > 0) {
      // Bounded in time: on a hung NFS server a stat never returns, and the scheduler must not wait on it.
      // The lookup threads are the filesystem's to block; the answer is "miss" for what they did not say.
      const exists = this.native.stats().queuedLookups > MAX_QUEUED_LOOKUPS ? undefined : await withTimeout(this.native.lookup(ask), this.config.lookupTimeoutMs);
      if (exists === undefined) {
        askAt.forEach(([i]) => (found[i] = false));
        this.lookupsTimedOut++;
        if (Date.now() - this.lookupTimeoutLogged > 10_000) {
          this.lookupTimeoutLogged = Date.now();
          this.log.warn(`lookups unanswered by the filesystem within ${this.config.lookupTimeoutMs} ms (a hung NFS server?): answered as misses (${this.lookupsTimedOut} so far)`);
        }
      } else {
        askAt.forEach(([i, ns], j) => {
          if (exists[j]) {
            this.known.remember(ns, keys[i], now);
            this.missing.forget(ns, keys[i]);
          } else {
            found[i] = false;
            this.known.forget(ns, keys[i]);
            this.missing.remember(ns, keys[i], now);
          }
        });
      }
    }
    return found;
  }

  // ---- dump / load -----------------------------------------------------------

  /** Translates the client's shards into native ones; any bad shard fails the request. */
  private spec(s: Session, msg: Msg, paths: (i: number) => string, keep: number[]): TransferSpec {
    const shards = reqShards(msg, (msg.keys as unknown[]).length);
    const n = keep.length * shards.count;
    const region = new Uint32Array(n);
    const offset = new Float64Array(n);
    const length = new Float64Array(n);
    let j = 0;
    for (const b of keep) {
      for (let c = 0; c < shards.count; c++) {
        const i = b * shards.count + c;
        const r = s.regions.get(shards.region[i]);
        if (r === undefined) {
          throw new ProtocolError("unknown_region", `shards.region[${i}]: no region ${shards.region[i]} registered by this client`);
        }
        const off = shards.offset[i];
        const len = shards.length[i];
        if (len < 1 || off > r.size || len > r.size - off) {
          throw new ProtocolError(
            "out_of_bounds",
            `shard ${i} (block ${b}): [${off}, +${len}) is not inside region ${shards.region[i]} of ${r.size} bytes`,
          );
        }
        region[j] = r.nid;
        offset[j] = shards.offset[i];
        length[j] = shards.length[i];
        j++;
      }
    }
    return {
      paths: keep.map(paths),
      layoutDigest: StorageLayout.layoutDigest(reqNs(msg)),
      blockShards: new Uint32Array(keep.length).fill(shards.count),
      shardRegion: region,
      shardOffset: offset,
      shardLength: length,
    };
  }

  private submit(s: Session, direction: Direction, spec: TransferSpec): TransferResult | Promise<TransferResult> {
    try {
      const p = direction === "D2S" ? this.native.dump(spec) : this.native.load(spec);
      // The device backend's once-only notices (a copy method the driver lacks) go to the log.
      return p.then((r) => {
        for (const n of r.notices ?? []) this.log.warn(`CUDA: ${n}`);
        return r;
      });
    } catch (e) {
      const m = (e as Error).message;
      if (e instanceof RangeError && /outside region|above maxBlockBytes/.test(m)) {
        throw new ProtocolError(/maxBlockBytes/.test(m) ? "too_large" : "out_of_bounds", m);
      }
      throw new ProtocolError("bad_message", m);
    }
  }

  async dump(s: Session, msg: Msg): Promise<{ task: number }> {
    const deadline = reqDeadline(msg);
    const ns = reqNs(msg);
    const keys = reqKeys(msg, this.config.maxKeysPerRequest);
    const all = keys.map((_, i) => i);
    // Validate regions and bounds with every block before deciding which to skip.
    const full = this.spec(s, msg, () => "/", all);
    let waitEvent: number | undefined;
    if (msg.event !== undefined) {
      // GPU memory: the workers wait on the event the client recorded after the forward pass.
      waitEvent = s.events.get(toUint(msg.event, "event"));
      if (waitEvent === undefined) throw new ProtocolError("unknown_region", `event ${describe(msg.event)} is not an event registered by this client`);
    }
    await this.layout.ensureNamespace(ns);
    const existing = { found: await this.present([ns], keys) };
    const status = new Array<BlockStatus>(keys.length).fill(BlockStatus.Skipped);
    const { write, files, backends, admitted } = this.admit(ns, keys, full.shardLength, all.filter((i) => !existing.found[i]), status);
    this.inflightDumpBytes += admitted;
    const temps = new Map<number, string>();
    const spec = this.spec(s, msg, (i) => {
      const t = this.layout.tempPath(ns, keys[i]);
      temps.set(i, t);
      return t;
    }, write);
    if (this.config.maxQueueMs > 0) spec.maxQueueMs = this.config.maxQueueMs;
    if (waitEvent !== undefined) spec.waitEvent = waitEvent;
    spec.cancelId = this.nextTask++;
    if (deadline !== undefined) spec.deadlineMs = Math.max(1, deadline - Date.now());
    const autoCommit = optBool(msg, "commit", false);
    let started: TransferResult | Promise<TransferResult>;
    try {
      started = this.submit(s, "D2S", spec);
    } catch (e) {
      this.inflightDumpBytes -= admitted;
      write.forEach((_, j) => this.capacity.release(backends[j], files[j]));
      throw e;
    }
    this.counters.dumpTasks++;
    return this.track(s, "D2S", spec.cancelId!, Promise.resolve(started), async (r, id) => {
      this.inflightDumpBytes -= admitted;
      const errno = new Array<number>(keys.length).fill(0);
      const where = new Map<number, number>();
      write.forEach((b, j) => {
        status[b] = r.status[j];
        errno[b] = r.errno[j];
        where.set(b, j);
        this.capacity.release(backends[j], files[j]); // counted as used once committed
      });
      const now = Date.now();
      const failedTemps: string[] = [];
      keys.forEach((k, b) => {
        const key = `${ns}/${k.toString("hex")}`;
        const j = where.get(b);
        if (status[b] === BlockStatus.Skipped) {
          this.counters.blocksSkipped++;
          this.replacePending(s, key, { final: this.layout.blockPath(ns, k), at: now, backend: 0, fileBytes: 0 });
        } else if (status[b] === BlockStatus.Ok) {
          this.counters.blocksDumped++;
          this.replacePending(s, key, { temp: temps.get(b), final: this.layout.blockPath(ns, k), at: now, backend: backends[j!], fileBytes: files[j!] });
        } else if (status[b] === BlockStatus.Dropped) {
          if (j !== undefined) this.counters.droppedQueueAge++; // the others were counted at admission
        } else {
          this.countFailure(status[b]);
          failedTemps.push(temps.get(b)!);
        }
      });
      if (failedTemps.length) this.removeFiles(failedTemps);
      this.logFailures(id, "D2S", r);
      if (r.errno.includes(2)) this.layout.forgetNamespace(ns); // directories removed underneath: recreate next time
      this.counters.bytesDumped += r.bytes;
      if (s.closed) this.discardAll(s);
      else if (autoCommit) {
        // commit: true asks for each written block to become visible at once.
        const done = await this.commitKeys(s, ns, keys.filter((_, b) => status[b] === BlockStatus.Ok || status[b] === BlockStatus.Skipped), true);
        let j = 0;
        keys.forEach((_, b) => {
          if (status[b] === BlockStatus.Ok || status[b] === BlockStatus.Skipped) {
            if (!done[j] && status[b] === BlockStatus.Ok) status[b] = BlockStatus.IoError;
            j++;
          }
        });
      }
      const line = taskLine(id, "D2S", write.length, r.bytes, r.elapsedNs / 1e9);
      this.log.info(line);
      return { status, errno, bytes: r.bytes, elapsed: r.elapsedNs / 1e9, line };
    });
  }

  /**
   * Write admission: which of the `candidates` (blocks not stored yet) are
   * written. The rest are marked Dropped, never queued: first sight (when
   * admitOnSecondSight), in-flight bytes above maxInflightBytes, or a full
   * backend directory. Admitted blocks hold a capacity reservation: per
   * written block its file size and backend, and the payload bytes in all.
   */
  private admit(
    ns: string,
    keys: Buffer[],
    shardLength: Float64Array,
    candidates: number[],
    status: BlockStatus[],
  ): { write: number[]; files: number[]; backends: number[]; admitted: number } {
    const write: number[] = [];
    const files: number[] = [];
    const backends: number[] = [];
    let admitted = 0;
    for (const b of candidates) {
      status[b] = BlockStatus.Dropped;
      if (this.config.admitOnSecondSight && !this.secondSight(`${ns}/${keys[b].toString("hex")}`)) {
        this.counters.deferredFirstSight++;
        continue;
      }
      const bytes = blockBytes(shardLength, b, keys.length);
      if (this.inflightDumpBytes + admitted + bytes > this.config.maxInflightBytes) {
        this.counters.droppedInflight++;
        continue;
      }
      const backend = this.layout.backendIndex(keys[b]);
      const file = blockFileSize(bytes);
      if (!this.capacity.reserve(backend, file)) {
        this.counters.droppedCapacity++;
        continue;
      }
      admitted += bytes;
      status[b] = BlockStatus.Ok; // decided by the write
      write.push(b);
      files.push(file);
      backends.push(backend);
    }
    return { write, files, backends, admitted };
  }

  /** True the second time a key is asked for (then forgotten); remembers the first. */
  private secondSight(id: string): boolean {
    if (this.seenOnce.delete(id)) return true;
    this.seenOnce.set(id, true);
    if (this.seenOnce.size > SECOND_SIGHT_ENTRIES) this.seenOnce.delete(this.seenOnce.keys().next().value!);
    return false;
  }

  private countFailure(st: BlockStatus): void {
    this.counters.blocksFailed++;
    if (st === BlockStatus.NotFound) this.counters.blocksNotFound++;
    else if (st === BlockStatus.Corrupt) this.counters.blocksCorrupt++;
    else if (st === BlockStatus.Mismatch) this.counters.blocksMismatch++;
    else if (st === BlockStatus.Cancelled) this.counters.blocksCancelled++;
    else this.counters.blocksIoError++;
  }

  private replacePending(s: Session, key: string, p: PendingCommit): void {
    const old = s.pending.get(key);
    if (old?.temp) this.removeFiles([old.temp]);
    s.pending.set(key, p);
  }

  async load(s: Session, msg: Msg): Promise<{ task: number }> {
    const deadline = reqDeadline(msg);
    const ns = reqNs(msg);
    const keys = reqKeys(msg, this.config.maxKeysPerRequest);
    const all = keys.map((_, i) => i);
    const spec = this.spec(s, msg, (i) => this.layout.blockPath(ns, keys[i]), all);
    spec.cancelId = this.nextTask++;
    if (deadline !== undefined) spec.deadlineMs = Math.max(1, deadline - Date.now());
    const names = keys.map((k) => k.toString("hex"));
    this.pin(names, 1);
    let started: TransferResult | Promise<TransferResult>;
    try {
      started = this.submit(s, "S2D", spec);
    } catch (e) {
      this.pin(names, -1);
      throw e;
    }
    this.counters.loadTasks++;
    return this.track(s, "S2D", spec.cancelId!, Promise.resolve(started), (r, id) => {
      this.pin(names, -1);
      const status = Array.from(r.status) as BlockStatus[];
      const bad: string[] = [];
      keys.forEach((k, b) => {
        const key = `${ns}/${k.toString("hex")}`;
        if (status[b] === BlockStatus.Ok) {
          this.counters.blocksLoaded++;
          this.known.remember(ns, k, Date.now());
          return;
        }
        this.countFailure(status[b]);
        this.known.forget(ns, k);
        if (status[b] === BlockStatus.Corrupt) {
          // A block that fails verification is removed so lookup stops offering it.
          bad.push(spec.paths[b]);
          this.capacity.removed(this.layout.backendIndex(k), blockFileSize(blockBytes(spec.shardLength, b, keys.length)));
          this.log.warn(`block ${key} failed verification (${r.what[b]}); removed, it will be recomputed`);
        }
      });
      if (bad.length) this.removeFiles(bad);
      this.logFailures(id, "S2D", r);
      this.counters.bytesLoaded += r.bytes;
      const line = taskLine(id, "S2D", keys.length, r.bytes, r.elapsedNs / 1e9);
      this.log.info(line);
      return { status, errno: Array.from(r.errno), bytes: r.bytes, elapsed: r.elapsedNs / 1e9, line };
    });
  }

  /** One line per task whose blocks failed for a reason other than a miss, a check or shedding (I/O, GPU). */
  private logFailures(id: number, direction: Direction, r: TransferResult): void {
    const failed = Array.from(r.status).flatMap((st, i) => (st === BlockStatus.IoError ? [i] : []));
    if (failed.length === 0) return;
    const first = failed[0];
    this.log.warn(`task ${id} (${direction}): ${failed.length} of ${r.status.length} block(s) failed: ${r.what[first]}` +
      (r.errno[first] ? ` (errno ${r.errno[first]})` : ""));
  }

  private pin(names: string[], by: 1 | -1): void {
    for (const n of names) {
      const c = (this.loading.get(n) ?? 0) + by;
      if (c > 0) this.loading.set(n, c);
      else this.loading.delete(n);
    }
  }

  private track(
    s: Session,
    direction: Direction,
    id: number,
    started: Promise<TransferResult>,
    finish: (r: TransferResult, id: number) => Finished | Promise<Finished>,
  ): { task: number } {
    const done = started.then(
      async (r) => {
        const f = await finish(r, id);
        const status = f.status.map((x) => WIRE[x]);
        this.onTask?.(direction, f.elapsed, f.status.filter((x) => x === BlockStatus.Ok).length, f.bytes);
        const failed: number[] = [];
        status.forEach((x, i) => {
          if (x !== "ok" && x !== "skipped") failed.push(i);
        });
        return { done: true as const, direction, status, errno: f.errno, failed, bytes: f.bytes, elapsed_s: f.elapsed, line: f.line };
      },
    );
    const task: Task = { id, direction, done: undefined as unknown as Promise<unknown> };
    const settle = done.then(
      (r) => {
        task.result = r;
        this.trimFinished(s);
      },
      (e: Error) => {
        this.log.error(`task ${id} failed: ${e.message}`);
        task.result = { done: true, direction, status: [], errno: [], failed: [], bytes: 0, elapsed_s: 0, line: "" };
      },
    );
    task.done = settle; // settles once task.result is set
    this.inflight.add(settle);
    void settle.finally(() => this.inflight.delete(settle));
    s.tasks.set(id, task);
    return { task: id };
  }

  private trimFinished(s: Session): void {
    let finished = 0;
    for (const t of s.tasks.values()) if (t.result) finished++;
    if (finished <= MAX_FINISHED_TASKS) return;
    for (const [id, t] of s.tasks) {
      if (finished <= MAX_FINISHED_TASKS) break;
      if (t.result) {
        s.tasks.delete(id);
        finished--;
      }
    }
  }

  private task(s: Session, msg: Msg): Task {
    const id = reqUint(msg, "task");
    const t = s.tasks.get(id);
    if (!t) throw new ProtocolError("unknown_task", `task ${id} is not a task of this client (or its result was already collected)`);
    return t;
  }

  check(s: Session, msg: Msg): TaskResult | { done: false } {
    const t = this.task(s, msg);
    if (!t.result) return { done: false };
    t.seenAt ??= Date.now();
    return t.result;
  }

  async wait(s: Session, msg: Msg): Promise<TaskResult | { done: false }> {
    const t = this.task(s, msg);
    const timeout = optUint(msg, "timeout_ms", 10_000, 3_600_000);
    if (!t.result) {
      let timer: NodeJS.Timeout | undefined;
      const expired = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, timeout);
      });
      await Promise.race([t.done, expired]);
      clearTimeout(timer);
    }
    if (!t.result) return { done: false };
    t.seenAt ??= Date.now();
    return t.result;
  }

  /**
   * Stops a running task: queued blocks and loads not yet copied end as
   * `cancelled`. The reply comes once no block of the task can write the
   * client's memory any more (a client that gave up on a load must know its
   * KV blocks are left alone before it reuses them). A finished task is left
   * as it is: `{cancelled: false, done: true}`.
   */
  async cancel(s: Session, msg: Msg): Promise<{ cancelled: boolean; done: boolean }> {
    const t = this.task(s, msg);
    if (t.result) return { cancelled: false, done: true };
    const outcome = await this.native.cancel(t.id, CANCEL_TIMEOUT_MS);
    if (outcome === "timeout") throw new ProtocolError("busy", `task ${t.id}: a block copy did not end within ${CANCEL_TIMEOUT_MS} ms`);
    // "finished": every block is past its copy (its result is on the way).
    return { cancelled: outcome === "stopped", done: t.result !== undefined };
  }

  // ---- commit ------------------------------------------------------------------

  async commit(s: Session, msg: Msg): Promise<{ committed: boolean[] }> {
    const ns = reqNs(msg);
    const keys = reqKeys(msg, this.config.maxKeysPerRequest);
    const success = optBool(msg, "success", true);
    return { committed: await this.commitKeys(s, ns, keys, success) };
  }

  private async commitKeys(s: Session, ns: string, keys: Buffer[], success: boolean): Promise<boolean[]> {
    const committed = new Array<boolean>(keys.length).fill(false);
    const from: string[] = [];
    const to: string[] = [];
    const at: number[] = [];
    const sizes: Array<[number, number]> = [];
    const drop: string[] = [];
    keys.forEach((k, i) => {
      const id = `${ns}/${k.toString("hex")}`;
      const p = s.pending.get(id);
      if (!p) return;
      s.pending.delete(id);
      if (!success) {
        if (p.temp) drop.push(p.temp);
        return;
      }
      if (!p.temp) {
        committed[i] = true;
        return;
      }
      from.push(p.temp);
      to.push(p.final);
      at.push(i);
      sizes.push([p.backend, p.fileBytes]);
    });
    if (drop.length) {
      await this.native.remove(drop);
      this.counters.discards += drop.length;
    }
    if (from.length) {
      const errs = await this.native.commit(from, to);
      const now = Date.now();
      errs.forEach((e, j) => {
        const i = at[j];
        if (e === 0) {
          committed[i] = true;
          this.counters.commits++;
          this.capacity.committed(sizes[j][0], sizes[j][1]);
          this.known.remember(ns, keys[i], now);
          this.missing.forget(ns, keys[i]);
        } else {
          this.log.warn(`commit of block ${ns}/${keys[i].toString("hex")} failed: errno ${e}`);
        }
      });
      const failed = from.filter((_, j) => errs[j] !== 0);
      if (failed.length) this.removeFiles(failed);
    }
    return committed;
  }

  // ---- lifecycle ---------------------------------------------------------------

  private nativeClosed = false;

  /** Best-effort delete off the event loop; after close, through libuv. */
  private removeFiles(paths: string[]): void {
    if (paths.length === 0) return;
    if (!this.nativeClosed) {
      this.native.remove(paths).catch((e: Error) => this.log.warn(`remove failed: ${e.message}`));
    } else {
      for (const p of paths) void fs.promises.rm(p, { force: true }).catch(() => undefined);
    }
  }

  /** Drops every uncommitted block of a session (temporary files deleted). */
  discardAll(s: Session): void {
    const temps = [...s.pending.values()].flatMap((p) => (p.temp ? [p.temp] : []));
    s.pending.clear();
    if (temps.length) {
      this.counters.discards += temps.length;
      this.removeFiles(temps);
    }
  }

  /** Releases a session: regions closed (running transfers keep their mapping), tasks forgotten. */
  closeSession(s: Session): void {
    if (s.closed) return;
    s.closed = true;
    for (const r of s.regions.values()) this.native.closeRegion(r.nid);
    s.regions.clear();
    for (const nid of s.events.values()) this.native.closeEvent(nid);
    s.events.clear();
    this.discardAll(s);
    s.tasks.clear();
  }

  /** Deletes temporary files of dead engines (this host) or abandoned ones (any host). */
  async sweepOrphans(): Promise<void> {
    try {
      const r = await sweepOrphans(this.config.storageBackends, this.engineId, 2 * this.config.uncommittedTimeoutS * 1000);
      if (r.removed) this.log.info(`removed ${r.removed} temporary block file(s) left by engines that are gone`);
    } catch (e) {
      this.log.warn(`orphan sweep failed: ${(e as Error).message}`);
    }
  }

  /** Periodic upkeep: forget seen results, discard blocks nobody committed in time. */
  sweep(sessions: Iterable<Session>, now = Date.now()): void {
    const limit = this.config.uncommittedTimeoutS * 1000;
    for (const s of sessions) {
      for (const [id, t] of s.tasks) if (t.seenAt !== undefined && now - t.seenAt > SEEN_RESULT_TTL_MS) s.tasks.delete(id);
      const stale: string[] = [];
      for (const [key, p] of s.pending) {
        if (now - p.at > limit) {
          s.pending.delete(key);
          if (p.temp) stale.push(p.temp);
        }
      }
      if (stale.length) {
        this.counters.discards += stale.length;
        this.log.warn(`discarded ${stale.length} dumped block(s) of client ${s.name || s.pid} never committed within ${this.config.uncommittedTimeoutS}s`);
        this.removeFiles(stale);
      }
    }
  }

  /** Waits for running tasks (bounded), deletes uncommitted blocks, stops the native engine. */
  async close(timeoutMs: number, sessions: Session[]): Promise<void> {
    if (this.inflight.size > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        Promise.allSettled([...this.inflight]),
        new Promise<void>((r) => {
          timer = setTimeout(r, timeoutMs);
        }),
      ]);
      clearTimeout(timer);
    }
    this.nativeClosed = true;
    this.native.close(); // cancels what is still queued; running blocks finish first
    await this.capacity.close();
    await Promise.allSettled([...this.inflight]);
    // No partial or uncommitted block survives the engine.
    const temps = sessions.flatMap((s) => [...s.pending.values()].flatMap((p) => (p.temp ? [p.temp] : [])));
    for (const s of sessions) s.pending.clear();
    await Promise.all(temps.map((t) => fs.promises.rm(t, { force: true })));
  }
}

/** Payload bytes of block `b` of a request of `blocks` blocks with equal shard counts. */
function blockBytes(shardLength: Float64Array, b: number, blocks: number): number {
  const per = shardLength.length / blocks;
  let n = 0;
  for (let i = b * per; i < (b + 1) * per; i++) n += shardLength[i];
  return n;
}
