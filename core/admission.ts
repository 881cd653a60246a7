// Write admission: where a dump's blocks are let in or shed. A block not
// stored yet is written only if it passes, in this order, second sight (when
// admitOnSecondSight), the engine's in-flight byte budget (maxInflightBytes)
// and its backend's capacity; otherwise it is answered `dropped` at once and
// never queued, because a dump the scheduler cannot wait for is worth less
// than the memory and disk it would hold. An admitted block holds its bytes
// and its capacity reservation until `finish`.
//
// A key that another dump is writing at that moment (two requests of one
// step with the same prefix; every TP rank of an MLA model, which share one
// namespace) is not written a second time: it is answered `skipped`, as a
// stored one is, until that write has ended (`release`). If that write fails,
// the key simply stays unstored, a future miss.
import { BlockStatus, blockFileSize } from "./native";
import { CapacityManager } from "./capacity";
import { EngineConfig } from "./config";
import { Counters } from "./counters";
import { StorageLayout } from "./layout";
import { blockBytes } from "./transfers";

/** Keys remembered for admitOnSecondSight. */
const SECOND_SIGHT_ENTRIES = 1 << 20;

/** The blocks of one dump let in, with what each holds until the write ends. */
export interface Admitted {
  /** Block indexes of the request, in request order. */
  write: number[];
  /** Per written block: its file size and backend (the capacity reservation). */
  files: number[];
  backends: number[];
  /** Payload bytes of all written blocks (the in-flight budget they hold). */
  bytes: number;
  /** "<ns>/<key hex>" of the written blocks, in flight until `release`. */
  ids: string[];
}

export type AdmissionSettings = Pick<EngineConfig, "admitOnSecondSight" | "maxInflightBytes">;

export class WriteAdmission {
  /** Dump bytes admitted and not yet written. */
  private inflight = 0;
  /** Keys dumped once (admitOnSecondSight), oldest first. */
  private readonly seenOnce = new Map<string, true>();
  /** "<ns>/<key hex>" of the blocks being written now. */
  private readonly writing = new Set<string>();

  constructor(
    private readonly settings: AdmissionSettings,
    private readonly layout: StorageLayout,
    private readonly capacity: CapacityManager,
    private readonly counters: Counters,
  ) {}

  get inflightBytes(): number {
    return this.inflight;
  }

  /**
   * Which of the `candidates` (blocks not stored yet) are written. Those another dump is writing are marked
   * Skipped; the others not let in Dropped (and counted by reason); the written ones Ok, to be decided by the write.
   */
  admit(ns: string, keys: Buffer[], shardLength: BigUint64Array, candidates: number[], status: BlockStatus[]): Admitted {
    const out: Admitted = { write: [], files: [], backends: [], bytes: 0, ids: [] };
    for (const b of candidates) {
      const id = `${ns}/${keys[b].toString("hex")}`;
      if (this.writing.has(id)) {
        status[b] = BlockStatus.Skipped;
        this.counters.blocksSkippedInFlight++;
        continue;
      }
      status[b] = BlockStatus.Dropped;
      if (this.settings.admitOnSecondSight && !this.secondSight(id)) {
        this.counters.deferredFirstSight++;
        continue;
      }
      const bytes = blockBytes(shardLength, b, keys.length);
      if (this.inflight + out.bytes + bytes > this.settings.maxInflightBytes) {
        this.counters.droppedInflight++;
        continue;
      }
      const backend = this.layout.backendIndex(keys[b]);
      const file = blockFileSize(bytes);
      if (!this.capacity.reserve(backend, file)) {
        this.counters.droppedCapacity++;
        continue;
      }
      out.bytes += bytes;
      out.ids.push(id);
      this.writing.add(id); // a second copy of the key in this very request is skipped too
      status[b] = BlockStatus.Ok; // decided by the write
      out.write.push(b);
      out.files.push(file);
      out.backends.push(backend);
    }
    this.inflight += out.bytes;
    return out;
  }

  /**
   * The write of `a` ended (or was never submitted): its bytes leave the budget and its reservations are
   * released (a block's file counts as used once it is committed).
   */
  finish(a: Admitted): void {
    this.inflight -= a.bytes;
    a.write.forEach((_, j) => this.capacity.release(a.backends[j], a.files[j]));
  }

  /** The dump of `a` is over (written and committed, or failed): its keys may be written again. */
  release(a: Admitted): void {
    for (const id of a.ids) this.writing.delete(id);
  }

  /** True the second time a key is asked for (then forgotten); remembers the first. */
  private secondSight(id: string): boolean {
    if (this.seenOnce.delete(id)) return true;
    this.seenOnce.set(id, true);
    if (this.seenOnce.size > SECOND_SIGHT_ENTRIES) this.seenOnce.delete(this.seenOnce.keys().next().value!);
    return false;
  }
}
