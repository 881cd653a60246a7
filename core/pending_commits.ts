// Dumped blocks waiting for the client's commit: each written block sits in a
// temporary file, invisible to lookups, until `commit` renames it into place
// (success) or deletes it (failure). A block nobody commits within
// uncommittedTimeoutS is deleted, and so is every pending block of a session
// that ends, so no partial or unconfirmed block is ever offered to a load.
import { CapacityManager } from "./capacity";
import { EngineConfig } from "./config";
import { Counters } from "./counters";
import { Logger } from "./log";
import { BlockLookups } from "./lookups";
import { NativeEngine } from "./native";
import { Session } from "./sessions";
import { Transfers } from "./transfers";

export interface PendingCommit {
  temp?: string; // absent when the block was already stored (skipped)
  final: string;
  at: number;
  backend: number;
  fileBytes: number;
}

/** The temporary files of `s`'s pending blocks, which are forgotten. */
function takeTemps(s: Session): string[] {
  const temps = [...s.pending.values()].flatMap((p) => (p.temp ? [p.temp] : []));
  s.pending.clear();
  return temps;
}

export class PendingCommits {
  constructor(
    private readonly config: Pick<EngineConfig, "uncommittedTimeoutS">,
    private readonly native: NativeEngine,
    private readonly transfers: Transfers,
    private readonly capacity: CapacityManager,
    private readonly lookups: BlockLookups,
    private readonly counters: Counters,
    private readonly log: Logger,
  ) {}

  /** Block `key` ("<ns>/<key hex>") of `s` awaits its commit; a block it replaces loses its temporary file. */
  add(s: Session, key: string, p: PendingCommit): void {
    const old = s.pending.get(key);
    if (old?.temp) this.transfers.removeFiles([old.temp]);
    s.pending.set(key, p);
  }

  /** Commits (or discards, `success` false) the listed blocks of `s`; per key whether it is now visible. */
  async commit(s: Session, ns: string, keys: Buffer[], success: boolean): Promise<boolean[]> {
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
          this.lookups.stored(ns, keys[i], now);
        } else {
          this.log.warn(`commit of block ${ns}/${keys[i].toString("hex")} failed: errno ${e}`);
        }
      });
      const failed = from.filter((_, j) => errs[j] !== 0);
      if (failed.length) this.transfers.removeFiles(failed);
    }
    return committed;
  }

  /** Drops every uncommitted block of a session (temporary files deleted). */
  discardAll(s: Session): void {
    const temps = takeTemps(s);
    if (temps.length) {
      this.counters.discards += temps.length;
      this.transfers.removeFiles(temps);
    }
  }

  /** Discards the blocks of `s` dumped more than uncommittedTimeoutS before `now`. */
  discardStale(s: Session, now: number): void {
    const limit = this.config.uncommittedTimeoutS * 1000;
    const stale: string[] = [];
    for (const [key, p] of s.pending) {
      if (now - p.at > limit) {
        s.pending.delete(key);
        if (p.temp) stale.push(p.temp);
      }
    }
    if (stale.length) {
      this.counters.discards += stale.length;
      this.log.warn(
        `discarded ${stale.length} dumped block(s) of client ${s.name || s.pid} never committed within ${this.config.uncommittedTimeoutS}s`,
      );
      this.transfers.removeFiles(stale);
    }
  }

  /** At shutdown, after the native engine stopped: deletes every session's temporary files and waits for it. */
  async removeAll(sessions: Session[]): Promise<void> {
    await this.transfers.removeAfterClose(sessions.flatMap(takeTemps));
  }
}
