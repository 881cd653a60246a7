// Dumped blocks waiting for the client's commit: each written block sits in a
// temporary file, invisible to lookups, until `commit` renames it into place
// (success) or deletes it (failure). A block nobody commits within
// uncommittedTimeoutS is deleted, and so is every pending block of a session
// that ends, so no partial or unconfirmed block is ever offered to a load.
//
// A temporary file takes room like a block: it counts against the capacity
// from its write until it is deleted (then it gives the room back) or
// committed (then it counts as a block file too). A commit never replaces a
// block already stored under its key (another client or node was first): the
// first copy stays, the new one is deleted, and the ledger counts one file.
import { CapacityManager } from "./capacity";
import { EngineConfig } from "./config";
import { Counters } from "./counters";
import { Logger } from "./log";
import { BlockLookups, withTimeout } from "./lookups";
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

export class PendingCommits {
  constructor(
    private readonly config: Pick<EngineConfig, "uncommittedTimeoutS" | "lookupTimeoutMs">,
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
    if (old) this.drop([old]);
    if (p.temp) this.capacity.written(p.backend, p.fileBytes);
    s.pending.set(key, p);
  }

  /** Gives the room of `ps`' temporary files back and deletes them (in the background unless `now`). */
  private drop(ps: PendingCommit[], now = false): { temps: string[]; done: Promise<unknown> } {
    const temps: string[] = [];
    for (const p of ps) {
      if (!p.temp) continue;
      temps.push(p.temp);
      this.capacity.unwritten(p.backend, p.fileBytes);
    }
    if (!temps.length) return { temps, done: Promise.resolve() };
    if (now) return { temps, done: this.native.remove(temps) };
    this.transfers.removeFiles(temps);
    return { temps, done: Promise.resolve() };
  }

  /** Takes every pending block of `s` out of it. */
  private takeAll(s: Session): PendingCommit[] {
    const all = [...s.pending.values()];
    s.pending.clear();
    return all;
  }

  /** Commits (or discards, `success` false) the listed blocks of `s`; per key whether it is now visible. */
  async commit(s: Session, ns: string, keys: Buffer[], success: boolean): Promise<boolean[]> {
    const committed = new Array<boolean>(keys.length).fill(false);
    const written: Array<[number, PendingCommit]> = [];
    const drop: PendingCommit[] = [];
    keys.forEach((k, i) => {
      const id = `${ns}/${k.toString("hex")}`;
      const p = s.pending.get(id);
      if (!p) return;
      s.pending.delete(id);
      if (!success) drop.push(p);
      else if (!p.temp) committed[i] = true;
      else written.push([i, p]);
    });
    if (drop.length) {
      // Gone before the reply: a client that discarded blocks sees no trace of them.
      const d = this.drop(drop, true);
      await d.done;
      this.counters.discards += d.temps.length;
    }
    if (!written.length) return committed;
    // Stored meanwhile by another client or engine: that copy stays (a rename would replace it, and the ledger
    // would count the key twice). When the filesystem does not say in time, the rename goes ahead.
    const there = await withTimeout(this.native.lookup(written.map(([, p]) => p.final)), this.config.lookupTimeoutMs);
    const rename = written.filter((_, j) => !there?.[j]);
    const first = written.filter((_, j) => there?.[j]);
    if (first.length) {
      this.drop(first.map(([, p]) => p));
      this.counters.commitsKeptFirst += first.length;
      for (const [i] of first) committed[i] = true;
      this.log.debug(`commit: ${first.length} block(s) of ${ns} were stored already; the first copy kept, the new one deleted`);
    }
    if (!rename.length) return committed;
    const errs = await this.native.commit(
      rename.map(([, p]) => p.temp!),
      rename.map(([, p]) => p.final),
    );
    const now = Date.now();
    const failed: PendingCommit[] = [];
    errs.forEach((e, j) => {
      const [i, p] = rename[j];
      if (e === 0) {
        committed[i] = true;
        this.counters.commits++;
        this.capacity.committed(p.backend);
        this.lookups.stored(ns, keys[i], now);
      } else {
        failed.push(p);
        this.log.warn(`commit of block ${ns}/${keys[i].toString("hex")} failed: errno ${e}`);
      }
    });
    this.drop(failed);
    return committed;
  }

  /** Drops every uncommitted block of a session (temporary files deleted). */
  discardAll(s: Session): void {
    this.counters.discards += this.drop(this.takeAll(s)).temps.length;
  }

  /** Discards the blocks of `s` dumped more than uncommittedTimeoutS before `now`. */
  discardStale(s: Session, now: number): void {
    const limit = this.config.uncommittedTimeoutS * 1000;
    const stale: PendingCommit[] = [];
    for (const [key, p] of s.pending) {
      if (now - p.at > limit) {
        s.pending.delete(key);
        stale.push(p);
      }
    }
    const n = this.drop(stale).temps.length;
    if (n) {
      this.counters.discards += n;
      this.log.warn(
        `discarded ${n} dumped block(s) of client ${s.name || s.pid} never committed within ${this.config.uncommittedTimeoutS}s`,
      );
    }
  }

  /** At shutdown, after the native engine stopped: deletes every session's temporary files and waits for it. */
  async removeAll(sessions: Session[]): Promise<void> {
    const all = sessions.flatMap((s) => this.takeAll(s)).filter((p) => p.temp);
    for (const p of all) this.capacity.unwritten(p.backend, p.fileBytes);
    await this.transfers.removeAfterClose(all.map((p) => p.temp!));
  }
}
