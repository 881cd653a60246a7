// Which blocks are stored: the answer to `lookup`, and to a dump asking what
// it can skip. The filesystem is the truth; two caches in front of it save a
// stat per key (blocks seen committed, and for MISS_TTL_MS blocks seen
// missing), and a filesystem that does not answer in time (a hung NFS server)
// yields misses, never a blocked scheduler.
import { EngineConfig } from "./config";
import { KnownBlocks } from "./known_blocks";
import { StorageLayout } from "./layout";
import { Logger } from "./log";
import { NativeEngine } from "./native";

/** Lookup jobs allowed to wait for a lookup thread; beyond, lookups answer misses at once. */
const MAX_QUEUED_LOOKUPS = 256;
/**
 * How long a block the filesystem said was missing is answered as a miss without asking again (when lookup
 * caching is on). Safe both ways: a block this engine commits is known at once, and one another node stores
 * is seen up to a second later (NFS clients cache directory entries longer than that anyway).
 */
const MISS_TTL_MS = 1000;

/** The promise's value, or undefined if it has not settled within `ms` (it still runs). */
export function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
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

export class BlockLookups {
  private timedOut = 0;
  private timeoutLogged = 0;
  /** Blocks recently seen committed (saves a stat per lookup). */
  private readonly known = new KnownBlocks(1 << 20);
  /** Blocks the filesystem said were missing, for MISS_TTL_MS: a scheduler asks about the same misses step after step. */
  private readonly missing = new KnownBlocks(1 << 18);

  constructor(
    private readonly config: Pick<EngineConfig, "lookupCacheTtlS" | "lookupTimeoutMs">,
    private readonly layout: StorageLayout,
    private readonly native: NativeEngine,
    private readonly log: Logger,
  ) {}

  /** Which keys are stored in every namespace of `nsList` (the lookup's work, without its counters: dumps ask too). */
  async present(nsList: string[], keys: Buffer[]): Promise<boolean[]> {
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
      const exists =
        this.native.stats().queuedLookups > MAX_QUEUED_LOOKUPS
          ? undefined
          : await withTimeout(this.native.lookup(ask), this.config.lookupTimeoutMs);
      if (exists === undefined) {
        askAt.forEach(([i]) => (found[i] = false));
        this.timedOut++;
        if (Date.now() - this.timeoutLogged > 10_000) {
          this.timeoutLogged = Date.now();
          this.log.warn(
            `lookups unanswered by the filesystem within ${this.config.lookupTimeoutMs} ms (a hung NFS server?): answered as misses (${this.timedOut} so far)`,
          );
        }
      } else {
        askAt.forEach(([i, ns], j) => {
          if (exists[j]) this.stored(ns, keys[i], now);
          else {
            found[i] = false;
            this.known.forget(ns, keys[i]);
            this.missing.remember(ns, keys[i], now);
          }
        });
      }
    }
    return found;
  }

  /** The block is stored (committed or read back whole) as of `now`. */
  stored(ns: string, key: Buffer, now: number): void {
    this.known.remember(ns, key, now);
    this.missing.forget(ns, key);
  }

  /** The block may be gone (a load failed): ask the filesystem next time. */
  doubt(ns: string, key: Buffer): void {
    this.known.forget(ns, key);
  }

  /** Blocks were evicted: any known one may be gone. */
  forgetStored(): void {
    this.known.clear();
  }
}
