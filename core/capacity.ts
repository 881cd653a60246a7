// Capacity of the backend directories, shared by every engine writing there.
//
// Each directory carries a usage ledger (<dir>/.ucm/usage, native/src/capacity.h)
// that every engine updates with what it committed or removed, every
// `capacitySyncMs` or sooner when a lot changed. An engine that finds the
// directory above its high watermark evicts the least recently used blocks
// down to the low watermark (one engine at a time, by a lock in the same
// directory); the eviction pass rescans the directory and writes the true
// figure back, repairing any drift. Writes that would take the directory past
// its capacity are refused at admission (dropped, counted), never queued.
import { evict, EvictResult, usageAdd } from "./native";
import { EngineConfig } from "./config";
import { Logger } from "./log";

/** Eviction starts above this fraction of the capacity... */
export const HIGH_WATERMARK = 0.95;
/** ...and frees down to this one... */
export const LOW_WATERMARK = 0.85;
/** ...or to this one when writes were refused for room since the last pass (fast turnover). */
export const DEEP_WATERMARK = 0.7;
/** How often an engine without a capacity limit reads the ledger when it changed nothing. */
const UNLIMITED_READ_MS = 30_000;
/** Ledger lock deadline: a hung NFS server must not hang the engine. */
const LEDGER_TIMEOUT_MS = 10_000;

export interface BackendUsage {
  dir: string;
  /** 0 = unlimited. */
  capacity: number;
  /** Bytes in the directory: the ledger as last read plus this engine's unsent changes. */
  usedBytes: number;
  usedFiles: number;
  /** Admitted dump bytes not yet written or discarded. */
  reservedBytes: number;
  evictedBytes: number;
  evictedFiles: number;
  evictionPasses: number;
  /** Capacity admission refusals. */
  refused: number;
  ledgerErrors: number;
}

interface Backend extends BackendUsage {
  ledgerBytes: number;
  ledgerFiles: number;
  pendingBytes: number;
  pendingFiles: number;
  /** The ledger update in flight, if any (one at a time per directory). */
  syncing?: Promise<void>;
  evicting: boolean;
  lastRescan: number;
  lastRead: number;
  /** `refused` when the last eviction pass started. */
  refusedAtPass: number;
}

export class CapacityManager {
  private readonly backends: Backend[];
  private timer?: NodeJS.Timeout;
  private closed = false;
  private readonly running = new Set<Promise<unknown>>();

  /**
   * `pinned` lists block file names this engine is reading (never evicted);
   * `onEvicted` runs after a pass deleted blocks (lookup caches must forget).
   */
  constructor(
    private readonly config: EngineConfig,
    private readonly log: Logger,
    private readonly pinned: () => string[],
    private readonly onEvicted: () => void,
  ) {
    this.backends = config.storageBackends.map((dir, i) => ({
      dir,
      capacity: config.capacity[i] ?? 0,
      usedBytes: 0,
      usedFiles: 0,
      reservedBytes: 0,
      evictedBytes: 0,
      evictedFiles: 0,
      evictionPasses: 0,
      refused: 0,
      ledgerErrors: 0,
      ledgerBytes: 0,
      ledgerFiles: 0,
      pendingBytes: 0,
      pendingFiles: 0,
      evicting: false,
      lastRescan: Date.now(),
      lastRead: 0,
      refusedAtPass: 0,
    }));
  }

  get limited(): boolean {
    return this.backends.some((b) => b.capacity > 0);
  }

  /** Reads (or, for a directory never accounted, builds by a scan) every ledger; starts the timer. */
  async start(): Promise<void> {
    await Promise.all(
      this.backends.map(async (b) => {
        try {
          const u = await usageAdd(b.dir, 0, 0, LEDGER_TIMEOUT_MS);
          this.apply(b, u.bytes, u.files);
          if (!u.existed) await this.pass(b, false, "first accounting of this directory");
        } catch (e) {
          b.ledgerErrors++;
          this.log.warn(`capacity: cannot read the usage ledger of ${b.dir}: ${(e as Error).message}`);
        }
      }),
    );
    this.timer = setInterval(() => this.tick(), this.config.capacitySyncMs);
    this.timer.unref();
  }

  usage(): BackendUsage[] {
    return this.backends.map((b) => ({
      dir: b.dir,
      capacity: b.capacity,
      usedBytes: b.usedBytes,
      usedFiles: b.usedFiles,
      reservedBytes: b.reservedBytes,
      evictedBytes: b.evictedBytes,
      evictedFiles: b.evictedFiles,
      evictionPasses: b.evictionPasses,
      refused: b.refused,
      ledgerErrors: b.ledgerErrors,
    }));
  }

  /** Reserves room for a block file about to be written; false when the directory is full. */
  reserve(backend: number, bytes: number): boolean {
    const b = this.backends[backend];
    if (b.capacity > 0 && b.usedBytes + b.reservedBytes + bytes > b.capacity) {
      b.refused++;
      this.maybeEvict(b);
      return false;
    }
    b.reservedBytes += bytes;
    return true;
  }

  /** Gives a reservation back (the write finished, failed or was dropped). */
  release(backend: number, bytes: number): void {
    const b = this.backends[backend];
    b.reservedBytes = Math.max(0, b.reservedBytes - bytes);
  }

  /** A temporary block file of `bytes` was written: it takes room until it is deleted. */
  written(backend: number, bytes: number): void {
    this.change(this.backends[backend], bytes, 0);
  }

  /** A temporary block file of `bytes` was deleted uncommitted. */
  unwritten(backend: number, bytes: number): void {
    this.change(this.backends[backend], -bytes, 0);
  }

  /** A written temporary file became a block file (its bytes were counted when it was written). */
  committed(backend: number): void {
    this.change(this.backends[backend], 0, 1);
  }

  /** This engine created directories or files that hold blocks (a namespace's), taking `bytes`. */
  holders(backend: number, bytes: number): void {
    this.change(this.backends[backend], bytes, 0);
  }

  /** A committed block file was deleted by this engine (for example, found corrupt). */
  removed(backend: number, bytes: number): void {
    this.change(this.backends[backend], -bytes, -1);
  }

  private change(b: Backend, bytes: number, files: number): void {
    b.pendingBytes += bytes;
    b.pendingFiles += files;
    b.usedBytes = Math.max(0, b.ledgerBytes + b.pendingBytes);
    b.usedFiles = Math.max(0, b.ledgerFiles + b.pendingFiles);
    // A lot changed since the last update: tell the other engines now.
    if (b.capacity > 0 && Math.abs(b.pendingBytes) >= b.capacity / 64) this.sync(b);
    else if (b.capacity > 0 && b.usedBytes >= HIGH_WATERMARK * b.capacity) this.maybeEvict(b);
  }

  private apply(b: Backend, bytes: number, files: number): void {
    b.lastRead = Date.now();
    b.ledgerBytes = bytes;
    b.ledgerFiles = files;
    b.usedBytes = Math.max(0, bytes + b.pendingBytes);
    b.usedFiles = Math.max(0, files + b.pendingFiles);
  }

  private tick(): void {
    const now = Date.now();
    for (const b of this.backends) {
      // Unlimited directories are accounted too (for the figures), but need
      // no fresh view of the others: send changes, read the total now and then.
      const changed = b.pendingBytes !== 0 || b.pendingFiles !== 0;
      if (b.capacity > 0 || changed || now - b.lastRead >= UNLIMITED_READ_MS) this.sync(b);
      const rescan = this.config.capacityRescanS * 1000;
      if (b.capacity > 0 && rescan > 0 && now - b.lastRescan >= rescan && !b.evicting) {
        b.lastRescan = now;
        this.track(this.pass(b, false, "periodic rescan"));
      }
    }
  }

  /** Sends this engine's changes to the ledger and learns everybody's total. */
  private sync(b: Backend): Promise<void> {
    if (b.syncing) return b.syncing;
    if (this.closed) return Promise.resolve();
    const db = b.pendingBytes;
    const df = b.pendingFiles;
    const p = usageAdd(b.dir, db, df, LEDGER_TIMEOUT_MS)
      .then((u) => {
        b.pendingBytes -= db;
        b.pendingFiles -= df;
        this.apply(b, u.bytes, u.files);
        this.maybeEvict(b);
      })
      .catch((e: Error) => {
        if (b.ledgerErrors++ % 100 === 0) this.log.warn(`capacity: usage ledger of ${b.dir}: ${e.message}`);
      })
      .finally(() => {
        b.syncing = undefined;
      });
    b.syncing = p;
    this.track(p);
    return p;
  }

  private maybeEvict(b: Backend): void {
    if (b.capacity === 0 || b.evicting || this.closed) return;
    if (b.usedBytes + b.reservedBytes < HIGH_WATERMARK * b.capacity) return;
    this.track(this.pass(b, true, "above the high watermark"));
  }

  /** One pass: evict down to the low watermark (evict) or only rescan. Never throws. */
  private async pass(b: Backend, evictToLow: boolean, why: string): Promise<EvictResult | undefined> {
    if (b.evicting) return undefined;
    b.evicting = true;
    const t0 = Date.now();
    try {
      // Unsent changes first, so the pass starts from everybody's figure.
      await this.sync(b);
      if (b.pendingBytes !== 0 || b.pendingFiles !== 0) await this.sync(b);
      // Writes were turned away since the last pass: the directory turns over
      // faster than one pass keeps up with, so free more this time.
      const level = b.refused > b.refusedAtPass ? DEEP_WATERMARK : LOW_WATERMARK;
      b.refusedAtPass = b.refused;
      const r = await evict({
        dir: b.dir,
        targetBytes: evictToLow && b.capacity > 0 ? Math.floor(level * b.capacity) : undefined,
        extraBytes: b.reservedBytes,
        graceMs: this.config.evictionGraceS * 1000,
        pinned: this.pinned(),
        timeoutMs: LEDGER_TIMEOUT_MS,
      });
      if (r.busy) return r; // another engine is on it; its result reaches us through the ledger
      if (r.error) throw new Error(r.error);
      b.lastRescan = Date.now();
      this.apply(b, r.usedBytes, r.usedFiles);
      if (r.wantedBytes > 0) b.evictionPasses++;
      b.evictedBytes += r.freedBytes;
      b.evictedFiles += r.freedFiles;
      if (r.freedFiles > 0) this.onEvicted();
      const mib = (x: number) => (x / 2 ** 20).toFixed(1);
      const msg =
        `capacity: ${b.dir}: ${why}: scanned ${r.scannedFiles} block file(s), ${mib(r.scannedBytes)} MiB, ` +
        `evicted ${r.freedFiles} (${mib(r.freedBytes)} MiB), kept ${r.keptRecent} recently used and ${r.keptPinned} being read, ` +
        `now ${mib(r.usedBytes)} MiB of ${b.capacity ? mib(b.capacity) + " MiB" : "unlimited"} (${Date.now() - t0} ms)`;
      if (r.freedBytes < r.wantedBytes)
        this.log.warn(`${msg}; could not free the ${mib(r.wantedBytes)} MiB needed: writes are refused until room appears`);
      else this.log.info(msg);
      return r;
    } catch (e) {
      b.ledgerErrors++;
      this.log.warn(`capacity: eviction in ${b.dir} failed: ${(e as Error).message}`);
      return undefined;
    } finally {
      b.evicting = false;
    }
  }

  private track(p: Promise<unknown>): void {
    this.running.add(p);
    void p.finally(() => this.running.delete(p));
  }

  /** Stops the timer and sends the last changes (bounded by the ledger's lock deadline). */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.closed = true;
    await Promise.allSettled([...this.running]);
    await Promise.allSettled(
      this.backends
        .filter((b) => b.pendingBytes !== 0 || b.pendingFiles !== 0)
        .map((b) => usageAdd(b.dir, b.pendingBytes, b.pendingFiles, LEDGER_TIMEOUT_MS)),
    );
  }
}
