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
/** Keys of a run (prefix lookup) that the first round asks the filesystem about; each later round asks twice as many. */
const FIRST_RUN_WINDOW = 8;

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
    /** Told whether each question to the filesystem was answered in time (the store-health breaker). */
    private readonly answered: (ok: boolean, what: string) => void = () => {},
  ) {}

  /** Which keys are stored in every namespace of `nsList` (the lookup's work, without its counters: dumps ask too). */
  async present(nsList: string[], keys: Buffer[]): Promise<boolean[]> {
    const found = new Array<boolean>(keys.length).fill(true);
    const now = Date.now();
    const ask: string[] = [];
    const askAt: Array<[number, string]> = [];
    for (const ns of nsList) {
      for (let i = 0; i < keys.length; i++) {
        const known = this.probe(ns, keys[i], now);
        if (known === undefined) {
          ask.push(this.layout.blockPath(ns, keys[i]));
          askAt.push([i, ns]);
        } else if (!known) found[i] = false;
      }
    }
    if (ask.length > 0) {
      const exists = await this.askFilesystem(ask, this.config.lookupTimeoutMs);
      askAt.forEach(([i, ns], j) => {
        if (!this.learn(ns, keys[i], exists?.[j], now)) found[i] = false;
      });
    }
    return found;
  }

  /**
   * A prefix lookup of several requests at once: `keys` is `runs.length` runs one after the other, and a key is found
   * when it is stored in every namespace and so is every earlier key of its run. A run stops at its first miss: the
   * keys after it are answered false without a stat, so a burst of new prompts costs about one stat per prompt beyond
   * what is stored. The filesystem is asked in rounds, each run a window of keys at a time (the window doubles from
   * round to round), all runs' windows together; the whole lookup is bounded by lookupTimeoutMs.
   */
  async presentRuns(nsList: string[], keys: Buffer[], runs: number[]): Promise<boolean[]> {
    const found = new Array<boolean>(keys.length).fill(false);
    const now = Date.now();
    const until = now + this.config.lookupTimeoutMs;
    // Per run: the first key not decided yet, and where the run ends (moved to its first miss once seen).
    let open: Array<{ next: number; end: number }> = [];
    let at = 0;
    for (const n of runs) {
      if (n > 0) open.push({ next: at, end: at + n });
      at += n;
    }
    for (let window = FIRST_RUN_WINDOW; open.length > 0; window *= 2) {
      const ask: string[] = [];
      const askAt: Array<[number, string]> = [];
      const scanned: number[] = []; // per open run: keys up to here are decided by this round
      for (const run of open) {
        let i = run.next;
        let unknown = 0;
        for (; i < run.end && unknown < window; i++) {
          let asked = false;
          for (const ns of nsList) {
            const known = this.probe(ns, keys[i], now);
            if (known === false) run.end = i;
            else if (known === undefined) {
              ask.push(this.layout.blockPath(ns, keys[i]));
              askAt.push([i, ns]);
              asked = true;
            }
          }
          if (i >= run.end) break;
          if (asked) unknown++;
        }
        scanned.push(Math.min(i, run.end));
      }
      const missing = new Set<number>();
      if (ask.length > 0) {
        const exists = await this.askFilesystem(ask, Math.max(1, until - Date.now()));
        askAt.forEach(([i, ns], j) => {
          if (!this.learn(ns, keys[i], exists?.[j], now)) missing.add(i);
        });
      }
      open = open.filter((run, r) => {
        for (; run.next < scanned[r]; run.next++) {
          if (missing.has(run.next)) return false;
          found[run.next] = true;
        }
        return run.next < run.end && Date.now() < until;
      });
    }
    return found;
  }

  /** What the caches say of a block: stored, missing, or undefined (ask the filesystem). */
  private probe(ns: string, key: Buffer, now: number): boolean | undefined {
    const ttl = this.config.lookupCacheTtlS * 1000;
    const seen = this.known.seenAt(ns, key);
    if (seen !== undefined && now - seen <= ttl) return true;
    const gone = ttl > 0 ? this.missing.seenAt(ns, key) : undefined;
    if (gone !== undefined && now - gone <= MISS_TTL_MS) return false;
    return undefined;
  }

  /** The filesystem's answer for the block (undefined: none in time, a miss), remembered; true when stored. */
  private learn(ns: string, key: Buffer, exists: number | undefined, now: number): boolean {
    if (exists === undefined) return false;
    if (exists) this.stored(ns, key, now);
    else {
      this.known.forget(ns, key);
      this.missing.remember(ns, key, now);
    }
    return exists !== 0;
  }

  /** Which of the block files exist (1 for each that does); undefined when the filesystem did not say within `ms` (all misses). */
  private async askFilesystem(paths: string[], ms: number): Promise<Uint8Array | undefined> {
    // Bounded in time: on a hung NFS server a stat never returns, and the scheduler must not wait on it.
    // The lookup threads are the filesystem's to block; the answer is "miss" for what they did not say.
    const backlog = this.native.stats().queuedLookups > MAX_QUEUED_LOOKUPS;
    const exists = backlog ? undefined : await withTimeout(this.native.lookup(paths), ms);
    this.answered(
      exists !== undefined,
      backlog ? `${MAX_QUEUED_LOOKUPS} lookups queued for the filesystem` : `a lookup unanswered within ${ms} ms`,
    );
    if (exists === undefined) {
      this.timedOut++;
      if (Date.now() - this.timeoutLogged > 10_000) {
        this.timeoutLogged = Date.now();
        this.log.warn(
          `lookups unanswered by the filesystem within ${this.config.lookupTimeoutMs} ms (a hung NFS server?): answered as misses (${this.timedOut} so far)`,
        );
      }
    }
    return exists;
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
