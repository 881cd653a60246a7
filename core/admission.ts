// Write admission: where a dump's blocks are let in or shed. A block not
// stored yet is written only if it passes, in this order, second sight (when
// admitOnSecondSight), the engine's in-flight byte budget (maxInflightBytes)
// and its backend's capacity; otherwise it is answered `dropped` at once and
// never queued, because a dump the scheduler cannot wait for is worth less
// than the memory and disk it would hold. An admitted block holds its bytes
// and its capacity reservation until `finish`.
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
}

export type AdmissionSettings = Pick<EngineConfig, "admitOnSecondSight" | "maxInflightBytes">;

export class WriteAdmission {
  /** Dump bytes admitted and not yet written. */
  private inflight = 0;
  /** Keys dumped once (admitOnSecondSight), oldest first. */
  private readonly seenOnce = new Map<string, true>();

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
   * Which of the `candidates` (blocks not stored yet) are written. The others are marked Dropped in `status`
   * (and counted by reason); the written ones Ok, to be decided by the write.
   */
  admit(ns: string, keys: Buffer[], shardLength: BigUint64Array, candidates: number[], status: BlockStatus[]): Admitted {
    const out: Admitted = { write: [], files: [], backends: [], bytes: 0 };
    for (const b of candidates) {
      status[b] = BlockStatus.Dropped;
      if (this.settings.admitOnSecondSight && !this.secondSight(`${ns}/${keys[b].toString("hex")}`)) {
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

  /** True the second time a key is asked for (then forgotten); remembers the first. */
  private secondSight(id: string): boolean {
    if (this.seenOnce.delete(id)) return true;
    this.seenOnce.set(id, true);
    if (this.seenOnce.size > SECOND_SIGHT_ENTRIES) this.seenOnce.delete(this.seenOnce.keys().next().value!);
    return false;
  }
}
