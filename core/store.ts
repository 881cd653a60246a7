// The store: the coordinator of a block's lifecycle (dump -> temporary file ->
// commit -> visible -> load) over typed requests (requests.ts). Each step has
// its own module, and this one only wires them in order: sessions.ts (regions),
// lookups.ts (what is stored), admission.ts (which dumped blocks are written),
// transfers.ts (shards to native transfers: where bytes move), tasks.ts (task
// results, wait, cancel), pending_commits.ts (temporary files until commit),
// counters.ts. Requests arrive fully validated; nothing changes before the
// session-dependent checks (regions, events) have passed.
import * as fs from "fs";
import * as path from "path";
import {
  BlockStatus,
  Engine,
  TierStats,
  TransferResult,
  TransferSpec,
  blockFileSize,
  constants as nativeConstants,
  setShareWithGroup,
} from "./native";
import { WriteAdmission } from "./admission";
import { CapacityManager } from "./capacity";
import { EngineConfig } from "./config";
import { Counters, StoreStats, countFailure, newCounters } from "./counters";
import { ETIMEDOUT, HEALTH_PROBE_NAME, SICK_STORAGE_ERRNOS, StoreHealth } from "./health";
import { BlockLookups, withTimeout } from "./lookups";
import { sweepOrphans } from "./orphans";
import { StorageLayout, engineTag } from "./layout";
import { Logger, taskLine } from "./log";
import { PendingCommits } from "./pending_commits";
import { ProtocolError, describe } from "./protocol";
import {
  CommitRequest,
  DumpRequest,
  LoadRequest,
  LookupRequest,
  NamespaceRequest,
  RegisterRequest,
  ReleaseRequest,
  TaskRequest,
  TransferRequest,
  WaitRequest,
} from "./requests";
import { Session, closeRegions, registerRegions, releaseRegions } from "./sessions";
import { TaskObserver, TaskResult, TaskTracker } from "./tasks";
import { Direction, Transfers, blockBytes, checkShards, transferSpec } from "./transfers";

export { Session } from "./sessions";
export type { TaskObserver, TaskResult } from "./tasks";
export type { StoreStats } from "./counters";

/**
 * A transfer still running this long after its deadline counts against the store's health at once (Store.watch):
 * by then the client has given up on it, and only a filesystem that does not answer keeps a block's thread.
 */
const OVERDUE_GRACE_MS = 250;

export class Store {
  readonly engineId: string;
  private readonly layout: StorageLayout;
  private readonly transfers: Transfers;
  private readonly capacity: CapacityManager;
  private readonly counters: Counters = newCounters();
  /** The block size a client's registration told the Cache stage to prepare for (register's block_bytes). */
  private preparedFor?: number;
  private readonly lookups: BlockLookups;
  /** The circuit breaker in front of the storage directories. */
  private readonly health: StoreHealth;
  private probeRunning = false;
  private probeSeq = 0;
  private readonly admission: WriteAdmission;
  private readonly tasks: TaskTracker;
  private readonly pending: PendingCommits;
  /** Block file names being loaded here (never evicted under the reader). */
  private readonly loading = new Map<string, number>();
  /** Called once per finished task (metrics). */
  onTask?: TaskObserver;

  constructor(
    readonly config: EngineConfig,
    readonly log: Logger,
  ) {
    this.engineId = engineTag();
    // A namespace's directories count against the capacity (the capacity manager exists before any is made).
    this.layout = new StorageLayout(config.storageBackends, this.engineId, (b, bytes) => this.capacity.holders(b, bytes));
    setShareWithGroup(config.shareWithGroup);
    const native = new Engine({
      threads: config.transferStreamNumber,
      odirect: config.odirect,
      fsync: config.fsync,
      maxBlockBytes: config.maxBlockBytes,
      pinnedStagingBytes: config.pinnedStagingBytes,
      cudaCopy: config.cudaCopy as "kernel" | "batch",
      cudaEventTimeoutMs: config.cudaEventTimeoutMs,
      hostTierBytes: config.hostCacheBytes,
      writeBehind: config.writeBehind && config.hostCacheBytes > 0,
      storeRoots: config.storageBackends,
    });
    this.transfers = new Transfers(native, config.storageBackends, log);
    this.health = new StoreHealth(config, (ms) => this.probe(ms), log);
    this.lookups = new BlockLookups(config, this.layout, native, log, (ok, what) => this.health.record(!ok, what));
    this.capacity = new CapacityManager(
      config,
      log,
      () => [...this.loading.keys()],
      () => this.lookups.forgetStored(),
    );
    this.admission = new WriteAdmission(config, this.layout, this.capacity, this.counters);
    this.tasks = new TaskTracker(native, log, (...a) => this.onTask?.(...a));
    this.pending = new PendingCommits(config, native, this.transfers, this.capacity, this.lookups, this.counters, log);
  }

  private get native() {
    return this.transfers.native;
  }

  /** Reads the backends' capacity ledgers; before the first request. */
  start(): Promise<void> {
    return this.capacity.start();
  }

  /**
   * The largest block (payload bytes) one device transfer can move: it must fit one transfer stream's share of
   * pinned staging with its header (native transfer.cc sizes the shares the same way).
   */
  get maxDeviceBlockBytes(): number {
    const { headerSize, blockAlign } = nativeConstants;
    const perStream = Math.max(Math.floor(this.config.pinnedStagingBytes / this.config.transferStreamNumber), blockAlign);
    return Math.ceil(perStream / blockAlign) * blockAlign - headerSize;
  }

  get tasksInFlight(): number {
    return this.tasks.inFlight;
  }

  /** A snapshot of the counters and of what is in flight, for `stats` and metrics. */
  stats(): StoreStats {
    const n = this.native.stats();
    return {
      counters: { ...this.counters },
      tasksInFlight: this.tasks.inFlight,
      inflightDumpBytes: this.admission.inflightBytes,
      maxInflightBytes: this.config.maxInflightBytes,
      capacity: this.capacity.usage(),
      queuedBlocks: n.queuedBlocks,
      stagingBytes: n.stagingBytes,
      pinnedBytes: n.pinnedBytes,
      transferThreads: n.threads,
      storageBusySeconds: n.storageBusyNs / 1e9,
      storageWaitSeconds: n.storageWaitNs / 1e9,
      health: this.health.snapshot(),
      tier: this.native.tierStats() ?? NO_TIER,
    };
  }

  /**
   * The store-health probe: in every storage directory, a small file created (O_EXCL: never through a link someone
   * planted), written and removed, all within `timeoutMs`. A probe the filesystem has not finished (a hung server
   * holds its thread) fails every later probe until it returns, so at most one thread waits on a sick directory.
   */
  private async probe(timeoutMs: number): Promise<boolean> {
    if (this.probeRunning) return false;
    const run = (async () => {
      for (const d of this.config.storageBackends) {
        const p = path.join(d, `${HEALTH_PROBE_NAME}.${this.engineId}.${++this.probeSeq}`);
        // Synced: on a local disk whose device hangs, a write into the page cache alone would still succeed.
        const f = await fs.promises.open(p, "wx", 0o600);
        try {
          await f.writeFile("ucm health probe\n");
          await f.datasync();
        } finally {
          await f.close();
        }
        await fs.promises.unlink(p);
      }
      return true;
    })().catch(() => false);
    this.probeRunning = true;
    void run.finally(() => (this.probeRunning = false));
    return (await withTimeout(run, timeoutMs)) === true;
  }

  /**
   * A dump or load answered while the breaker is open: every block `dropped` at once, the directory not touched
   * (the client recomputes, or keeps its KV unstored).
   */
  private shed(s: Session, direction: Direction, n: number): { task: number } {
    const id = this.tasks.newId();
    const result: TransferResult = {
      status: new Int32Array(n).fill(BlockStatus.Dropped),
      errno: new Int32Array(n),
      what: new Array<string>(n).fill("the store is off (storage unhealthy)"),
      bytes: 0,
      elapsedNs: 0,
    };
    if (direction === "D2S") this.health.stats.shedDumpBlocks += n;
    else this.health.stats.shedLoadBlocks += n;
    return this.tasks.track(s, direction, n, id, Promise.resolve(result), (r, tid) =>
      this.finished(tid, direction, n, r, Array.from(r.status) as BlockStatus[], Array.from(r.errno)),
    );
  }

  /**
   * What one finished transfer says of the directory's health: errors of sick storage (SICK_STORAGE_ERRNOS) and
   * missed deadlines count against it, a block moved for it.
   */
  private weigh(direction: Direction, r: TransferResult, generation: number): void {
    let failed = -1;
    let ok = false;
    for (let i = 0; i < r.status.length; i++) {
      const st = r.status[i] as BlockStatus;
      const sick =
        st === BlockStatus.IoError ? SICK_STORAGE_ERRNOS.has(r.errno[i]) : st === BlockStatus.Cancelled && r.errno[i] === ETIMEDOUT;
      if (sick) {
        failed = i;
        break;
      }
      if (st === BlockStatus.Ok) ok = true;
    }
    const verb = direction === "D2S" ? "write" : "read";
    if (failed >= 0) {
      this.health.record(true, `a block ${verb} failed: ${r.what[failed] || "errno " + String(r.errno[failed])}`, generation);
    } else if (ok) this.health.record(false, "", generation);
  }

  /**
   * Weighs a transfer's outcome for the store-health breaker once: when it ends, or, if it is still running when its
   * deadline passes, then, as a failure. A read or write stuck in a hung filesystem (its thread in the kernel until
   * the server or the device answers again) never ends in time to be weighed otherwise, and every later transfer
   * waits behind it: the client gives up on each after its timeout and the breaker would never open.
   */
  private watch(direction: Direction, started: Promise<TransferResult>, deadlineMs: number | undefined): (r: TransferResult) => void {
    const generation = this.health.generation;
    let weighed = false;
    const overdue =
      deadlineMs === undefined
        ? undefined
        : setTimeout(() => {
            weighed = true;
            const verb = direction === "D2S" ? "write" : "read";
            this.health.record(true, `a block ${verb} still running at its deadline (${deadlineMs} ms)`, generation);
          }, deadlineMs + OVERDUE_GRACE_MS);
    overdue?.unref();
    const stop = () => clearTimeout(overdue);
    started.then(stop, stop);
    return (r) => {
      if (!weighed) this.weigh(direction, r, generation);
      weighed = true;
    };
  }

  // ---- sessions and namespaces ---------------------------------------------------

  register(s: Session, req: RegisterRequest): { regions: number[]; events?: number[] } {
    if (req.blockBytes !== undefined && req.blockBytes > this.config.maxBlockBytes) {
      throw new ProtocolError(
        "too_large",
        `block_bytes ${req.blockBytes} is above this engine's maxBlockBytes ${this.config.maxBlockBytes}`,
      );
    }
    const out = registerRegions(this.native, this.config, s, req);
    // The Cache stage prepares its memory for this size now, not at the first dump (host_tier.h); the first
    // size it is told is the one it prepares (said once).
    if (req.blockBytes !== undefined && this.config.hostCacheBytes > 0 && this.preparedFor === undefined) {
      this.preparedFor = req.blockBytes;
      if (this.native.prepareTier(req.blockBytes))
        this.log.info(
          `Cache stage: preparing ${(this.config.hostCacheBytes / 2 ** 30).toFixed(2)} GiB in the background for blocks of ` +
            `${req.blockBytes} bytes (a client's registration); it leaves an eighth of the host's memory available`,
        );
    }
    return out;
  }

  release(s: Session, req: ReleaseRequest): Record<string, never> {
    return releaseRegions(this.native, s, req);
  }

  async namespace(s: Session, req: NamespaceRequest): Promise<Record<string, never>> {
    this.claimNamespace(s, req.ns);
    if (req.description === null) await this.layout.ensureNamespace(req.ns);
    else await this.layout.describeNamespace(req.ns, req.description);
    return {};
  }

  /**
   * Namespaces new to this engine that `s` brings in are counted against maxNamespacesPerClient: each takes about
   * 1 MiB of directories and its description for good (evicting blocks frees neither).
   */
  private claimNamespace(s: Session, ns: string): void {
    if (this.layout.known(ns) || s.namespaces.has(ns)) return;
    if (s.namespaces.size >= this.config.maxNamespacesPerClient) {
      throw new ProtocolError(
        "too_large",
        `namespace ${ns} refused: this client brought ${s.namespaces.size} new namespaces in already, the most allowed (maxNamespacesPerClient ${this.config.maxNamespacesPerClient})`,
      );
    }
    s.namespaces.add(ns);
  }

  // ---- lookup ------------------------------------------------------------------

  async lookup(req: LookupRequest): Promise<{ found: boolean[] | Buffer }> {
    if (this.health.open) {
      // The store is off: a miss at once, the directory not asked.
      this.health.stats.shedLookups++;
      this.counters.lookups++;
      this.counters.lookupKeys += req.keys.length;
      this.counters.misses += req.keys.length;
      return { found: req.bits ? Buffer.alloc(req.keys.length) : new Array<boolean>(req.keys.length).fill(false) };
    }
    const found = req.runs ? await this.lookups.presentRuns(req.ns, req.keys, req.runs) : await this.lookups.present(req.ns, req.keys);
    const hits = found.filter(Boolean).length;
    this.counters.lookups++;
    this.counters.lookupKeys += req.keys.length;
    this.counters.hits += hits;
    this.counters.misses += req.keys.length - hits;
    // As bytes the answer is one copy to encode and to decode; a scheduler's lookup of many waiting requests (8,192
    // keys) as booleans was a value per key for msgpack on both sides, and on the scheduler's side that work holds
    // Python's GIL while vLLM's step waits for it.
    return { found: req.bits ? bitsOf(found) : found };
  }

  // ---- dump / load -----------------------------------------------------------

  /** The native spec of blocks `keep` of the request, with its task id and deadline. */
  private spec(s: Session, req: TransferRequest, paths: (b: number) => string, keep: number[]): TransferSpec {
    const spec = transferSpec(s, req.ns, req.shards, paths, keep);
    spec.cancelId = this.tasks.newId();
    if (req.deadline !== undefined) spec.deadlineMs = Math.max(1, req.deadline - Date.now());
    return spec;
  }

  async dump(s: Session, req: DumpRequest): Promise<{ task: number }> {
    const { ns, keys } = req;
    // Regions and bounds of every block, before deciding which to skip.
    checkShards(s, req.shards, keys.length);
    // GPU memory: the workers wait on the event the client recorded after the forward pass.
    const waitEvent = clientEvent(s, req);
    this.claimNamespace(s, ns);
    if (this.health.open) return this.shed(s, "D2S", keys.length);
    await this.layout.ensureNamespace(ns);
    const stored = await this.lookups.present([ns], keys);
    const status = new Array<BlockStatus>(keys.length).fill(BlockStatus.Skipped);
    const admitted = this.admission.admit(
      ns,
      keys,
      req.shards.length,
      keys.flatMap((_, b) => (stored[b] ? [] : [b])),
      status,
    );
    const temps = new Map<number, string>();
    let spec: TransferSpec;
    let started: Promise<TransferResult>;
    try {
      spec = this.spec(
        s,
        req,
        (b) => {
          const t = this.layout.tempPath(ns, keys[b]);
          temps.set(b, t);
          return t;
        },
        admitted.write,
      );
      if (this.config.maxQueueMs > 0) spec.maxQueueMs = this.config.maxQueueMs;
      if (waitEvent !== undefined) spec.waitEvent = waitEvent;
      started = this.transfers.submit("D2S", spec);
    } catch (e) {
      this.admission.finish(admitted);
      this.admission.release(admitted);
      throw e;
    }
    // Each given back once: by the result below, or when the transfer failed as a whole (no result comes).
    const endBudget = once(() => this.admission.finish(admitted));
    const endWriting = once(() => this.admission.release(admitted));
    started.catch(() => {
      endBudget();
      endWriting();
    });
    this.counters.dumpTasks++;
    const weigh = this.watch("D2S", started, spec.deadlineMs);
    return this.tasks.track(
      s,
      "D2S",
      keys.length,
      spec.cancelId!,
      started,
      async (r, id) => {
        endBudget();
        weigh(r);
        const errno = new Array<number>(keys.length).fill(0);
        const where = new Map<number, number>(); // block -> its index among the written ones
        admitted.write.forEach((b, j) => {
          status[b] = r.status[j];
          errno[b] = r.errno[j];
          where.set(b, j);
        });
        const now = Date.now();
        const failedTemps: string[] = [];
        keys.forEach((k, b) => {
          const key = `${ns}/${k.toString("hex")}`;
          const j = where.get(b);
          const ck = req.commitKeys?.[b];
          const block = ck && !ck.equals(k) ? `${ns}/${ck.toString("hex")}` : undefined;
          if (status[b] === BlockStatus.Skipped) {
            this.counters.blocksSkipped++;
            // A written copy waiting for its commit (the same key earlier in this very request) stays the one committed.
            if (!s.pending.get(key)?.temp) {
              this.pending.add(s, key, { final: this.layout.blockPath(ns, k), block, at: now, backend: 0, fileBytes: 0 });
            }
          } else if (status[b] === BlockStatus.Ok) {
            this.counters.blocksDumped++;
            this.pending.add(s, key, {
              temp: temps.get(b),
              final: this.layout.blockPath(ns, k),
              block,
              at: now,
              backend: admitted.backends[j!],
              fileBytes: admitted.files[j!],
            });
          } else if (status[b] === BlockStatus.Dropped) {
            if (j !== undefined) this.counters.droppedQueueAge++; // the others were counted at admission
          } else {
            countFailure(this.counters, status[b]);
            failedTemps.push(temps.get(b)!);
          }
        });
        this.transfers.removeFiles(failedTemps);
        this.transfers.logFailures(id, "D2S", r);
        // Directories removed underneath (ENOENT): recreated next time; replaced by a link or a file (ELOOP,
        // ENOTDIR): checked again next time, which refuses them with a clear error.
        if (r.errno.some((e) => e === 2 || e === 20 || e === 40)) this.layout.forgetNamespace(ns);
        this.counters.bytesDumped += r.bytes;
        try {
          if (s.closed) this.pending.discardAll(s);
          else if (req.commit) await this.commitWritten(s, ns, keys, status);
        } finally {
          endWriting(); // committed (or not): another dump of these keys now sees what is stored
        }
        return this.finished(id, "D2S", admitted.write.length, r, status, errno);
      },
      admitted.write.length,
    );
  }

  /** `commit: true` on a dump: each written block becomes visible at once; one that cannot is an I/O error. */
  private async commitWritten(s: Session, ns: string, keys: Buffer[], status: BlockStatus[]): Promise<void> {
    const kept = keys.flatMap((_, b) => (status[b] === BlockStatus.Ok || status[b] === BlockStatus.Skipped ? [b] : []));
    const done = await this.pending.commit(
      s,
      ns,
      kept.map((b) => keys[b]),
      true,
    );
    kept.forEach((b, j) => {
      if (!done[j] && status[b] === BlockStatus.Ok) status[b] = BlockStatus.IoError;
    });
  }

  async load(s: Session, req: LoadRequest): Promise<{ task: number }> {
    const { ns, keys } = req;
    // GPU memory: the bytes land after the work the client queued on its stream before the load.
    const waitEvent = clientEvent(s, req);
    if (this.health.open) {
      checkShards(s, req.shards, keys.length);
      return this.shed(s, "S2D", keys.length);
    }
    const spec = this.spec(
      s,
      req,
      (b) => this.layout.blockPath(ns, keys[b]),
      keys.map((_, b) => b),
    );
    const names = keys.map((k) => k.toString("hex"));
    this.pin(names, 1);
    let started: Promise<TransferResult>;
    try {
      if (waitEvent !== undefined) spec.waitEvent = waitEvent;
      started = this.transfers.submit("S2D", spec);
    } catch (e) {
      this.pin(names, -1);
      throw e;
    }
    this.counters.loadTasks++;
    const weigh = this.watch("S2D", started, spec.deadlineMs);
    return this.tasks.track(s, "S2D", keys.length, spec.cancelId!, started, (r, id) => {
      this.pin(names, -1);
      weigh(r);
      const status = Array.from(r.status) as BlockStatus[];
      const bad: string[] = [];
      const now = Date.now();
      keys.forEach((k, b) => {
        if (status[b] === BlockStatus.Ok) {
          this.counters.blocksLoaded++;
          this.lookups.stored(ns, k, now);
          return;
        }
        countFailure(this.counters, status[b]);
        this.lookups.doubt(ns, k);
        if (status[b] === BlockStatus.Corrupt) {
          // A block that fails verification is removed so lookup stops offering it.
          bad.push(spec.paths[b]);
          this.capacity.removed(this.layout.backendIndex(k), blockFileSize(blockBytes(spec.shardLength, b, keys.length)));
          this.log.warn(`block ${ns}/${k.toString("hex")} failed verification (${r.what[b]}); removed, it will be recomputed`);
        }
      });
      this.transfers.removeFiles(bad);
      this.transfers.logFailures(id, "S2D", r);
      this.counters.bytesLoaded += r.bytes;
      return this.finished(id, "S2D", keys.length, r, status, Array.from(r.errno));
    });
  }

  /** The task's log line (logged here) and its per-block outcome. */
  private finished(id: number, direction: Direction, blocks: number, r: TransferResult, status: BlockStatus[], errno: number[]) {
    const line = taskLine(id, direction, blocks, r.bytes, r.elapsedNs / 1e9);
    this.log.info(line);
    return { status, errno, bytes: r.bytes, elapsed: r.elapsedNs / 1e9, line };
  }

  private pin(names: string[], by: 1 | -1): void {
    for (const n of names) {
      const c = (this.loading.get(n) ?? 0) + by;
      if (c > 0) this.loading.set(n, c);
      else this.loading.delete(n);
    }
  }

  // ---- tasks and commits ---------------------------------------------------------

  check(s: Session, req: TaskRequest): TaskResult | { done: false } {
    return this.tasks.check(s, req);
  }

  wait(s: Session, req: WaitRequest): Promise<TaskResult | { done: false }> {
    return this.tasks.wait(s, req);
  }

  cancel(s: Session, req: TaskRequest): Promise<{ cancelled: boolean; done: boolean }> {
    return this.tasks.cancel(s, req);
  }

  /** Commits by key: a block dumped by any client of this engine (`others`: every session) may be committed by any. */
  async commit(s: Session, req: CommitRequest, others: Iterable<Session> = []): Promise<{ committed: boolean[] }> {
    return { committed: await this.pending.commit(s, req.ns, req.keys, req.success, others) };
  }

  // ---- lifecycle ---------------------------------------------------------------

  /** Releases a session: regions closed (running transfers keep their mapping), uncommitted blocks dropped, tasks forgotten. */
  closeSession(s: Session): void {
    if (s.closed) return;
    s.closed = true;
    closeRegions(this.native, s);
    this.pending.discardAll(s);
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
    for (const s of sessions) {
      this.tasks.sweepSeen(s, now);
      this.pending.discardStale(s, now);
    }
  }

  /** Waits for running tasks (bounded), deletes uncommitted blocks, stops the native engine. */
  async close(timeoutMs: number, sessions: Session[]): Promise<void> {
    const until = Date.now() + timeoutMs;
    await this.tasks.drain(timeoutMs);
    // Write-behind: blocks held in memory only are written now, within what is left of the time.
    const tier = this.native.tierStats();
    if (tier && tier.unwritten > 0) {
      const n = tier.unwritten;
      const left = await this.transfers.drainWrites(Math.max(0, until - Date.now()));
      if (left > 0)
        this.log.warn(
          `stopping with ${left} of ${n} block(s) written behind not in the directory yet (shutdownTimeoutS ${timeoutMs / 1000}): they are lost`,
        );
      else this.log.info(`wrote the ${n} block(s) held in memory only to the directory before stopping`);
    }
    this.health.stop();
    this.transfers.close(); // cancels what is still queued; running blocks finish first
    await this.capacity.close();
    await this.tasks.drain();
    // No partial or uncommitted block survives the engine: neither those still pending nor those discarded on
    // the way (a client whose connection ended while the engine stopped).
    await this.pending.removeAll(sessions);
    await this.transfers.removalsDone();
  }
}

/** The tier's figures once the native engine is closed (it has none left). */
const NO_TIER: TierStats = {
  capacityBytes: 0,
  usedBytes: 0,
  blocks: 0,
  blockBytes: 0,
  pending: 0,
  hits: 0,
  hitBytes: 0,
  misses: 0,
  inserted: 0,
  evicted: 0,
  refused: 0,
  unwritten: 0,
  unwrittenBytes: 0,
  written: 0,
  writeFailed: 0,
  shed: 0,
  lagMs: 0,
  pinned: 0,
  pinnedBytes: 0,
  abandoned: 0,
};

/** The native event a transfer request names, checked to be one of this client's; undefined when it names none. */
function clientEvent(s: Session, req: TransferRequest): number | undefined {
  if (req.event === undefined) return undefined;
  const native = s.events.get(req.event);
  if (native === undefined)
    throw new ProtocolError("unknown_region", `event ${describe(req.event)} is not an event registered by this client`);
  return native;
}

/** A lookup's answer as bytes, one a key: 1 stored, 0 not. */
function bitsOf(found: boolean[]): Buffer {
  const out = Buffer.alloc(found.length);
  for (let i = 0; i < found.length; i++) if (found[i]) out[i] = 1;
  return out;
}

/** `f` to be run at most once, whoever calls it first. */
function once(f: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    f();
  };
}
