// The engine's running totals and the typed snapshot the store hands out
// (`stats` replies, Prometheus). Counters only grow; each is bumped in the one
// module that decides the event it counts, and read by nobody else but
// through `Store.stats()`.
import { BackendUsage } from "./capacity";
import { HealthStats } from "./health";
import { BlockStatus, TierStats } from "./native";

export interface Counters {
  lookups: number;
  lookupKeys: number;
  hits: number;
  misses: number;
  dumpTasks: number;
  loadTasks: number;
  blocksDumped: number;
  blocksSkipped: number;
  /** Of the skipped: being written by another dump at that moment (not yet stored, not written twice). */
  blocksSkippedInFlight: number;
  blocksLoaded: number;
  bytesDumped: number;
  bytesLoaded: number;
  blocksFailed: number;
  blocksCorrupt: number;
  commits: number;
  /** Commits of blocks stored meanwhile by another client or engine: the first copy kept, the new one deleted. */
  commitsKeptFirst: number;
  discards: number;
  // write admission: dumps dropped instead of queued
  droppedInflight: number;
  droppedCapacity: number;
  droppedQueueAge: number;
  deferredFirstSight: number;
  // failed blocks by kind
  blocksNotFound: number;
  blocksMismatch: number;
  blocksIoError: number;
  blocksCancelled: number;
}

/** All zero, in the order the `stats` reply lists them. */
export function newCounters(): Counters {
  return {
    lookups: 0,
    lookupKeys: 0,
    hits: 0,
    misses: 0,
    dumpTasks: 0,
    loadTasks: 0,
    blocksDumped: 0,
    blocksSkipped: 0,
    blocksSkippedInFlight: 0,
    blocksLoaded: 0,
    bytesDumped: 0,
    bytesLoaded: 0,
    blocksFailed: 0,
    blocksCorrupt: 0,
    commits: 0,
    commitsKeptFirst: 0,
    discards: 0,
    droppedInflight: 0,
    droppedCapacity: 0,
    droppedQueueAge: 0,
    deferredFirstSight: 0,
    blocksNotFound: 0,
    blocksMismatch: 0,
    blocksIoError: 0,
    blocksCancelled: 0,
  };
}

/** Counts one failed block by its kind (a status other than ok, skipped or dropped). */
export function countFailure(c: Counters, st: BlockStatus): void {
  c.blocksFailed++;
  if (st === BlockStatus.NotFound) c.blocksNotFound++;
  else if (st === BlockStatus.Corrupt) c.blocksCorrupt++;
  else if (st === BlockStatus.Mismatch) c.blocksMismatch++;
  else if (st === BlockStatus.Cancelled) c.blocksCancelled++;
  else c.blocksIoError++;
}

/** What the store is doing, at one moment: a copy, safe to keep. */
export interface StoreStats {
  counters: Counters;
  tasksInFlight: number;
  /** Dump bytes admitted and not yet written. */
  inflightDumpBytes: number;
  maxInflightBytes: number;
  capacity: BackendUsage[];
  /** Blocks queued for a transfer thread. */
  queuedBlocks: number;
  stagingBytes: number;
  pinnedBytes: number;
  transferThreads: number;
  /** Seconds of storage reads and writes, summed over transfers in flight (at most transferThreads at once). */
  storageBusySeconds: number;
  /** Seconds prepared blocks waited for a transfer stream, summed. */
  storageWaitSeconds: number;
  /** The store-health breaker (core/health.ts). */
  health: HealthStats;
  /** The Cache stage, the host-memory tier (native/src/host_tier.h). */
  tier: TierStats;
}
