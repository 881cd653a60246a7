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
//
// A commit names blocks by key, and any client of the engine may commit a
// block another client dumped (UCM's connector has its workers dump and its
// scheduler commit): the committing client's own pending block of that key
// first, else the oldest other client's. Every client of an engine is one
// the engine trusts (its own user, root or engineUid: core/identity.ts), the
// same clients that could dump that key themselves.
import { constants } from "os";
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
  block?: string; // "<ns>/<key hex>" of the block this piece is committed with (a dump's commit_keys)
  final: string;
  at: number;
  backend: number;
  fileBytes: number;
}

/** The native commit's answer for a block stored already (its first copy stays). */
const EEXIST = constants.errno.EEXIST;

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

  /**
   * Commits (or discards, `success` false) the listed blocks; per key whether it is now visible (every piece of it,
   * when it was dumped in pieces). A key is looked for among the pending blocks of `s`, then of `others` (every
   * client's; the oldest dump of the key wins), then among pieces dumped with it as their commit key.
   */
  async commit(s: Session, ns: string, keys: Buffer[], success: boolean, others: Iterable<Session> = []): Promise<boolean[]> {
    const found = new Array<number>(keys.length).fill(0); // pending blocks taken per key
    const done = new Array<number>(keys.length).fill(0); // of those, visible now
    const written: Array<{ i: number; key: Buffer; p: PendingCommit }> = [];
    const drop: PendingCommit[] = [];
    const sessions = [s, ...[...others].filter((o) => o !== s && o.pending.size > 0)];
    let pieces: Map<string, Array<[Session, string]>> | undefined;
    const take = (i: number, owner: Session, id: string): void => {
      const p = owner.pending.get(id)!;
      owner.pending.delete(id);
      found[i]++;
      if (!success) drop.push(p);
      else if (!p.temp) done[i]++;
      else written.push({ i, key: Buffer.from(id.slice(ns.length + 1), "hex"), p });
    };
    keys.forEach((k, i) => {
      const id = `${ns}/${k.toString("hex")}`;
      const owner = ownerOf(id, sessions);
      if (owner) return take(i, owner, id);
      pieces ??= piecesOf(ns, sessions);
      for (const [o, pid] of pieces.get(id) ?? []) if (o.pending.has(pid)) take(i, o, pid);
    });
    const result = () => found.map((n, i) => success && n > 0 && done[i] === n);
    if (drop.length) {
      // Gone before the reply: a client that discarded blocks sees no trace of them.
      const d = this.drop(drop, true);
      await d.done;
      this.counters.discards += d.temps.length;
    }
    if (!written.length) return result();
    // A block stored meanwhile by another client or engine keeps that copy (the native commit checks, on the
    // thread that renames, and answers EEXIST): the new one is deleted.
    const errs = await this.native.commit(
      written.map((w) => w.p.temp!),
      written.map((w) => w.p.final),
    );
    const now = Date.now();
    const failed: PendingCommit[] = [];
    const first: PendingCommit[] = [];
    errs.forEach((e, j) => {
      const w = written[j];
      if (e === EEXIST) {
        first.push(w.p);
        done[w.i]++;
      } else if (e === 0) {
        done[w.i]++;
        this.counters.commits++;
        this.capacity.committed(w.p.backend);
        this.lookups.stored(ns, w.key, now);
      } else {
        failed.push(w.p);
        this.log.warn(`commit of block ${ns}/${w.key.toString("hex")} failed: errno ${e}`);
      }
    });
    this.drop(failed);
    if (first.length) {
      this.drop(first);
      this.counters.commitsKeptFirst += first.length;
      this.log.debug(`commit: ${first.length} block(s) of ${ns} were stored already; the first copy kept, the new one deleted`);
    }
    return result();
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

/** The session holding a pending block `id`: `sessions[0]` (the committing client) first, else the oldest dump. */
function ownerOf(id: string, sessions: Session[]): Session | undefined {
  if (sessions[0].pending.has(id)) return sessions[0];
  let owner: Session | undefined;
  let at = Infinity;
  for (const o of sessions) {
    const p = o.pending.get(id);
    if (p && p.at < at) [owner, at] = [o, p.at];
  }
  return owner;
}

/** Pending pieces of namespace `ns` by the block they are committed with. */
function piecesOf(ns: string, sessions: Session[]): Map<string, Array<[Session, string]>> {
  const out = new Map<string, Array<[Session, string]>>();
  for (const o of sessions) {
    for (const [id, p] of o.pending) {
      if (!p.block || !id.startsWith(`${ns}/`)) continue;
      const list = out.get(p.block);
      if (list) list.push([o, id]);
      else out.set(p.block, [[o, id]]);
    }
  }
  return out;
}
